"""Training augmentation of the reference: an axial rotation by an angle from a fixed set."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Rotate

#: the patient's left-right axis of a preprocessed (n, c, x, y, z) batch: the reference's
#: 90-degree axial turn puts the stored x (R->L) on the second spatial axis
LEFT_RIGHT_DIM = 3


class RandDiscreteAxialRotated(RandomizableTransform, MapTransform):
    """Rotate volumes in the axial plane by an angle drawn from ``angles_deg``, keep the shape,
    pad with zeros and clip to ``clip_range``, as the reference's ``rotate()`` does.

    MONAI's ``RandRotated`` draws from a continuous range; the reference draws from a discrete
    set, hence this transform. One angle is drawn per call and applied to every key.

    Args:
        keys: keys of the volumes to rotate (channel-first, spatial axes x, y, z).
        angles_deg: the angles to choose from, in degrees.
        prob: probability of rotating at all (the reference always rotates).
        mode: interpolation mode (``bilinear`` or ``nearest``).
        clip_range: range to clip the result to; ``None`` leaves it unclipped.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        angles_deg: Sequence[float],
        prob: float = 1.0,
        mode: str = "bilinear",
        clip_range: Sequence[float] | None = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(angles_deg) == 0:
            raise ValueError("angles_deg must hold at least one angle")
        self.angles_deg = [float(a) for a in angles_deg]
        self.mode = mode
        self.clip_range = (
            None if clip_range is None else (float(clip_range[0]), float(clip_range[1]))
        )
        self.angle_deg = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.angle_deg = self.angles_deg[int(self.R.randint(len(self.angles_deg)))]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        # MONAI's 3D angles are rotations about (x, y, z): the axial (x-y) plane turns about z.
        rotate = Rotate(
            angle=(0.0, 0.0, math.radians(self.angle_deg)),
            keep_size=True,
            mode=self.mode,
            padding_mode="zeros",
        )
        for key in self.key_iterator(d):
            out = rotate(d[key])
            if self.clip_range is not None:
                out = (
                    out.clamp(*self.clip_range)
                    if isinstance(out, torch.Tensor)
                    else np.clip(out, *self.clip_range)
                )
            d[key] = out
        return d


