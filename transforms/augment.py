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
        angles_deg: Sequence[float] = (-20, -10, -5, 5, 10, 20),
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
