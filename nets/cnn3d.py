"""The 3D CNN of the Keras example "3D image classification from CT scans" (H. Zunair,
keras.io/examples/vision/3D_image_classification; its model "3dcnn"), layer for layer, in
PyTorch.

No ``from __future__ import annotations`` here, unlike the rest of the code: TorchScript (the
bundle's ``models/model.ts``) reads the annotations of the scripted methods and cannot resolve
them as strings ("Unknown type annotation: 'torch.Tensor'").
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def min_spatial_size(num_blocks: int = 4) -> int:
    """Smallest edge length that survives ``num_blocks`` of (valid 3x3x3 conv, 2x max-pool)."""
    size = 1
    for _ in range(num_blocks):
        size = size * 2 + 2
    return size


def max_pool_2x(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.max_pool3d(x, 2)`` of a (n, c, d, h, w) tensor, for inference: three pairwise maxima
    over strided views (rows, columns, planes), each halving the data, in ``x``'s memory format.

    On the CPU this is faster than ``max_pool3d``, which copies a channels-last bfloat16 input
    into its own layout and records the indices that only a backward pass needs. Same values
    (floor mode: an odd last row, column or plane is dropped); no gradient path is offered.
    The result goes into ``out`` when given (e.g. a slice of a larger tensor).
    """
    for dim in (3, 4, 2):
        half = x.shape[dim] // 2
        even = [slice(None)] * 5
        odd = [slice(None)] * 5
        even[dim], odd[dim] = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        if dim == 2 and out is not None:
            return torch.maximum(x[tuple(even)], x[tuple(odd)], out=out)
        x = torch.maximum(x[tuple(even)], x[tuple(odd)])
    return x


#: how the last block's feature map becomes one vector per scan: ``avg`` (the reference's
#: global average pooling), ``max`` (global max: one strong voxel is enough, for small findings)
#: or ``attention`` (attention-weighted mean, multiple-instance pooling: the network learns
#: which voxels count)
POOLINGS = ("avg", "max", "attention")


