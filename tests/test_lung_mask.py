"""transforms.lung on chest CT as it is acquired (issue 30): fields of view that cut the lungs,
small reconstructions padded beyond their circle, thin and thick slices, small and large
chests, emphysema, contrast, the table, dense findings at the pleura; a mask in doubt says so
and the crop keeps the whole scan. Scored against the full scan's own mask (the mask of a
cropped scan must be the full mask cropped) and against TotalSegmentator's segmentation of a
real scan, references no one here drew."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from testdata.chest_variants import SIDES, chest, cut_box, dice, extent, heart_crop
from transforms.lung import CropToLungsd, find_lungs, lung_box, lung_mask


@pytest.mark.parametrize("share", [0.1, 0.25, 0.4])
@pytest.mark.parametrize("side", list(SIDES))
def test_the_mask_of_a_cropped_real_chest_is_the_full_masks_crop(real_ct, side, share):
    """Cut 10-40 % of the lungs' extent off each side of a real chest CT: inside the crop, its
    mask is the full scan's (Dice >= 0.95; 0.97-1.00 seen). The mask that took air meeting a
    slice's edge for the air around the body scored 0.15-0.63 on the front, back and sides."""
    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    box = cut_box(full, side, share)
    assert dice(lung_mask(volume[box], spacing=spacing), full[box]) >= 0.95


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("side", ["right", "left", "back", "front"])
def test_the_mask_of_a_cropped_generated_chest_is_the_full_masks_crop(side, seed):
    """The same on generated chests (both classes, dense findings among them)."""
    from app.data.synth import generate_scan

    for label in (0, 1):
        scan = generate_scan(label, seed, shape=(128, 128, 40), difficulty=0.3)
        volume = scan.volume.astype(np.float32)
        spacing = tuple(np.linalg.norm(scan.affine[:3, :3], axis=0))
        full = lung_mask(volume, spacing=spacing)
        # the generator's storage is not RAS, but a cut is a cut whichever side it is named
        for share in (0.15, 0.35):
            box = cut_box(full, side, share)
            assert dice(lung_mask(volume[box], spacing=spacing), full[box]) >= 0.95


def test_a_field_of_view_that_cuts_both_lungs_is_a_chest_whose_mask_is_doubted(real_ct):
    """Both lungs meeting the image's sides in most slices: no "not a chest CT?", a warning
    that the field of view cuts the lungs, the crop keeps the whole scan (so both lungs), and
    the mask is still the full scan's."""
    from app.runtime.scanqc import check_values

    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    box = heart_crop(volume, full)
    cropped = volume[box]
    lungs = find_lungs(cropped, spacing=spacing)
    assert dice(lungs.mask, full[box]) >= 0.95
    warnings = check_values(cropped, np.diag([*spacing, 1.0]))
    assert not any("not a chest CT?" in w for w in warnings), warnings
    assert any("the field of view cuts the lungs" in w for w in warnings), warnings
    assert lungs.doubts() == warnings  # one mask, one verdict

    from monai.data import MetaTensor

    image = MetaTensor(np.ascontiguousarray(cropped)[None], affine=np.diag([*spacing, 1.0]))
    out = CropToLungsd("image", crop=True)({"image": image})["image"]
    assert tuple(out.shape) == (1, *cropped.shape)  # whole: both lungs stay


def test_a_reconstruction_padded_beyond_its_circle_keeps_the_lungs_it_cuts(real_ct):
    """Scanners pad what lies outside a small reconstruction's circle with -2000 or -3024:
    that padding is neither air nor body, and a lung the circle cuts stays lung."""
    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    x, y = np.mgrid[: volume.shape[0], : volume.shape[1]]
    outside = (x - 31.5) ** 2 + (y - 33.5) ** 2 > 26.0**2  # cuts both lungs' sides
    assert (full & outside[..., None]).sum() > 0.03 * full.sum()
    padded = volume.copy()
    padded[outside] = -3024.0
    inside = ~outside[..., None] & np.ones(volume.shape, bool)
    mask = lung_mask(padded, spacing=spacing)
    assert not (mask & ~inside).any()
    assert dice(mask & inside, full & inside) >= 0.95


@pytest.mark.parametrize("slice_mm", [1.0, 2.0, 8.0, 10.0])
def test_thin_and_thick_slices(real_ct, slice_mm):
    """The scan resampled to 1-10 mm slices: its mask is the full mask resampled (Dice >= 0.9)."""
    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    factor = spacing[2] / slice_mm
    resampled = ndimage.zoom(volume, (1, 1, factor), order=1)
    expected = ndimage.zoom(full.astype(np.uint8), (1, 1, factor), order=0).astype(bool)
    mask = lung_mask(resampled, spacing=(spacing[0], spacing[1], slice_mm))
    assert dice(mask, expected) >= 0.9


