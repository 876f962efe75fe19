"""A lung mask without learned weights (HU threshold, connected components, hole filling), and
the crop of a scan to its lungs' bounding box: more of the network's input voxels per lesion."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
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
#: below this HU a voxel lies outside the reconstruction's field of view (scanners pad it with
#: -2000 or -3024): neither air nor tissue, it cuts the lungs as the image's edge does
PADDING_HU = -1500.0
#: air that meets the image's edge is lung, not the air around the body, when at least this
#: share of its 3D component has tissue on three of its four sides in plane (lungs cut by the
#: field of view: 0.54-1.00 on the real chest CT cut 10-40 % on any side, or all around; the
#: air around the body: 0.00-0.25 on the real scans and generated ones)
ENCLOSED_SHARE = 0.4
#: tissue in pieces smaller than this share of its slice's largest (a table, a cable, an arm)
#: encloses no lung
BODY_PIECE_SHARE = 0.1
#: ... and is at least this thick (mm) along both in-plane axes (a table's air is thinner)
MIN_CUT_LUNG_MM = 25.0
#: the mask's in-plane grid is at most this fine (mm): a coarser grid costs less, loses no lung
MASK_GRID_MM = 2.5
#: each slice's lung pieces are closed with a disc of this radius (mm), one piece at a time:
#: vessels and findings at the pleura up to about this size belong to the lung
CLOSING_MM = 8.0
#: a notch in a lung piece's outline (between it and its convex hull, not facing the body's
#: centre) is filled when no larger than this share of the piece: a finding at the pleura
NOTCH_SHARE = 0.25
#: ... in a piece that fills at least this share of its convex hull (a lung's section, not the
#: crescent of a lung base)
MIN_SOLIDITY = 0.7
#: ... and of at least this many voxels of the mask's grid (an airway's section has no notches)
MIN_NOTCH_PIECE = 50
#: without a spacing, a slice is taken to span this field of view (mm) and to be this thick
DEFAULT_FOV_MM = 350.0
DEFAULT_SLICE_MM = 5.0
#: voxel sizes (mm) a CT can have; a header outside them is ignored (its grid and closing would
#: be absurd: one cell, or a disc of millions of voxels)
PLAUSIBLE_MM = (0.05, 50.0)
#: the mask is doubted when the lungs meet the image's edge in more than this share of the
#: slices holding them, ...
EDGE_SLICE_SHARE = 0.5
#: ... when one side of the body holds less than this share of the other side's lung, ...
SIDE_RATIO = 0.25
#: a slice holds lung when the mask covers this share of the body's cross-section (bowel gas less)
LUNG_AREA_FRACTION = 0.10
#: little or no lung: lung in fewer than this share of the axial slices ...
LUNG_SLICE_FRACTION = 0.25
#: ... and over fewer millimetres than this (a chest CT that also covers the abdomen and pelvis
#: holds lung in few of its slices, but over 10 cm or more; lungs are 20-30 cm tall)
LUNG_EXTENT_MM = 80.0
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


@dataclass(frozen=True)
class Lungs:
    """The lung mask of a scan and what says how far to trust it.

    Args:
        mask: boolean (x, y, z) lung mask on the scan's grid.
        share: per axial slice, the mask's share of the body's cross-section (tissue and lung).
        edge: per axial slice, whether the mask meets the image's edge or the padding outside
            the reconstruction's field of view (the scan cuts the lungs there).
        spacing: the voxel spacing (mm) the mask was made with.
        centre: the body's left-right centre (first axis, in voxels): the sides are compared
            about it.
    """

    mask: np.ndarray
    share: np.ndarray
    edge: np.ndarray
    spacing: tuple[float, float, float]
    centre: float

    def doubts(self) -> list[str]:
        """Why the mask may be wrong, each a warning a user can act on; empty when none.

        A slice holds lung when the mask covers :data:`LUNG_AREA_FRACTION` of the body's
        cross-section there. Little or no lung: lung in fewer than :data:`LUNG_SLICE_FRACTION` of the axial slices
        and over less than :data:`LUNG_EXTENT_MM` (not a chest CT, or only its lung bases or
        apices). The lungs meet the image's edge in more than :data:`EDGE_SLICE_SHARE` of the
        slices holding them (the field of view cuts them: what lies outside it is missing). One
        side of the body holds less than :data:`SIDE_RATIO` of the other side's lung (a lung
        lost to dense findings, collapse, effusion or surgery, or missed by the mask)."""
        holding = self.share >= LUNG_AREA_FRACTION
        found, total = int(holding.sum()), len(holding)
        extent = found * self.spacing[2]
        if found < LUNG_SLICE_FRACTION * total and extent < LUNG_EXTENT_MM:
            return [
                f"little or no lung (in {found} of {total} axial slices, {extent:.0f} mm): not a "
                "chest CT? the model was made for chest CT"
            ]
        out = []
        edge = int((self.edge & holding).sum())
        if edge > EDGE_SLICE_SHARE * found:
            out.append(
                f"the field of view cuts the lungs (they meet the image's edge in "
                f"{edge} of the {found} slices holding them): the lung mask may "
                "miss what lies outside it, the scan is not cropped to it"
            )
        half = int(round(self.centre))
        sides = np.array([self.mask[:half].sum(), self.mask[half:].sum()])
        if sides.min() < SIDE_RATIO * sides.max():
            out.append(
                f"one side of the body holds {sides.min() / sides.max():.0%} of the other side's "
                "lung: a lung lost to dense findings, collapse or effusion, or one the lung mask "
                "missed; the scan is not cropped to it"
            )
        return out


def _enclosed(tissue: np.ndarray) -> np.ndarray:
    """Voxels with tissue in at least three of the four in-plane directions (along their row
    and their column, either way): a lung cut on one side by the field of view has tissue on
    the other three (chest wall, mediastinum), the air between a table's plates on two."""
    sides = np.zeros(tissue.shape, np.uint8)
    for axis in (0, 1):
        sides += np.logical_or.accumulate(tissue, axis=axis)
        sides += np.flip(np.logical_or.accumulate(np.flip(tissue, axis), axis=axis), axis)
    return sides >= 3


