"""The lung mask's cost: this version's ``transforms.lung.find_lungs`` beside the mask it replaced
(git ``c2f4b34``: air meeting a slice's edge taken for the air around the body, a fixed 2-voxel
grid), on the shared real chest CT resampled to a clinical grid (512 x 512 at 0.52 mm,
``--slices`` slices), timed in one run.

    python -m benchmarks.lung_mask_cost --shared ../shared --old /tmp/old_lung.py

``--old``: the earlier ``transforms/lung.py`` (``git show c2f4b34:transforms/lung.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from transforms.lung import find_lungs


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    img = nib.as_closest_canonical(
        nib.load(args.shared / "data" / "real-ct" / "cip_ct-64_chest.nii.gz")
    )
    small = np.asarray(img.dataobj, dtype=np.float32)
    zooms = img.header.get_zooms()
    factors = (8, 8, args.slices / small.shape[2])
    volume = ndimage.zoom(small, factors, order=1).astype(np.float32)
    spacing = [z / f for z, f in zip(zooms, factors, strict=True)]
    spec = importlib.util.spec_from_file_location("old_lung", args.old)
    old = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(old)  # type: ignore[union-attr]
    new_s = _best(lambda: find_lungs(volume, spacing=spacing), args.repeats)
    old_s = _best(lambda: old.lung_mask(volume), args.repeats)
    print(f"volume {volume.shape}, spacing {', '.join(f'{s:.2f}' for s in spacing)} mm")
    print(f"find_lungs (this version): {new_s:.2f} s; the earlier lung_mask: {old_s:.2f} s; "
          f"ratio {new_s / old_s:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