@pytest.mark.parametrize("scale", [0.55, 0.75, 1.3, 1.6])
def test_a_childs_and_a_large_adultschest(real_ct, scale):
    """The chest shrunk in plane (a child's, in the same field of view: more air around it) or
    grown (a large adult's, the field of view now cutting the body and the lungs): the mask is
    the full mask scaled (Dice >= 0.9)."""
    volume, spacing = chest(real_ct, zoom=2.0)
    full = lung_mask(volume, spacing=spacing)
    scaled = ndimage.zoom(volume, (scale, scale, 1), order=1, cval=-1000.0)
    expected = ndimage.zoom(full.astype(np.uint8), (scale, scale, 1), order=0).astype(bool)
    n = volume.shape[0]
    if scale < 1:
        pad = [((n - s) // 2, n - s - (n - s) // 2) for s in scaled.shape[:2]] + [(0, 0)]
        scaled = np.pad(scaled, pad, constant_values=-1000.0)
        expected = np.pad(expected, pad)
    else:
        start = [(s - n) // 2 for s in scaled.shape[:2]]
        box = (slice(start[0], start[0] + n), slice(start[1], start[1] + n), slice(None))
        scaled, expected = scaled[box], expected[box]
    assert dice(lung_mask(scaled, spacing=spacing), expected) >= 0.9


def test_emphysema_and_contrast_leave_the_mask(real_ct):
    """Lung below -850 HU made nearly air (-990, emphysema), and everything above 100 HU made
    300 HU brighter (contrast in vessels and heart): the mask stays the full scan's."""
    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    rng = np.random.default_rng(0)
    emphysema = volume.copy()
    holes = full & (volume < -850)
    emphysema[holes] = -990.0 + rng.normal(0, 10, int(holes.sum()))
    assert dice(lung_mask(emphysema, spacing=spacing), full) >= 0.95
    contrast = np.where(volume > 100, volume + 300, volume)
    assert dice(lung_mask(contrast, spacing=spacing), full) >= 0.98


def _consolidate(volume: np.ndarray, full: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """A consolidation (+30 HU) filling the lung within ``radius_mm`` of a point on the right
    lung's lateral pleura, in the middle slice: its voxels."""
    z = int(np.mean(extent(full, 2)))
    xs, ys = np.nonzero(full[:, :, z])
    right = xs < volume.shape[0] // 2
    y = int(np.median(ys[right]))
    x = int(xs[right & (ys == y)].min())
    gx, gy, gz = np.mgrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    ball = ((gx - x) * spacing[0]) ** 2 + ((gy - y) * spacing[1]) ** 2 + (
        (gz - z) * spacing[2]
    ) ** 2 <= radius_mm**2
    return ball & full


@pytest.mark.parametrize("radius_mm", [8.0, 12.0])
def test_a_consolidation_at_the_pleura_stays_inside_the_mask_and_the_crop(real_ct, radius_mm):
    """Dense findings where the lung meets the chest wall: >= 90 % of them inside the mask, all
    inside the crop's box."""
    volume, spacing = chest(real_ct, zoom=3.0)  # 1.4-mm pixels
    full = lung_mask(volume, spacing=spacing)
    lesion = _consolidate(volume, full, spacing, radius_mm)
    assert lesion.sum() > 100
    sick = np.where(lesion, 30.0, volume).astype(np.float32)
    mask = lung_mask(sick, spacing=spacing)
    assert (mask & lesion).sum() >= 0.9 * lesion.sum()
    start, end = lung_box(sick, mask=mask)
    box = np.zeros(volume.shape, bool)
    box[tuple(slice(a, b) for a, b in zip(start, end, strict=True))] = True
    assert not (lesion & ~box).any()


def test_a_large_consolidation_stays_inside_the_crop(real_ct):
    """A 40-mm consolidation at the pleura: the mask may lose it (it is no longer air), the
    crop does not (the box is mirrored about the body's centre)."""
    volume, spacing = chest(real_ct, zoom=2.0)
    full = lung_mask(volume, spacing=spacing)
    lesion = _consolidate(volume, full, spacing, 40.0)
    sick = np.where(lesion, 30.0, volume).astype(np.float32)
    start, end = lung_box(sick, mask=lung_mask(sick, spacing=spacing))
    box = np.zeros(volume.shape, bool)
    box[tuple(slice(a, b) for a, b in zip(start, end, strict=True))] = True
    assert not (lesion & ~box).any()


def test_one_lung_lost_is_doubted_and_the_scan_stays_whole(real_ct):
    """A lung the threshold cannot see (the right lung filled with +40 HU: collapse, effusion,
    complete consolidation): the mask is doubted, the crop keeps the whole scan."""
    from monai.data import MetaTensor

    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    right = full.copy()
    right[volume.shape[0] // 2 :] = False
    lost = np.where(right, 40.0, volume).astype(np.float32)
    doubts = find_lungs(lost, spacing=spacing).doubts()
    assert any("one side of the body holds" in d for d in doubts), doubts
    assert find_lungs(volume, spacing=spacing).doubts() == []
    image = MetaTensor(lost[None], affine=np.diag([*spacing, 1.0]))
    assert tuple(CropToLungsd("image")({"image": image})["image"].shape) == (1, *lost.shape)


def test_the_table_is_not_lung(real_ct):
    """A real GE chest slab (512 x 512, padding beyond the circle, a curved table whose air
    meets the padding): the table's air is not lung, both lung bases are."""
    import pydicom

    files = sorted((real_ct / "dcmqi_ct-3slice_dicom").glob("*.dcm"))
    slices = [pydicom.dcmread(f) for f in files]
    volume = np.stack(
        [s.pixel_array.T * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices], -1
    ).astype(np.float32)
    lungs = find_lungs(volume, spacing=(0.81, 0.81, 1.0))
    assert not lungs.mask[:, 440:].any()  # the table lies below row 440 (the lungs end at 420)
    assert lungs.mask[:256].sum() > 10_000 and lungs.mask[256:].sum() > 10_000
    assert lungs.doubts() == []


def test_the_mask_against_totalsegmentators_lungs(real_ct):
    """TotalSegmentator's own segmentation of a real upper-abdomen CT (the lung bases in its top
    11 slices; labels 10-14): the mask finds >= 95 % of its lung voxels (96.6 % seen), its
    pieces that touch the reference lungs score Dice >= 0.95 (0.965), and lung is found in every
    slice where the reference has 100 voxels or more. Colon gas is also taken (the whole mask's
    Dice is 0.53): docs/reliability.md."""
    import nibabel as nib

    img = nib.load(real_ct / "totalsegmentator_example_ct_sm.nii.gz")
    volume = np.asarray(img.dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(real_ct / "totalsegmentator_example_ct_sm_seg.nii.gz").dataobj)
    reference = (seg >= 10) & (seg <= 14)
    mask = lung_mask(volume, spacing=img.header.get_zooms())
    assert (mask & reference).sum() >= 0.95 * reference.sum()
    labels, _ = ndimage.label(mask)
    touching = np.unique(labels[mask & reference])
    assert dice(np.isin(labels, touching[touching > 0]), reference) >= 0.95
    big = reference.sum(axis=(0, 1)) >= 100
    assert mask.any(axis=(0, 1))[big].all()


def test_the_mask_needs_a_volume():
    with pytest.raises(ValueError, match="non-empty"):
        find_lungs(np.zeros((0, 4, 4), np.float32))


def test_lungs_in_few_slices_are_doubted_and_the_scan_stays_whole(real_ct):
    """The lung bases alone (the 12 lowest slices holding lung, 48 mm): "little or no lung",
    and the crop keeps the whole scan rather than a box around a sliver."""
    from monai.data import MetaTensor

    volume, spacing = chest(real_ct)
    full = lung_mask(volume, spacing=spacing)
    low = extent(full, 2)[0]
    below = np.repeat(volume[:, :, :1], 40, axis=2)  # abdomen-like: the lowest slice, no lung
    bases = np.ascontiguousarray(np.concatenate([below, volume[:, :, low : low + 12]], axis=2))
    doubts = find_lungs(bases, spacing=spacing).doubts()
    assert any("little or no lung" in d for d in doubts), doubts
    image = MetaTensor(bases[None], affine=np.diag([*spacing, 1.0]))
    assert tuple(CropToLungsd("image")({"image": image})["image"].shape) == (1, *bases.shape)


@pytest.mark.parametrize("spacing", [(1e-9, 1e-9, 1e-9), (1e9, 1e9, 1e9), (0.0, 1.0, 1.0)])
def test_a_header_no_ct_has_costs_no_more_than_one_without_spacing(real_ct, spacing):
    """Micrometre or kilometre voxels (a hostile or broken header): the mask is made as without
    a spacing (a 350-mm field of view), not on a one-cell grid or with a disc of 1e9 voxels."""
    import time

    volume, _ = chest(real_ct)
    start = time.perf_counter()
    mask = lung_mask(volume, spacing=spacing)
    assert time.perf_counter() - start < 20
    np.testing.assert_array_equal(mask, lung_mask(volume))


def test_the_row_by_row_hull_equals_the_half_plane_hull():
    """Differential: ``_convex_hull`` (rasterised row by row, the fast path) against every
    pixel tested on every facet of scipy's hull of the pixels' corners, on 300 random pieces
    of 1-5 rectangles, lines and single pixels among them."""
    from scipy.spatial import ConvexHull, QhullError

    from transforms.lung import _convex_hull

    rng = np.random.default_rng(0)
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    compared = 0
    for _ in range(300):
        piece = np.zeros((int(rng.integers(1, 40)), int(rng.integers(1, 40))), bool)
        for _ in range(int(rng.integers(1, 6))):
            a, b = rng.integers(0, piece.shape[0]), rng.integers(0, piece.shape[1])
            piece[a : a + rng.integers(1, 9), b : b + rng.integers(1, 9)] = True
        corners = (np.argwhere(piece)[:, None, :] + offsets).reshape(-1, 2).astype(float)
        try:
            hull = ConvexHull(corners)
        except QhullError:
            expected = piece
        else:
            grid = np.indices(piece.shape).reshape(2, -1).T.astype(float)
            inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(axis=1)
            expected = inside.reshape(piece.shape) | piece
        np.testing.assert_array_equal(_convex_hull(piece), expected)
        compared += 1
    assert compared == 300