def _lung_air(
    air: np.ndarray, seen: np.ndarray, min_thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """The air that may be lung (or airway, or bowel gas), and where each slice's edge lies.

    Air enclosed by tissue in its axial slice is lung, as is every 3D component of air that
    meets no edge. A 3D component that meets the image's edge (or the padding beyond the field
    of view) is the air around the body, unless at least :data:`ENCLOSED_SHARE` of it has tissue
    on three sides in plane (:func:`_enclosed`) and it is at least ``min_thickness`` voxels
    thick along both in-plane axes: a lung cut by the field of view keeps chest wall and
    mediastinum around most of it, the air around the body (and between a table's plates)
    does not. Decided per 3D component, so a slice whose lung meets the edge on three sides
    keeps it; the per-slice rule keeps a lung that meets the outside air through a gap."""
    from scipy import ndimage

    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    edge = ndimage.binary_dilation(~seen, structure=in_plane)
    edge[0] = edge[-1] = edge[:, 0] = edge[:, -1] = True
    pieces, count = ndimage.label(air, structure=in_plane)
    if count == 0:
        return np.zeros_like(air), edge
    body = _body_tissue(seen & ~air, in_plane)
    open_piece = np.zeros(count + 1, bool)
    open_piece[pieces[edge & air]] = True
    lung = ~open_piece[pieces] & air
    labels, count = ndimage.label(air)
    touching = np.unique(labels[edge & air])
    touching = touching[touching > 0]
    if len(touching):
        flat = labels.ravel()
        size = np.bincount(flat, minlength=count + 1)
        enclosed = np.bincount(flat, weights=_enclosed(body).ravel(), minlength=count + 1)
        keep = np.ones(count + 1, bool)
        keep[0] = False
        keep[touching] = enclosed[touching] >= ENCLOSED_SHARE * size[touching]
        candidates = np.isin(labels, touching[keep[touching]])
        thick = _thickness(labels, candidates, count) >= min_thickness
        keep[touching] &= thick[touching]
        lung |= keep[labels]
    else:
        lung = air.copy()
    return lung, edge


def _body_tissue(tissue: np.ndarray, in_plane: np.ndarray) -> np.ndarray:
    """Each axial slice's tissue in pieces of at least :data:`BODY_PIECE_SHARE` of its largest:
    the body (and what the field of view left of it), not the table, a cable or a thin arm."""
    from scipy import ndimage

    labels, count = ndimage.label(tissue, structure=in_plane)
    if count == 0:
        return tissue
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)
    sizes[0] = 0
    ids, first = np.unique(flat, return_index=True)
    slice_of = np.zeros(count + 1, np.intp)
    slice_of[ids] = first % labels.shape[2]
    largest = np.zeros(labels.shape[2], np.int64)
    np.maximum.at(largest, slice_of[1:], sizes[1:])
    keep = sizes >= BODY_PIECE_SHARE * largest[slice_of]
    keep[0] = False
    return keep[labels]


