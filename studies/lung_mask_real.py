"""The lung mask on real CT as it is acquired: the table in ``docs/reliability.md``.

    python -m studies.lung_mask_real --shared ../shared [--old /tmp/old_lung.py]

Against two references no one here drew: the real whole-chest CT's own mask (the mask of a
cropped, padded, resampled or rescaled copy must be the full mask treated the same way: Dice),
and TotalSegmentator's segmentation of a real upper-abdomen CT (lung labels 10-14: Dice, the
share of its lung voxels found, slices with lung in each). The variants are those of
``tests/test_lung_mask.py``. ``--old``: an earlier ``transforms/lung.py`` scored beside this one
(``git show c2f4b34:transforms/lung.py`` is the mask that took air meeting a slice's edge for the
air around the body).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from testdata import chest_variants
from transforms.lung import lung_mask


def _variants(real: Path, mask_fn) -> list[tuple[str, np.ndarray, tuple, np.ndarray]]:
    """(name, volume, spacing, the full scan's mask by ``mask_fn`` treated as the volume was):
    each mask is scored against its own full-scan mask (does it hold when the scan changes?)."""
    volume, spacing = chest_variants.chest(real)
    full = mask_fn(volume, spacing=spacing)
    out = []
    for side in chest_variants.SIDES:
        for share in (0.1, 0.25, 0.4):
            box = chest_variants.cut_box(full, side, share)
            out.append((f"{side} cut by {share:.0%}", volume[box], spacing, full[box]))
    box = chest_variants.heart_crop(volume, full)
    out.append(("around the heart (both sides cut 25 %)", volume[box], spacing, full[box]))
    x, y = np.mgrid[: volume.shape[0], : volume.shape[1]]
    outside = np.broadcast_to(
        ((x - 31.5) ** 2 + (y - 33.5) ** 2 > 26.0**2)[..., None], volume.shape
    )
    padded = np.where(outside, -3024.0, volume).astype(np.float32)
    out.append(("small reconstruction, -3024 beyond its circle", padded, spacing, full & ~outside))
    for mm in (1.0, 10.0):
        factor = spacing[2] / mm
        out.append(
            (
                f"{mm:g}-mm slices",
                ndimage.zoom(volume, (1, 1, factor), order=1),
                (spacing[0], spacing[1], mm),
                ndimage.zoom(full.astype(np.uint8), (1, 1, factor), order=0).astype(bool),
            )
        )
    rng = np.random.default_rng(0)
    holes = full & (volume < -850)
    emphysema = volume.copy()
    emphysema[holes] = -990.0 + rng.normal(0, 10, int(holes.sum()))
    out.append(("emphysema (lung below -850 HU made -990)", emphysema, spacing, full))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("..") / "shared")
    parser.add_argument("--old", type=Path, default=None)
    args = parser.parse_args(argv)
    real = args.shared / "data" / "real-ct"
    masks = {"this version": lung_mask}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_lung", args.old)
        old = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(old)  # type: ignore[union-attr]
        masks["earlier"] = lambda v, spacing=None: old.lung_mask(v)
    names = list(masks)
    print(
        "| real chest CT (COPDGene, 64 x 64 x 79), changed as a scanner would | "
        + " | ".join(f"Dice with its own full-scan mask, {n}" for n in names)
        + " |"
    )
    print("|---|" + "---|" * len(names))
    table: dict[str, list[float]] = {}
    for mask_fn in masks.values():
        for name, volume, spacing, expected in _variants(real, mask_fn):
            score = chest_variants.dice(mask_fn(volume, spacing=spacing), expected)
            table.setdefault(name, []).append(score)
    for name, scores in table.items():
        print(f"| {name} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")
    img = nib.load(real / "totalsegmentator_example_ct_sm.nii.gz")
    volume = np.asarray(img.dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(real / "totalsegmentator_example_ct_sm_seg.nii.gz").dataobj)
    reference = (seg >= 10) & (seg <= 14)
    print()
    print("| TotalSegmentator's lungs (upper-abdomen CT, 30 slices) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rows: dict[str, list[str]] = {}
    for mask_fn in masks.values():
        mask = mask_fn(volume, spacing=img.header.get_zooms())
        labels, _ = ndimage.label(mask)
        touching = np.unique(labels[mask & reference])
        own = np.isin(labels, touching[touching > 0])
        colon = int((mask & (seg == 20)).sum())
        ref_slices = reference.any(axis=(0, 1))
        figures = {
            "Dice, whole mask": f"{chest_variants.dice(mask, reference):.3f}",
            "Dice, the mask's pieces that touch the reference lungs": f"{chest_variants.dice(own, reference):.3f}",
            "reference lung voxels found": f"{(mask & reference).sum() / reference.sum():.3f}",
            "mask voxels in the colon (label 20: its gas)": f"{colon:,} of {int(mask.sum()):,}",
            "slices with lung: reference / mask": f"{int(ref_slices.sum())} / {int(mask.any(axis=(0, 1)).sum())}",
            "reference slices with lung the mask misses": f"{int((ref_slices & ~mask.any(axis=(0, 1))).sum())}",
        }
        for key, value in figures.items():
            rows.setdefault(key, []).append(value)
    for key, values in rows.items():
        print(f"| {key} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
