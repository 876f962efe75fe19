"""The reference Keras example's 3D CNN ("3dcnn"), layer for layer, in PyTorch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def min_spatial_size(num_blocks: int = 4) -> int:
    """Smallest edge length that survives ``num_blocks`` of (valid 3x3x3 conv, 2x max-pool)."""
    size = 1
    for _ in range(num_blocks):
        size = size * 2 + 2
    return size


class ConvBlock3D(nn.Sequential):
    """Conv3D (kernel 3, valid) -> ReLU -> MaxPool3D(2) -> BatchNorm, as the reference stacks them.

    ReLU and max-pooling commute exactly (ReLU is monotone), so the block pools first and applies
    ReLU to 8x fewer values; the output equals the reference's conv -> ReLU -> pool order.

    Args:
        in_channels: channels of the input.
        out_channels: filters of the convolution.
        bn_eps: BatchNorm epsilon (Keras default 1e-3).
        bn_momentum: BatchNorm momentum in PyTorch terms (Keras' moving average 0.99 is 0.01).
    """

    def __init__(
        self, in_channels: int, out_channels: int, bn_eps: float = 1e-3, bn_momentum: float = 0.01
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3)
        self.pool = nn.MaxPool3d(2)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps, momentum=bn_momentum)


class CNN3D(nn.Module):
    """The spec's 3D CNN: four conv blocks, global average pooling, Dense 512, Dropout, Dense 1.

    It returns one logit per scan (``sigmoid`` gives P(abnormal)); train it with
    ``BCEWithLogitsLoss``.

    Args:
        in_channels: channels of the input volume.
        filters: filters of the four conv blocks.
        dense_units: units of the hidden dense layer.
        dropout: dropout rate before the output layer.
        bn_eps: BatchNorm epsilon (Keras default 1e-3).
        bn_momentum: BatchNorm momentum in PyTorch terms (Keras' 0.99 moving average is 0.01).

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
    ) -> None:
        super().__init__()
        channels = [in_channels, *filters]
        self.features = nn.Sequential(
            *(
                ConvBlock3D(c_in, c_out, bn_eps=bn_eps, bn_momentum=bn_momentum)
                for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
            )
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(channels[-1], dense_units),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense_units, 1),
        )
        self.min_size = min_spatial_size(len(filters))

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
        return self.head(self.features(x))
