"""Write a copy of a dataset with each lung's smooth background subtracted (a study, not a feature).

    python -m studies.flatten_lungs SRC DST [--sigma-mm 20]

Each lung voxel (``transforms.lung.lung_mask``) becomes its HU minus a robust local background
plus -850 HU (``transforms.lung.flatten_lungs``, what ``lung_flatten_mm`` does inside the
preprocessing): the normalised Gaussian convolution (``--sigma-mm``) of the lung's HU over the
mask, computed again without the voxels more than 80 HU above the first estimate (findings and
vessels). Dependent density and expiration vanish; local findings stay. Folders and names are
kept (``masks/`` is skipped); int16 NIfTI with the source's affine. studies/log.md, "A
generator the project had never seen", has what the recipe and the density baseline did on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from transforms.lung import flatten_lungs, lung_mask


def flatten(volume: np.ndarray, spacing: tuple[float, ...], sigma_mm: float = 20.0) -> np.ndarray:
    """``volume`` (HU, axial third axis) with each lung voxel minus its local background."""
    return flatten_lungs(volume, lung_mask(volume), [float(s) for s in spacing[:3]], sigma_mm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--sigma-mm", type=float, default=20.0)
    args = p.parse_args()
    for path in sorted(args.src.rglob("*.nii.gz")):
        if "masks" in path.relative_to(args.src).parts:
            continue
        img = nib.load(str(path))
        volume = np.asarray(img.dataobj, dtype=np.float32)
        flat = flatten(volume, img.header.get_zooms(), args.sigma_mm)
        out = args.dst / path.relative_to(args.src)
        out.parent.mkdir(parents=True, exist_ok=True)
        stored = np.clip(np.round(flat), -1024, 3071).astype(np.int16)
        nib.save(nib.Nifti1Image(stored, img.affine), str(out))
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