def _thickness(labels: np.ndarray, where: np.ndarray, count: int) -> np.ndarray:
    """Per label, the lesser of its widest extent along either in-plane axis (the most voxels of
    ``where`` on one row, or one column, of one slice); a large number for labels ``where``
    leaves out."""
    out = np.full(count + 1, np.iinfo(np.int64).max, dtype=np.int64)
    index = np.nonzero(where)
    if not len(index[0]):
        return out
    found = labels[index]
    widest = []
    for axis in (0, 1):  # voxels per line across the axis: counted along the other one
        line = index[1 - axis] * labels.shape[2] + index[2]
        keys, counts = np.unique(found * (labels.shape[1 - axis] * labels.shape[2]) + line,
                                 return_counts=True)  # fmt: skip
        per_label = np.zeros(count + 1, np.int64)
        np.maximum.at(per_label, keys // (labels.shape[1 - axis] * labels.shape[2]), counts)
        widest.append(per_label)
    seen = np.unique(found)
    out[seen] = np.minimum(widest[0], widest[1])[seen]
    return out


def _convex_hull(piece: np.ndarray) -> np.ndarray:
    """The pixels whose centres lie inside the convex hull of a 2D boolean ``piece`` (of its
    pixels' corners), rasterised row by row."""
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(piece.any(axis=1))
    first = piece[rows].argmax(axis=1)
    last = piece.shape[1] - 1 - piece[rows, ::-1].argmax(axis=1)
    corners = np.concatenate(
        [np.stack([rows + dr, cols + dc], axis=1)
         for dr in (-0.5, 0.5) for cols, dc in ((first, -0.5), (last, 0.5))]
    ).astype(np.float64)  # fmt: skip
    try:
        hull = ConvexHull(corners)
    except (QhullError, ValueError):  # a line of pixels: no area
        return piece.copy()
    ring = corners[hull.vertices]
    start, end = ring, np.roll(ring, -1, axis=0)
    at = np.arange(piece.shape[0], dtype=np.float64)[:, None]
    low, high = np.minimum(start[:, 0], end[:, 0]), np.maximum(start[:, 0], end[:, 0])
    crosses = (at >= low) & (at <= high) & (high > low)
    t = (at - start[:, 0]) / np.where(high > low, end[:, 0] - start[:, 0], 1.0)
    col = start[:, 1] + t * (end[:, 1] - start[:, 1])
    left = np.where(crosses, col, np.inf).min(axis=1)
    right = np.where(crosses, col, -np.inf).max(axis=1)
    cols = np.arange(piece.shape[1])
    inside = (cols >= left[:, None] - 1e-9) & (cols <= right[:, None] + 1e-9)
    return inside | piece


def _fill_notches(piece: np.ndarray, towards_centre: int) -> np.ndarray:
    """``piece`` (one lung's section) with the notches in its lateral outline filled: the
    regions between it and its convex hull, each no larger than :data:`NOTCH_SHARE` of the
    piece, whose centre lies on the lateral half of the piece. A finding that replaces lung at
    the costal pleura leaves such a notch; the heart's and the great vessels' impressions lie
    on the medial half, the liver's dome under a lung base is larger than the limit, so neither
    is filled (nor is a medial finding: the crop still holds it), nor are the notches of a
    crescent (a piece filling less than :data:`MIN_SOLIDITY` of its hull: a lung base over the
    liver's dome, whose hollow is no finding). ``towards_centre``: +1 or -1,
    the first axis' direction towards the body's left-right centre."""
    from scipy import ndimage

    if piece.sum() < MIN_NOTCH_PIECE:
        return piece
    hull = _convex_hull(piece)
    if piece.sum() < MIN_SOLIDITY * hull.sum():  # a crescent (a lung base over the liver)
        return piece
    gaps, count = ndimage.label(hull & ~piece)
    if count == 0:
        return piece
    area = piece.sum()
    middle = np.argwhere(piece)[:, 0].mean()
    out = piece.copy()
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(gaps), gaps, index)
    spots = ndimage.center_of_mass(np.ones_like(gaps), gaps, index)
    for label, size, spot in zip(index, sizes, spots, strict=True):
        lateral = (spot[0] - middle) * towards_centre < 0
        if size <= NOTCH_SHARE * area and lateral:
            out |= gaps == label
    return out