class AttentionPool3d(nn.Module):
    """Attention-weighted mean over the voxels of a (n, c, d, h, w) map (Ilse et al., 2018:
    multiple-instance pooling): a 1x1x1 convolution scores each voxel, a softmax over the voxels
    turns the scores into weights, the output is the weighted mean, shape (n, c).

    Args:
        channels: channels of the feature map.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(x).flatten(2), dim=-1)  # (n, 1, voxels)
        return (x.flatten(2) * weights).sum(dim=-1)


def make_pooling(pooling: str, channels: int) -> nn.Module:
    """The global pooling ``pooling`` (one of :data:`POOLINGS`) of a ``channels`` map."""
    if pooling == "avg":
        return nn.AdaptiveAvgPool3d(1)
    if pooling == "max":
        return nn.AdaptiveMaxPool3d(1)
    if pooling == "attention":
        return AttentionPool3d(channels)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class DensityBranch(nn.Module):
    """A learned read-out of the input's intensity histogram: a soft (Gaussian-kernel)
    histogram of every voxel of the first channel over ``bins`` centres in [0, 1] (the window's
    scale), its logarithm standardised (BatchNorm, no affine), then one linear unit: the network
    sees lung density directly, as a histogram baseline does, and its convolutions are left to
    find what a histogram cannot. The unit starts at zero (the head alone decides at first) and
    its output is scaled by ``gain``, so it learns at the pace of a logistic regression rather
    than of the network's small learning rate.

    Args:
        bins: histogram bins over [0, 1].
        gain: factor on the unit's output (a learning-rate multiplier for it).
    """

    def __init__(self, bins: int, gain: float = 10.0) -> None:
        super().__init__()
        self.centres: torch.Tensor
        self.register_buffer("centres", torch.linspace(0.0, 1.0, bins))
        self.width = 1.0 / max(bins - 1, 1)
        # eps 0.1 and the clamp: a bin empty in every training scan has variance 0, and one
        # voxel of a new scan in it must not become a standardised value in the hundreds
        self.norm = nn.BatchNorm1d(bins, affine=False, eps=0.1)
        self.linear = nn.Linear(bins, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x[:, :1].flatten(1).float()  # (n, voxels)
        kernel = torch.exp(
            -0.5 * ((values[:, :, None] - self.centres[None, None, :]) / self.width) ** 2
        )
        histogram = kernel.mean(dim=1)  # (n, bins)
        histogram = histogram / histogram.sum(dim=1, keepdim=True).clamp_min(1e-8)
        standard = self.norm(torch.log(histogram + 1e-4)).clamp(-5.0, 5.0)
        return self.gain * self.linear(standard)


#: heads of a severity network (more than two ordered grades): ``coral``, one score and a
#: learned threshold per grade boundary (rank-consistent cumulative logits, Cao et al. 2020);
#: ``softmax``, one logit per grade (the grades' order is ignored in training)
ORDINAL_HEADS = ("coral", "softmax")


class CumulativeLogits(nn.Module):
    """The severity head's read-out: ``grades - 1`` cumulative logits per scan, column ``k``
    the logit of P(grade > k). Column 0 is P(abnormal)'s logit, so everything that reads a
    binary model's one logit reads a severity model's first column alike.

    ``coral``: the network's one score plus a learned offset per boundary (offsets start
    evenly from +1 to -1). ``softmax``: the network gives one logit per grade; P(grade > k) is
    the sum of the softmax above ``k``, as a logit ``logsumexp(z[k+1:]) - logsumexp(z[:k+1])``.

    Args:
        grades: number of ordered grades (at least 3).
        head: one of :data:`ORDINAL_HEADS`.
    """

    def __init__(self, grades: int, head: str = "softmax") -> None:
        super().__init__()
        if grades < 3:
            raise ValueError(f"a severity head needs at least 3 grades, got {grades}")
        if head not in ORDINAL_HEADS:
            raise ValueError(f"head must be one of {', '.join(ORDINAL_HEADS)}, got {head!r}")
        self.grades = grades
        self.coral = head == "coral"
        self.offsets = nn.Parameter(torch.linspace(1.0, -1.0, grades - 1) if self.coral else
                                    torch.zeros(0))  # fmt: skip

    @property
    def inputs(self) -> int:
        """Scores it reads: one (coral) or one per grade (softmax)."""
        return 1 if self.coral else self.grades

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.coral:
            return scores + self.offsets
        columns = []
        for k in range(self.grades - 1):
            above = torch.logsumexp(scores[:, k + 1 :], dim=1)
            below = torch.logsumexp(scores[:, : k + 1], dim=1)
            columns.append(above - below)
        return torch.stack(columns, dim=1)


#: normalisations a block can end with: the reference's BatchNorm, or GroupNorm, which does not
#: depend on the batch. (InstanceNorm is not offered: at the smallest inputs the last block's
#: output is one voxel per channel, which it cannot normalise.)
NORMS = ("batch", "group")


def make_norm(norm: str, channels: int, eps: float, momentum: float) -> nn.Module:
    """The normalisation layer ``norm`` (one of :data:`NORMS`) over ``channels``.

    ``group`` splits the channels into 8 groups where they divide by 8 (else 4, 2, 1), of at
    least 2 channels each (a group must hold 2 values even where the last block's output is one
    voxel); ``eps`` is every layer's epsilon, ``momentum`` the BatchNorm moving average's
    (unused by GroupNorm).
    """
    if norm == "batch":
        return nn.BatchNorm3d(channels, eps=eps, momentum=momentum)
    if norm == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0 and channels >= 2 * g)
        return nn.GroupNorm(groups, channels, eps=eps)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


class ConvBlock3D(nn.Sequential):
    """Conv3D (kernel 3, valid) -> ReLU -> MaxPool3D(2) -> BatchNorm, as the reference stacks them.

    ReLU and max-pooling commute exactly (ReLU is monotone), so the block pools first and applies
    ReLU to 8x fewer values; the output equals the reference's conv -> ReLU -> pool order.

    On the CPU, a block with few input channels (the first: one channel in, 64 out, a 0.5 GB
    activation at batch 2) runs as a loop over slabs of the first spatial axis, each small enough
    to stay in the CPU cache: the 3x3x3 convolution of a slab is computed as a 2D convolution whose
    input channels are the three neighbouring planes (one oneDNN kernel, channels-last output),
    and pooled at once. In training each slab is recomputed in the backward pass
    (``torch.utils.checkpoint``), so the full-size activation never exists. The result equals the
    plain path to float rounding; scripting, tracing, exports and CUDA use the plain path.

    Args:
        in_channels: channels of the input.
        out_channels: filters of the convolution.
        bn_eps: BatchNorm epsilon (Keras default 1e-3).
        bn_momentum: BatchNorm momentum in PyTorch terms (Keras' moving average 0.99 is 0.01).
        slab_bytes: size of the convolution output computed at once by the CPU slab path (0 turns
            the slab path off).
        norm: the block's normalisation, one of :data:`NORMS` (``batch``: the reference's).
    """

    #: blocks with at most this many input channels take the slab path on the CPU
    slab_max_in_channels: int = 4

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        slab_bytes: int = 16 * 2**20,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3)
        self.pool = nn.MaxPool3d(2)
        self.act = nn.ReLU(inplace=True)
        # named bn whatever the kind: state dicts keep the reference's keys
        self.bn = make_norm(norm, out_channels, bn_eps, bn_momentum)
        self.slab_bytes = slab_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._use_slabs(x):
            pooled = self._conv_pool_slabs(x)
        elif not torch.jit.is_scripting() and self._pool_pairwise(x):
            pooled = max_pool_2x(self.conv(x))
        else:
            pooled = self.pool(self.conv(x))
        return self.bn(self.act(pooled))

    @torch.jit.unused
    def _use_slabs(self, x: torch.Tensor) -> bool:
        return (
            self.slab_bytes > 0
            and x.device.type == "cpu"
            and self.conv.in_channels <= self.slab_max_in_channels
            and min(x.shape[2:]) >= 4
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _needs_grad(self, x: torch.Tensor) -> bool:
        """Whether this forward pass builds a graph (training, or gradients for saliency)."""
        return torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad)

    @torch.jit.unused
    def _pool_pairwise(self, x: torch.Tensor) -> bool:
        """Inference on the CPU: pool by pairwise maxima (``max_pool_2x``)."""
        return (
            x.device.type == "cpu"
            and not self._needs_grad(x)
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )

    @torch.jit.unused
    def _conv_pool_slabs(self, x: torch.Tensor) -> torch.Tensor:
        n, _, depth, height, width = x.shape
        pooled_depth = (depth - 2) // 2
        row_bytes = n * self.conv.out_channels * 2 * (height - 2) * (width - 2) * 4
        rows = max(1, min(pooled_depth, self.slab_bytes // row_bytes))
        train = self._needs_grad(x)
        if not train:  # each slab's pooled planes written straight into the output
            out: torch.Tensor | None = None
            for start in range(0, pooled_depth, rows):
                stop = min(pooled_depth, start + rows)
                part = x[:, :, 2 * start : 2 * stop + 2]
                if out is None:
                    first = self._conv_pool_planes(part, None)
                    out = torch.empty(
                        (*first.shape[:2], pooled_depth, *first.shape[3:]),
                        dtype=first.dtype,
                        memory_format=torch.channels_last_3d,
                    )
                    out[:, :, start:stop] = first
                else:
                    self._conv_pool_planes(part, out[:, :, start:stop])
            assert out is not None
            return out
        slabs = []
        for start in range(0, pooled_depth, rows):
            stop = min(pooled_depth, start + rows)
            part = x[:, :, 2 * start : 2 * stop + 2]
            slabs.append(checkpoint(self._conv_pool_planes, part, False, use_reentrant=False))
        return torch.cat(slabs, 2)

    @torch.jit.unused
    def _conv_pool_planes(
        self, part: torch.Tensor, pairwise: torch.Tensor | bool | None
    ) -> torch.Tensor:
        """Conv3d (kernel 3, valid) then 2x max-pool of one slab, via a 2D convolution.

        In training (``pairwise`` False) the max is ``max_pool3d``'s, whose backward is the
        faster one; without gradients ``max_pool_2x``'s, written into ``pairwise`` when it is
        a tensor (a slice of the block's output).
        """
        n, c, depth, height, width = part.shape
        out_channels = self.conv.out_channels
        # (n, c, d', h, w, 3) -> (n * d', c * 3, h, w): each output plane sees its three input planes
        planes = part.unfold(2, 3, 1).permute(0, 2, 1, 5, 3, 4)
        planes = planes.reshape(n * (depth - 2), c * 3, height, width)
        planes = planes.contiguous(memory_format=torch.channels_last)
        weight = self.conv.weight.reshape(out_channels, c * 3, 3, 3)
        out = F.conv2d(planes, weight, self.conv.bias)  # (n * d', out, h', w'), channels last
        out = out.reshape(n, depth - 2, out_channels, height - 2, width - 2).transpose(1, 2)
        if pairwise is False:
            return F.max_pool3d(out, 2)
        return max_pool_2x(out, out=pairwise if isinstance(pairwise, torch.Tensor) else None)


class CNN3D(nn.Module):
    """The Keras example's 3D CNN: four conv blocks, global average pooling, Dense 512, Dropout, Dense 1.

    It returns one logit per scan (``sigmoid`` gives P(abnormal)); train it with
    ``BCEWithLogitsLoss``. With ``grades`` above 2 it grades severity: ``grades - 1``
    cumulative logits per scan, the first still P(abnormal)'s (:class:`CumulativeLogits`).

    Args:
        in_channels: channels of the input volume.
        filters: filters of the four conv blocks.
        dense_units: units of the hidden dense layer.
        dropout: dropout rate before the output layer.
        bn_eps: BatchNorm epsilon (Keras default 1e-3).
        bn_momentum: BatchNorm momentum in PyTorch terms (Keras' 0.99 moving average is 0.01).
        norm: the blocks' normalisation, one of :data:`NORMS`; ``batch`` is the reference's,
            ``group`` does not depend on the batch (small batches, one scan).
        pooling: the global pooling, one of :data:`POOLINGS`; ``avg`` is the reference's.
        density_bins: with more than 0, a :class:`DensityBranch` of that many bins adds its
            logit to the head's (0: none, the reference's network).
        grades: 2 (normal, abnormal: the reference's one logit), or more ordered grades (a
            severity network: :class:`CumulativeLogits`, ``grades - 1`` logits per scan).
        ordinal_head: a severity network's head, one of :data:`ORDINAL_HEADS`.

    Example:
        >>> net = CNN3D()
        >>> net(torch.zeros(2, 1, 128, 128, 64)).shape
        torch.Size([2, 1])
    """

    def __init__(
        self,
        in_channels: int = 1,
        filters: Sequence[int] = (64, 64, 128, 256),
        dense_units: int = 512,
        dropout: float = 0.3,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        norm: str = "batch",
        pooling: str = "avg",
        density_bins: int = 0,
        grades: int = 2,
        ordinal_head: str = "softmax",
    ) -> None:
        super().__init__()
        channels = [in_channels, *filters]
        self.ordinal = CumulativeLogits(grades, ordinal_head) if grades > 2 else None
        self.features = nn.Sequential(
            *(
                ConvBlock3D(c_in, c_out, bn_eps=bn_eps, bn_momentum=bn_momentum, norm=norm)
                for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
            )
        )
        self.head = nn.Sequential(
            make_pooling(pooling, channels[-1]),
            nn.Flatten(),
            nn.Linear(channels[-1], dense_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense_units, 1 if self.ordinal is None else self.ordinal.inputs),
        )
        self.min_size = min_spatial_size(len(filters))
        self.density = DensityBranch(density_bins) if density_bins > 0 else None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` that names the problem when ``x`` cannot pass the network.

        Written in the subset of Python that TorchScript compiles, so exports keep the check.
        """
        if x.dim() != 5:
            raise ValueError(
                "CNN3D expects a (batch, channel, x, y, z) tensor, got "
                + str(x.dim())
                + " dimensions"
            )
        for size in x.shape[2:]:
            if size < self.min_size:
                raise ValueError(
                    "CNN3D needs at least "
                    + str(self.min_size)
                    + " voxels along each spatial axis (valid convolutions and 2x pooling in "
                    + str(len(self.features))
                    + " blocks); got spatial size "
                    + str(x.shape[2:])
                    + ". Use a larger spatial size."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        logit = self.head(self.features(x))
        if self.ordinal is not None:
            logit = self.ordinal(logit)
        if self.density is not None:
            logit = logit + self.density(x)
        return logit
