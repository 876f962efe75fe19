"""Chest CT as a scanner may cut it: the shared real chest CT, the boxes a field of view leaves
(each side, front and back, apex and base), a reconstruction centred on the heart, and the Dice
score. One definition for tests/test_lung_mask.py and studies/lung_mask_real.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def chest(real_ct: Path, zoom: float = 1.0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The shared whole-chest CT (COPDGene, 64 x 64 x 79, 4.2 x 4.2 x 4.0 mm) in RAS, as
    float32 HU and its spacing; ``zoom`` > 1 resamples it finer in plane (linear)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(real_ct / "cip_ct-64_chest.nii.gz"))
    volume = np.asarray(img.dataobj, dtype=np.float32)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    if zoom != 1.0:
        volume = ndimage.zoom(volume, (zoom, zoom, 1), order=1)
        spacing = (spacing[0] / zoom, spacing[1] / zoom, spacing[2])
    return volume, spacing  # type: ignore[return-value]


def extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    inside = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return int(inside[0]), int(inside[-1]) + 1


#: RAS: x grows to the patient's left, y to the front, z to the head
SIDES = {"right": (0, 0), "left": (0, 1), "back": (1, 0), "front": (1, 1), "base": (2, 0),
         "apex": (2, 1)}  # fmt: skip


def cut_box(mask: np.ndarray, side: str, share: float) -> tuple[slice, slice, slice]:
    """The box a scanner's field of view leaves when it cuts ``share`` of the lungs' extent
    off ``side``."""
    axis, end = SIDES[side]
    low, high = extent(mask, axis)
    cut = int(round(share * (high - low)))
    box = [slice(None)] * 3
    box[axis] = slice(0, high - cut) if end else slice(low + cut, None)
    return tuple(box)  # type: ignore[return-value]


def heart_crop(volume: np.ndarray, full: np.ndarray) -> tuple[slice, slice, slice]:
    """A reconstruction centred on the heart: a quarter of the lungs' width off each side,
    a tenth off the front and back, as the issue's two contrast CTs."""
    (x0, x1), (y0, y1) = extent(full, 0), extent(full, 1)
    dx, dy = (x1 - x0) // 4, (y1 - y0) // 10
    return slice(x0 + dx, x1 - dx), slice(y0 + dy, y1 - dy), slice(None)