def _close_pieces(mask: np.ndarray, radius: float, centre: float) -> np.ndarray:
    """Each axial slice's lung pieces closed with a disc of ``radius`` voxels, their holes and
    their notches (:func:`_fill_notches`) filled, one piece at a time (two lungs are never
    joined, the mediastinum never filled). A piece that meets the image's edge is taken to go
    on beyond it. ``centre``: the body's left-right centre on the first axis (voxels)."""
    from scipy import ndimage

    out = mask.copy()
    radius = min(radius, max(mask.shape[:2]) / 4)  # bounded work, whatever the spacing
    pad = int(math.ceil(radius)) + 2
    for z in range(mask.shape[2]):
        labels, count = ndimage.label(mask[:, :, z])
        for i, found in enumerate(ndimage.find_objects(labels), start=1):
            if found is None:
                continue
            box = tuple(
                slice(max(s.start - pad, 0), min(s.stop + pad, n))
                for s, n in zip(found, mask.shape[:2], strict=True)
            )
            piece = np.pad(labels[box] == i, pad, mode="edge")
            grown = ndimage.distance_transform_edt(~piece) <= radius
            closed = ndimage.binary_fill_holes(ndimage.distance_transform_edt(grown) > radius)
            closed = closed[pad:-pad, pad:-pad]
            # each side's part on its own: a piece across the centre holds both lungs
            cut = int(np.clip(round(centre) - box[0].start, 0, closed.shape[0]))
            if cut > 0:
                closed[:cut] = _fill_notches(closed[:cut], 1)
            if cut < closed.shape[0]:
                closed[cut:] = _fill_notches(closed[cut:], -1)
            out[box + (z,)] |= closed
    return out


def find_lungs(
    volume: np.ndarray, air_hu: float = AIR_HU, spacing: Sequence[float] | None = None
) -> Lungs:
    """The lungs of a (x, y, z) HU volume whose third axis is axial (z), without learned weights.

    In each axial slice, air below ``air_hu`` (and above :data:`PADDING_HU`, the padding beyond
    the field of view) is lung when tissue encloses it, or, where it meets the image's edge,
    when most of it lies between tissue (:func:`_lung_air`): a field of view that cuts the
    lungs keeps them, the air around the body does not. The largest 3D components of that air
    (each at least :data:`MIN_SHARE_OF_LARGEST` of the biggest) are the lungs; each slice's
    pieces are closed with a :data:`CLOSING_MM` disc and their holes filled, so vessels and
    findings inside a lung or at its pleura belong to it. Computed on a grid of at most
    :data:`MASK_GRID_MM` in plane, then repeated back to full size.

    Args:
        volume: HU volume, third axis axial.
        air_hu: HU below which a voxel is air.
        spacing: voxel spacing in mm; ``None`` (or one outside :data:`PLAUSIBLE_MM`): a
            :data:`DEFAULT_FOV_MM` field of view in plane and 5-mm slices.
    """
    from scipy import ndimage

    vol = np.asarray(volume)
    spacing = plausible_spacing(spacing, vol.shape)
    if vol.ndim != 3 or vol.size == 0:
        raise ValueError(f"find_lungs needs a non-empty (x, y, z) volume, got shape {vol.shape}")
    step = max(1, int(MASK_GRID_MM / min(spacing[0], spacing[1])))
    small = vol[::step, ::step, :]
    seen = small >= PADDING_HU
    pixel = min(spacing[0], spacing[1]) * step
    lung, edge = _lung_air(seen & (small < air_hu), seen, MIN_CUT_LUNG_MM / pixel)
    labels, count = ndimage.label(lung)
    tissue = seen & (small >= air_hu)
    body = np.flatnonzero(tissue.any(axis=(1, 2)))
    centre = (body[0] + body[-1] + 1) / 2 * step if len(body) else vol.shape[0] / 2
    if count == 0:
        mask = np.zeros(small.shape, dtype=bool)
    else:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        mask = np.isin(labels, np.flatnonzero(sizes >= MIN_SHARE_OF_LARGEST * sizes.max()))
        mask = _close_pieces(mask, CLOSING_MM / pixel, centre / step)
    area = mask.sum(axis=(0, 1))
    share = area / np.maximum(area + (tissue & ~mask).sum(axis=(0, 1)), 1)
    mask &= seen  # closing and notches never reach beyond the field of view
    full = np.repeat(np.repeat(mask, step, axis=0), step, axis=1)[: vol.shape[0], : vol.shape[1]]
    return Lungs(full, share, (mask & edge).any(axis=(0, 1)), spacing, centre)  # type: ignore[arg-type]