class DeviceGenerators:
    """Seeded random generators, one per device, so a batch is augmented where it is (the GPU)
    without a host-device copy or synchronisation; reseeded together by ``set_random_state``
    (MONAI's ``Randomizable`` interface, which ``EpochSeeder`` calls every epoch).

    Args:
        seed: seed of every generator.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def set_random_state(self, seed: int | None = None, state: Any = None) -> DeviceGenerators:
        self.seed = int(seed or 0) % 2**63
        for generator in self._generators.values():
            generator.manual_seed(self.seed)
        return self

    def generator_on(self, device: torch.device) -> torch.Generator:
        """The generator on ``device`` (the CPU's draws are the same on every machine)."""
        device = torch.device("cpu") if device.type == "cpu" else device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


class BatchAxialRotation(DeviceGenerators):
    """The reference's random axial rotation for a whole batch at once, on the batch's device.

    One angle is drawn per scan from ``angles_deg``; all scans of the batch are resampled by one
    ``affine_grid`` + ``grid_sample`` call (bilinear, zero padding, shape kept, about the volume
    centre), then clipped to ``clip_range``: the same result as :class:`RandDiscreteAxialRotated`
    per scan, but it runs where the batch is (the GPU), so cached volumes never leave it.

    Args:
        angles_deg: the angles to choose from, in degrees.
        prob: probability of rotating each scan (the reference always rotates).
        clip_range: range to clip the result to; ``None`` leaves it unclipped.
        seed: seed of the angle generator (``set_random_state`` reseeds it, e.g. every epoch).

    Example:
        >>> rotate = BatchAxialRotation(angles_deg=(-10, 10), seed=0)
        >>> rotate(torch.rand(2, 1, 32, 32, 16)).shape
        torch.Size([2, 1, 32, 32, 16])
    """

    def __init__(
        self,
        angles_deg: Sequence[float],
        prob: float = 1.0,
        clip_range: Sequence[float] | None = (0.0, 1.0),
        seed: int = 0,
    ) -> None:
        if len(angles_deg) == 0:
            raise ValueError("angles_deg must hold at least one angle")
        self.angles_deg = torch.tensor([float(a) for a in angles_deg], dtype=torch.float64)
        self.prob = float(prob)
        self.clip_range = (
            None if clip_range is None else (float(clip_range[0]), float(clip_range[1]))
        )
        DeviceGenerators.__init__(self, seed)
        self._tables: dict[torch.device, torch.Tensor] = {}  # the angles, copied once per device

    def draw(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Angles in degrees for ``batch_size`` scans (0 where a scan is not rotated), drawn on
        ``device`` by a generator there (the CPU's draws are the same on every machine)."""
        generator = self.generator_on(torch.device(device))
        if generator.device not in self._tables:
            self._tables[generator.device] = self.angles_deg.to(generator.device)
        table = self._tables[generator.device]
        pick = torch.randint(len(table), (batch_size,), generator=generator, device=table.device)
        angles = table[pick]
        if self.prob < 1.0:
            keep = torch.rand(
                batch_size, generator=generator, dtype=torch.float64, device=table.device
            )
            angles = torch.where(keep < self.prob, angles, torch.zeros_like(angles))
        return angles

    def rotate(self, images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
        """Rotate each (C, x, y, z) volume of ``images`` by its angle about the z axis."""
        if images.dim() != 5:
            raise ValueError(f"expected a (batch, channel, x, y, z) batch, got {images.dim()} dims")
        n, _, sx, sy, sz = images.shape
        work = images if images.is_floating_point() else images.float()
        # the affine built where the images are; float64 where the device has it (not MPS)
        dtype = torch.float64 if images.device.type in ("cpu", "cuda") else work.dtype
        rad = torch.deg2rad(angles_deg.to(device=images.device, dtype=dtype))
        cos, sin = torch.cos(rad), torch.sin(rad)
        zero, one = torch.zeros_like(cos), torch.ones_like(cos)
        # affine_grid's coordinates run (z, y, x) = (W, H, D); normalised by each axis' half size,
        # so a rotation in voxel units is rescaled for non-square slices
        theta = torch.stack(
            [
                torch.stack([one, zero, zero, zero], -1),
                torch.stack([zero, cos, sin * sx / sy, zero], -1),
                torch.stack([zero, -sin * sy / sx, cos, zero], -1),
            ],
            1,
        )
        grid = torch.nn.functional.affine_grid(
            theta.to(work.dtype), [n, 1, sx, sy, sz], align_corners=False
        )
        out = torch.nn.functional.grid_sample(
            work, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        if self.clip_range is not None:
            out = out.clamp(*self.clip_range)
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.rotate(images, self.draw(images.shape[0], images.device))


class BatchAugmentation(DeviceGenerators):
    """Augmentation beyond the reference's rotation, for a whole batch on its device.

    Each scan of a (batch, channel, x, y, z) batch of [0, 1] intensities gets, independently:
    a left-right flip (x axis) with probability ``flip_prob``; a zoom about the volume centre by
    a factor drawn from [1 - ``scale``, 1 + ``scale``] (trilinear, zero padding, shape kept);
    another reconstruction kernel, the image plus ``k`` times its difference from an in-plane
    Gaussian of one voxel (:meth:`in_plane_blur`), ``k`` from [-``kernel``, ``kernel``] (above
    0 sharper, as an unsharp mask; below, smoother); its contrast about its mean multiplied by
    a factor from [1 - ``contrast``, 1 + ``contrast``];
    a shift of ``intensity_shift`` at most added; then clipped to ``clip_range``. A zero turns a
    step off; with all of them zero the batch is returned as it came. Draws come from a seeded
    generator on the batch's device (no host copy), reseeded by ``set_random_state``.

    Args:
        flip_prob: probability of flipping a scan left-right.
        scale: largest relative zoom (0.1: 0.9x to 1.1x).
        kernel: largest unsharp-mask amount (1.0: from the blur of a one-voxel Gaussian to an
            image with twice its fine detail).
        contrast: largest relative change of contrast about the scan's mean.
        intensity_shift: largest shift added to every voxel (intensities are in [0, 1]).
        clip_range: range to clip the result to; ``None`` leaves it unclipped.
        seed: seed of the generators.

    Example:
        >>> augment = BatchAugmentation(flip_prob=0.5, contrast=0.1, seed=0)
        >>> augment(torch.rand(2, 1, 32, 32, 16)).shape
        torch.Size([2, 1, 32, 32, 16])
    """

    def __init__(
        self,
        flip_prob: float = 0.0,
        scale: float = 0.0,
        contrast: float = 0.0,
        intensity_shift: float = 0.0,
        kernel: float = 0.0,
        clip_range: Sequence[float] | None = (0.0, 1.0),
        seed: int = 0,
    ) -> None:
        for name, value, high in (
            ("flip_prob", flip_prob, 1.0),
            ("scale", scale, 0.5),
            ("contrast", contrast, 1.0),
            ("intensity_shift", intensity_shift, 1.0),
            ("kernel", kernel, 2.0),
        ):
            if not 0.0 <= float(value) <= high:
                raise ValueError(f"{name} must be in [0, {high}], got {value!r}")
        self.flip_prob = float(flip_prob)
        self.scale = float(scale)
        self.contrast = float(contrast)
        self.intensity_shift = float(intensity_shift)
        self.kernel = float(kernel)
        self.clip_range = (
            None if clip_range is None else (float(clip_range[0]), float(clip_range[1]))
        )
        DeviceGenerators.__init__(self, seed)

    @property
    def active(self) -> bool:
        """Whether any step is on."""
        return any((self.flip_prob, self.scale, self.contrast, self.intensity_shift, self.kernel))

    def draw(self, batch_size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Each scan's parameters of the steps that are on, drawn on ``device``: ``flip``
        (bool), ``zoom``, ``kernel`` (unsharp-mask amounts), ``contrast`` (factors) and
        ``shift``."""
        generator = self.generator_on(torch.device(device))

        def uniform(half_width: float) -> torch.Tensor:
            u = torch.rand(batch_size, generator=generator, device=generator.device)
            return (2.0 * u - 1.0) * half_width

        params: dict[str, torch.Tensor] = {}
        if self.flip_prob > 0:
            u = torch.rand(batch_size, generator=generator, device=generator.device)
            params["flip"] = u < self.flip_prob
        if self.scale > 0:
            params["zoom"] = 1.0 + uniform(self.scale)
        if self.kernel > 0:
            params["kernel"] = uniform(self.kernel)
        if self.contrast > 0:
            params["contrast"] = 1.0 + uniform(self.contrast)
        if self.intensity_shift > 0:
            params["shift"] = uniform(self.intensity_shift)
        return params

    @staticmethod
    def zoom(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Zoom each volume of ``images`` by its factor about its centre (trilinear, zeros
        outside, shape kept): voxel ``i`` takes the value at ``c + (i - c) / factor``, ``c`` the
        centre, along every axis."""
        n = images.shape[0]
        # affine_grid maps output to input coordinates: a zoom by f samples at 1/f; the matrix
        # is built where the batch is (no host tensor copied over)
        scale = (1.0 / factors.to(images.device, images.dtype)).view(n, 1).expand(n, 3)
        theta = torch.cat([torch.diag_embed(scale), scale.new_zeros(n, 3, 1)], dim=2)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        return torch.nn.functional.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )

    @staticmethod
    def in_plane_blur(images: torch.Tensor) -> torch.Tensor:
        """Each volume of a (batch, channel, x, y, z) batch smoothed in the axial plane by a
        Gaussian of one voxel (7 taps, the edge voxel repeated beyond the edge), slices kept
        apart: as ``scipy.ndimage.gaussian_filter(v, (1, 1, 0), mode="nearest", truncate=3)``."""
        taps = torch.arange(-3, 4, device=images.device, dtype=images.dtype)
        weights = torch.exp(-0.5 * taps * taps)
        weights = weights / weights.sum()
        flat = images.reshape(-1, 1, *images.shape[2:])
        pad = torch.nn.functional.pad
        flat = torch.nn.functional.conv3d(
            pad(flat, (0, 0, 0, 0, 3, 3), mode="replicate"), weights.view(1, 1, 7, 1, 1)
        )
        flat = torch.nn.functional.conv3d(
            pad(flat, (0, 0, 3, 3, 0, 0), mode="replicate"), weights.view(1, 1, 1, 7, 1)
        )
        return flat.reshape(images.shape)

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The steps with the parameters of :meth:`draw`, then the clipping."""
        if images.dim() != 5:
            raise ValueError(f"expected a (batch, channel, x, y, z) batch, got {images.dim()} dims")
        out = images if images.is_floating_point() else images.float()
        shape = (images.shape[0], 1, 1, 1, 1)
        if "flip" in params:
            out = torch.where(params["flip"].view(shape), out.flip(LEFT_RIGHT_DIM), out)
        if "zoom" in params:
            out = self.zoom(out, params["zoom"])
        if "kernel" in params:
            amount = params["kernel"].view(shape).to(out.dtype)
            out = out + amount * (out - self.in_plane_blur(out))
        if "contrast" in params:
            mean = out.mean(dim=(1, 2, 3, 4), keepdim=True)
            out = (out - mean) * params["contrast"].view(shape).to(out.dtype) + mean
        if "shift" in params:
            out = out + params["shift"].view(shape).to(out.dtype)
        if self.clip_range is not None:
            out = out.clamp(*self.clip_range)
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return images
        return self.apply(images, self.draw(images.shape[0], images.device))
