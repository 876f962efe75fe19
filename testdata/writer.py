"""The class-folder writer the generators share: ``OUT/CT-0`` (normal), ``OUT/CT-23``
(abnormal) and ``OUT/masks`` (each abnormal scan's lesion mask on its grid)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

#: the class folders, by label (as MosMedData's: CT-0 normal, CT-23 abnormal)
FOLDERS = {0: "CT-0", 1: "CT-23"}


def write_labelled(
    out: Path,
    per_class: int,
    draw: Callable[[np.random.Generator, bool], tuple[np.ndarray, np.ndarray]],
    store: Callable[[np.ndarray], nib.Nifti1Image],
    seed_key: list[int],
    prefix: str,
) -> int:
    """Draw ``per_class`` scans of each class, each with its own seed (``[*seed_key, label, i]``
    before the generator's own constant), and write them as ``store`` makes them, with their
    lesion masks as uint8 on the same grid. Returns how many scans were written."""
    for label, folder in FOLDERS.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed_key[0], label, i, *seed_key[1:]])
            volume, mask = draw(rng, bool(label))
            image = store(volume)
            name = f"{prefix}_{label}_{i:03d}.nii.gz"
            nib.save(image, str(out / folder / name))
            if label:
                (out / "masks").mkdir(exist_ok=True)
                masks = nib.Nifti1Image(mask.astype(np.uint8), image.affine)
                nib.save(masks, str(out / "masks" / name))
    return 2 * per_class


def generator_parser(description: str, per_class: int) -> argparse.ArgumentParser:
    """The options both generators take: OUT, --per-class, --seed, --confounded [S]."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=per_class)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--confounded",
        type=float,
        default=0.0,
        nargs="?",
        const=1.0,
        help="strength of the confounders, 0..1 (alone: 1)",
    )
    return p