def plausible_spacing(
    spacing: Sequence[float] | None, shape: Sequence[int]
) -> tuple[float, float, float]:
    """``spacing`` (mm, sign dropped) when every axis is inside :data:`PLAUSIBLE_MM`; otherwise
    (``None``, a header no CT has: micrometre or metre voxels, zero, NaN) a
    :data:`DEFAULT_FOV_MM` field of view in plane and :data:`DEFAULT_SLICE_MM` slices. What the
    lung mask and the flattening work on, so a header bounds neither's time nor memory."""
    if spacing is not None and all(
        math.isfinite(float(v)) and PLAUSIBLE_MM[0] <= abs(float(v)) <= PLAUSIBLE_MM[1]
        for v in spacing[:3]
    ):
        return tuple(float(abs(s)) for s in spacing[:3])  # type: ignore[return-value]
    pixel = DEFAULT_FOV_MM / max(max(shape[:2], default=1), 1)
    return (pixel, pixel, DEFAULT_SLICE_MM)


def lung_mask(
    volume: np.ndarray, air_hu: float = AIR_HU, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Boolean lung mask of a (x, y, z) HU volume whose third axis is axial
    (:func:`find_lungs`)."""
    return find_lungs(volume, air_hu, spacing).mask


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
    # a Gaussian wider than twice its axis is that axis' mean (reflected borders): clamped, a
    # kernel never outgrows the volume, whatever the spacing
    sigma = [
        min(sigma_mm / (float(s) * f), 2.0 * n)
        for s, f, n in zip(spacing, factors, weight.shape, strict=True)
    ]
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
    Voxels outside the mask are kept. A ``spacing`` no CT has is replaced as the lung mask
    replaces it (:func:`plausible_spacing`): time and memory are bounded by the volume's size."""
    out = np.asarray(volume, dtype=np.float32).copy()
    if not mask.any():
        return out
    spacing = plausible_spacing(spacing, out.shape)
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
    Scans without lungs are left whole, unblanked and unflattened; a scan whose mask is in doubt
    (:meth:`Lungs.doubts`: the field of view cuts the lungs, one side holds little lung, little
    lung at all) is left whole and unblanked (flattened where asked). Place it after
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
            spacing = _spacing(image)
            lungs = find_lungs(volume, self.air_hu, spacing)
            mask = lungs.mask
            box = lung_box(volume, self.margin, self.air_hu, mask=mask)
            if box is None:
                continue
            if lungs.doubts():  # a wrong box or blank loses lung: the scan stays whole
                if self.flatten_mm > 0:
                    d[key] = self._flatten(image, mask, lungs.spacing)
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
                image = self._flatten(image, mask, lungs.spacing)
            d[key] = image
        return d

    def _flatten(self, image: MetaTensor, mask: np.ndarray, spacing: Sequence[float]) -> MetaTensor:
        """Each channel flattened on the spacing the lung mask used (:func:`plausible_spacing`)."""
        flat = [flatten_lungs(np.asarray(c), mask, spacing, self.flatten_mm) for c in image]
        out = MetaTensor(torch.from_numpy(np.stack(flat)))
        out.copy_meta_from(image)
        return out


def _spacing(image: Any) -> tuple[float, float, float] | None:
    """The voxel spacing (mm) of a MetaTensor image's affine; ``None`` for a plain array."""
    if not isinstance(image, MetaTensor):
        return None
    return tuple(float(s) for s in np.asarray(image.pixdim)[:3])  # type: ignore[return-value]
