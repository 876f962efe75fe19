"""The reference's HU window as one fused pass: clip, then scale to [b_min, b_max] in float32."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


class ClipScaleIntensityd(MapTransform):
    """Clip to [``a_min``, ``a_max``] and scale linearly to [``b_min``, ``b_max``], as float32.

    Equal to MONAI's ``ScaleIntensityRanged(..., clip=True)`` (to float32 rounding) for the
    reference's window; it clips integer volumes (HU stored as int16) before converting them, in
    one pass and in place, so a MosMed-sized scan takes a fraction of the time.

    Args:
        keys: keys of the volumes.
        a_min: lowest input value kept (HU).
        a_max: highest input value kept (HU).
        b_min: output value of ``a_min``.
        b_max: output value of ``a_max``.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        a_min: float,
        a_max: float,
        b_min: float = 0.0,
        b_max: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if a_max <= a_min:
            raise ValueError(f"a_max ({a_max}) must be above a_min ({a_min})")
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.b_min, self.b_max = float(b_min), float(b_max)

    def _clamps_in_place(self, dtype: torch.dtype) -> bool:
        """Whether the window can clip ``dtype`` before the float copy: a signed type that holds
        both ends (int16 HU, int32, int64). Other stored types (uint8, int8, uint16, uint32...)
        are converted to float32 first: their clamp would overflow or is not implemented."""
        if dtype not in (torch.int16, torch.int32, torch.int64):
            return False
        if not (self.a_min.is_integer() and self.a_max.is_integer()):
            return False
        info = torch.iinfo(dtype)
        return info.min <= self.a_min and self.a_max <= info.max

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        scale = (self.b_max - self.b_min) / (self.a_max - self.a_min)
        for key in self.key_iterator(d):
            img = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(d[key])
            if self._clamps_in_place(img.dtype):
                out = img.clamp(int(self.a_min), int(self.a_max)).to(torch.float32)
            else:
                out = img.to(torch.float32).clamp_(self.a_min, self.a_max)
            d[key] = out.sub_(self.a_min).mul_(scale).add_(self.b_min)
        return d
