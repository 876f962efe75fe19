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
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        # per device: the angle table and a generator there, so a GPU batch is rotated without
        # any host-device copy or synchronisation
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Generator]] = {}

    def set_random_state(self, seed: int | None = None, state: Any = None) -> BatchAxialRotation:
        """Reseed the angle generators (MONAI's ``Randomizable`` interface, for ``EpochSeeder``)."""
        self.seed = int(seed or 0) % 2**63
        self.generator.manual_seed(self.seed)
        for _, generator in self._on_device.values():
            generator.manual_seed(self.seed)
        return self

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Generator]:
        device = torch.device(device)
        if device.type == "cpu":
            return self.angles_deg, self.generator
        if device not in self._on_device:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            self._on_device[device] = (self.angles_deg.to(device), generator)
        return self._on_device[device]

    def draw(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Angles in degrees for ``batch_size`` scans (0 where a scan is not rotated), drawn on
        ``device`` by a generator there (the CPU's draws are the same on every machine)."""
        table, generator = self._tables(torch.device(device))
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
