"""A lung mask without learned weights (HU threshold, connected components, hole filling), and
the crop of a scan to its lungs' bounding box: more of the network's input voxels per lesion."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialCrop

#: voxels below this HU are air (outside the body, lungs, airways)
AIR_HU = -400.0
#: a lung component holds at least this share of the largest one (trachea and bowel gas less)
MIN_SHARE_OF_LARGEST = 0.1
#: a mask smaller than this share of the volume is no lung (a head, an abdomen): no crop
MIN_LUNG_FRACTION = 0.005
#: ``lung_only`` keeps this many voxels (in plane) around the lung mask
LUNG_ONLY_DILATE = 2
#: flattening leaves out of its second background estimate the voxels this far above the first
#: (findings and vessels: the background is the lung's own)
FLATTEN_ABOVE_HU = 80.0
#: the lung's level after flattening (HU): a normal lung's, inside every window
FLATTEN_LEVEL_HU = -850.0
#: flattening estimates the background on a grid of voxels at most sigma / this (mm): a smooth
#: background needs no finer grid, and a 512 x 512 scan costs a coarse grid's time
FLATTEN_GRID_PER_SIGMA = 4.0


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
    volume: np.ndarray,
    margin: float = 0.05,
    air_hu: float = AIR_HU,
    mask: np.ndarray | None = None,
) -> tuple[list[int], list[int]] | None:
    """``(start, end)`` of the lungs' bounding box in a (x, y, z) HU volume, widened by
    ``margin`` of each side's length; ``None`` when the mask holds less than
    :data:`MIN_LUNG_FRACTION` of the volume (no chest: the scan is left whole). ``mask``: the
    volume's :func:`lung_mask`, when already made."""
    if mask is None:
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


