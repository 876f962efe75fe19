"""Training augmentation of the reference: an axial rotation by an angle from a fixed set."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Rotate


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


class BatchAxialRotation:
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
        self.generator = torch.Generator().manual_seed(int(seed))

    def set_random_state(self, seed: int | None = None, state: Any = None) -> BatchAxialRotation:
        """Reseed the angle generator (MONAI's ``Randomizable`` interface, for ``EpochSeeder``)."""
        self.generator.manual_seed(int(seed or 0) % 2**63)
        return self

    def draw(self, batch_size: int) -> torch.Tensor:
        """Angles in degrees for ``batch_size`` scans (0 where a scan is not rotated)."""
        pick = torch.randint(len(self.angles_deg), (batch_size,), generator=self.generator)
        angles = self.angles_deg[pick]
        if self.prob < 1.0:
            keep = torch.rand(batch_size, generator=self.generator, dtype=torch.float64)
            angles = torch.where(keep < self.prob, angles, torch.zeros_like(angles))
        return angles

    def rotate(self, images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
        """Rotate each (C, x, y, z) volume of ``images`` by its angle about the z axis."""
        if images.dim() != 5:
            raise ValueError(f"expected a (batch, channel, x, y, z) batch, got {images.dim()} dims")
        n, _, sx, sy, sz = images.shape
        theta = torch.zeros(n, 3, 4, dtype=torch.float64)
        rad = torch.deg2rad(angles_deg.to(torch.float64))
        cos, sin = torch.cos(rad), torch.sin(rad)
        # affine_grid's coordinates run (z, y, x) = (W, H, D); normalised by each axis' half size,
        # so a rotation in voxel units is rescaled for non-square slices
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = cos
        theta[:, 1, 2] = sin * sx / sy
        theta[:, 2, 1] = -sin * sy / sx
        theta[:, 2, 2] = cos
        work = images if images.is_floating_point() else images.float()
        grid = torch.nn.functional.affine_grid(
            theta.to(device=images.device, dtype=work.dtype),
            [n, 1, sx, sy, sz],
            align_corners=False,
        )
        out = torch.nn.functional.grid_sample(
            work, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        if self.clip_range is not None:
            out = out.clamp(*self.clip_range)
        return out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.rotate(images, self.draw(images.shape[0]))
