"""A lung mask without learned weights (HU threshold, connected components, hole filling), and
the crop of a scan to its lungs' bounding box: more of the network's input voxels per lesion."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import MapTransform, SpatialCrop

#: voxels below this HU are air (outside the body, lungs, airways)
AIR_HU = -400.0
#: a lung component holds at least this share of the largest one (trachea and bowel gas less)
MIN_SHARE_OF_LARGEST = 0.1
#: a mask smaller than this share of the volume is no lung (a head, an abdomen): no crop
MIN_LUNG_FRACTION = 0.005


def lung_mask(volume: np.ndarray, air_hu: float = AIR_HU, step: int = 2) -> np.ndarray:
    """Boolean lung mask of a (x, y, z) HU volume whose third axis is axial (z).

    In each axial slice, air below ``air_hu`` that does not touch the slice's border (the air
    around the body does) is a candidate (slice by slice: a lung that meets the outside air in
    one slice loses that slice only); the largest 3D components of the candidates (each at
    least :data:`MIN_SHARE_OF_LARGEST` of the biggest) are the lungs; each slice's holes are
    filled, so vessels and opacities inside a lung belong to it. Computed on every ``step``-th
    voxel in plane, then repeated back to full size.
    """
    from scipy import ndimage

    small = np.asarray(volume)[::step, ::step, :]
    air = small < air_hu
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(air, structure=in_plane)
    if count == 0:
        return np.zeros(volume.shape, dtype=bool)
    border = np.unique(
        np.concatenate(
            [labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel()]
        )
    )
    inside = np.ones(count + 1, bool)
    inside[0] = False
    inside[border] = False
    candidates = inside[labels]
    labels, count = ndimage.label(candidates)
    if count == 0:
        return np.zeros(volume.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= MIN_SHARE_OF_LARGEST * sizes.max())
    mask = np.isin(labels, keep)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3, 1), bool), iterations=2)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    full = np.repeat(np.repeat(mask, step, axis=0), step, axis=1)
    return full[: volume.shape[0], : volume.shape[1], :]


def lung_box(
    volume: np.ndarray, margin: float = 0.05, air_hu: float = AIR_HU
) -> tuple[list[int], list[int]] | None:
    """``(start, end)`` of the lungs' bounding box in a (x, y, z) HU volume, widened by
    ``margin`` of each side's length; ``None`` when the mask holds less than
    :data:`MIN_LUNG_FRACTION` of the volume (no chest: the scan is left whole)."""
    mask = lung_mask(volume, air_hu)
    if mask.sum() < MIN_LUNG_FRACTION * mask.size:
        return None
    start, end = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        inside = np.flatnonzero(mask.any(axis=other))
        low, high = int(inside[0]), int(inside[-1]) + 1
        if axis == 0:  # left-right: mirrored about the body's centre, so a lung the mask lost
            # to dense findings (whose air is gone) stays inside the box
            body = np.flatnonzero((np.asarray(volume) > air_hu).any(axis=other))
            centre = (body[0] + body[-1] + 1) / 2 if len(body) else volume.shape[0] / 2
            low, high = min(low, int(2 * centre - high)), max(high, int(2 * centre - low))
        pad = int(round(margin * volume.shape[axis]))
        start.append(max(low - pad, 0))
        end.append(min(high + pad, volume.shape[axis]))
    return start, end


class CropToLungsd(MapTransform):
    """Crop channel-first HU images to the lungs' bounding box (:func:`lung_box` of the first
    channel), through MONAI's ``SpatialCrop`` so the affine follows. Scans without lungs are
    left whole. Place it after ``Orientationd`` (the third axis must be axial) and before the
    intensity window (the mask needs HU).

    Args:
        keys: image keys.
        margin: share of each side's length added around the lungs.
        air_hu: HU below which a voxel is air.
    """

    def __init__(
        self, keys: Sequence[Hashable] | Hashable, margin: float = 0.05, air_hu: float = AIR_HU
    ) -> None:
        super().__init__(keys)
        self.margin = margin
        self.air_hu = air_hu

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            box = lung_box(np.asarray(image[0]), self.margin, self.air_hu)
            if box is not None:
                d[key] = SpatialCrop(roi_start=box[0], roi_end=box[1])(image)
        return d