def _block_sums(array: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Sums over blocks of ``factors`` voxels (the last blocks of an axis padded with zeros)."""
    if all(f == 1 for f in factors):
        return array
    padded = np.pad(array, [(0, -n % f) for n, f in zip(array.shape, factors, strict=True)])
    shape: list[int] = []
    for n, f in zip(padded.shape, factors, strict=True):
        shape += [n // f, f]
    return padded.reshape(shape).sum(axis=(1, 3, 5))


def _upsample(coarse: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of block values (each at its block's centre) back to ``shape``,
    edge values held beyond the outer centres; axes with factor 1 are taken as they are."""
    out = coarse
    for axis, (f, n) in enumerate(zip(factors, shape, strict=True)):
        if f == 1:
            continue
        at = np.clip((np.arange(n) - (f - 1) / 2) / f, 0, out.shape[axis] - 1)
        low = np.floor(at).astype(np.intp)
        high = np.minimum(low + 1, out.shape[axis] - 1)
        w = (at - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=axis) * (1 - w) + np.take(out, high, axis=axis) * w
    return out


def _background(
    volume: np.ndarray, keep: np.ndarray, sigma_mm: float, spacing: Sequence[float]
) -> np.ndarray:
    """The normalised Gaussian convolution of ``volume`` over the voxels ``keep`` marks: each
    voxel's smooth local mean of the kept voxels around it."""
    from scipy import ndimage

    grid_mm = sigma_mm / FLATTEN_GRID_PER_SIGMA
    # at most one cell per axis: a header claiming micrometre voxels costs no padding
    factors = [
        min(n, max(1, int(grid_mm // float(s)))) for n, s in zip(volume.shape, spacing, strict=True)
    ]
    weight = _block_sums(keep.astype(np.float32), factors)
    values = _block_sums(np.where(keep, volume, 0).astype(np.float32), factors)
    sigma = [sigma_mm / (float(s) * f) for s, f in zip(spacing, factors, strict=True)]
    smooth = ndimage.gaussian_filter(values, sigma) / np.maximum(
        ndimage.gaussian_filter(weight, sigma), 1e-3 * np.prod(factors)
    )
    return _upsample(smooth, factors, volume.shape)


def flatten_lungs(
    volume: np.ndarray, mask: np.ndarray, spacing: Sequence[float], sigma_mm: float
) -> np.ndarray:
    """``volume`` (HU, float32) with each lung voxel (``mask``) moved by its lung's smooth
    local background: ``HU - background + FLATTEN_LEVEL_HU``. The background is the normalised
    Gaussian convolution (``sigma_mm``, per axis in voxels from ``spacing``) of the lung's HU,
    estimated twice, the second time without the voxels more than :data:`FLATTEN_ABOVE_HU`
    above the first (findings and vessels). Gravity-dependent density and expiration, which
    shift a lung's histogram as findings do, vanish; findings smaller than the kernel stay.
    Voxels outside the mask are kept."""
    out = np.asarray(volume, dtype=np.float32).copy()
    if not mask.any():
        return out
    first = _background(out, mask, sigma_mm, spacing)
    second = _background(out, mask & (out < first + FLATTEN_ABOVE_HU), sigma_mm, spacing)
    out[mask] += FLATTEN_LEVEL_HU - second[mask]
    return out


def outside_lungs(
    mask: np.ndarray,
    volume: np.ndarray,
    dilate: int = LUNG_ONLY_DILATE,
    air_hu: float = AIR_HU,
) -> np.ndarray:
    """Voxels that ``lung_only`` blanks: those farther than ``dilate`` voxels in plane from the
    lung mask united with its left-right mirror about the body's centre (as :func:`lung_box`'s
    box): a lung whose air the threshold lost (dense consolidation, or air that meets the
    outside in a slice) keeps the place its mirror image marks, and the margin keeps findings
    at the lung's edge."""
    from scipy import ndimage

    other = (1, 2)
    body = np.flatnonzero((np.asarray(volume) > air_hu).any(axis=other))
    keep = mask.copy()
    if len(body):
        # x -> body[0] + body[-1] - x: the mirror about the body's centre, inside the volume
        shift = int(body[0] + body[-1]) - (mask.shape[0] - 1)
        mirrored = mask[::-1]
        if shift >= 0:
            keep[shift:] |= mirrored[: mask.shape[0] - shift]
        else:
            keep[: mask.shape[0] + shift] |= mirrored[-shift:]
    if dilate > 0:
        keep = ndimage.binary_dilation(keep, structure=np.ones((3, 3, 1), bool), iterations=dilate)
    return ~keep


class CropToLungsd(MapTransform):
    """Crop channel-first HU images to the lungs' bounding box (:func:`lung_box` of the first
    channel), through MONAI's ``SpatialCrop`` so the affine follows, and/or set every voxel
    outside the lungs (:func:`outside_lungs`) to ``outside``, and/or subtract each lung's
    smooth background (:func:`flatten_lungs`, on the voxel spacing of the image's affine).
    Scans without lungs are left whole, unblanked and unflattened. Place it after
    ``Orientationd`` (the third axis must be axial) and before the intensity window (the mask
    needs HU).

    Args:
        keys: image keys.
        margin: share of each side's length added around the lungs.
        air_hu: HU below which a voxel is air.
        crop: crop to the lungs' box.
        outside: value for the voxels outside the lungs (HU); ``None`` leaves them.
        flatten_mm: > 0: flatten the lungs with a Gaussian background of this sigma (mm).
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        margin: float = 0.05,
        air_hu: float = AIR_HU,
        crop: bool = True,
        outside: float | None = None,
        flatten_mm: float = 0.0,
    ) -> None:
        super().__init__(keys)
        if not (math.isfinite(flatten_mm) and flatten_mm >= 0):
            raise ValueError(f"flatten_mm must be a finite number >= 0, got {flatten_mm!r}")
        self.margin = margin
        self.air_hu = air_hu
        self.crop = crop
        self.outside = outside
        self.flatten_mm = float(flatten_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.flatten_mm > 0 and not isinstance(image, MetaTensor):
                raise TypeError("flattening the lungs needs the voxel spacing: a MetaTensor image")
            volume = np.asarray(image[0])
            mask = lung_mask(volume, self.air_hu)
            box = lung_box(volume, self.margin, self.air_hu, mask=mask)
            if box is None:
                continue
            if self.outside is not None:
                blank = outside_lungs(mask, volume, air_hu=self.air_hu)
                if isinstance(image, torch.Tensor):
                    image = image.clone()
                    image[:, torch.as_tensor(blank)] = self.outside
                else:
                    image = np.array(image, copy=True)
                    image[:, blank] = self.outside
            if self.crop:
                image = SpatialCrop(roi_start=box[0], roi_end=box[1])(image)
                mask = mask[tuple(slice(a, b) for a, b in zip(*box, strict=True))]
            if self.flatten_mm > 0:
                image = self._flatten(image, mask)
            d[key] = image
        return d

    def _flatten(self, image: MetaTensor, mask: np.ndarray) -> MetaTensor:
        spacing = [float(s) for s in np.asarray(image.pixdim)[:3]]
        flat = [flatten_lungs(np.asarray(c), mask, spacing, self.flatten_mm) for c in image]
        out = MetaTensor(torch.from_numpy(np.stack(flat)))
        out.copy_meta_from(image)
        return out
