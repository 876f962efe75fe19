"""What flattening the lungs (``lung_flatten_mm``) costs per scan, beside the plain full-resolution
normalised convolution it approximates (scipy's ``gaussian_filter`` on every voxel).

    python -m benchmarks.flatten_cost [--repeats 5]

Generated scans (``app.data.synth``) of three sizes, their lungs cropped as the preprocessing
crops them; prints per size the seconds of each (the best of ``--repeats``), their ratio and
the largest difference in the lung (HU). One thread (``OMP_NUM_THREADS=1``) keeps it comparable.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from app.data.synth import generate_scan
from transforms.lung import FLATTEN_ABOVE_HU, FLATTEN_LEVEL_HU, flatten_lungs, lung_box, lung_mask

SIGMA_MM = 20.0


def plain(volume: np.ndarray, mask: np.ndarray, spacing: list[float]) -> np.ndarray:
    sigma = [SIGMA_MM / s for s in spacing]

    def background(keep: np.ndarray) -> np.ndarray:
        values = ndimage.gaussian_filter(np.where(keep, volume, 0).astype(np.float32), sigma)
        return values / np.maximum(ndimage.gaussian_filter(keep.astype(np.float32), sigma), 1e-3)

    second = background(mask & (volume < background(mask) + FLATTEN_ABOVE_HU))
    out = volume.copy()
    out[mask] += FLATTEN_LEVEL_HU - second[mask]
    return out


def best_of(repeats: int, fn: Callable[..., object], *args: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    for shape in ((128, 128, 40), (256, 256, 64), (512, 512, 64)):
        scan = generate_scan(1, 3, shape=shape, difficulty=0.3)
        volume = scan.volume.astype(np.float32)
        box = lung_box(volume)
        assert box is not None
        crop = tuple(slice(a, b) for a, b in zip(*box, strict=True))
        v, m = volume[crop].copy(), lung_mask(volume)[crop]
        spacing = [float(abs(scan.affine[i, i])) for i in range(3)]
        ours = best_of(args.repeats, flatten_lungs, v, m, spacing, SIGMA_MM)
        full = best_of(args.repeats, plain, v, m, spacing)
        diff = np.abs(flatten_lungs(v, m, spacing, SIGMA_MM) - plain(v, m, spacing))[m].max()
        row = {"shape": shape, "cropped": v.shape, "spacing_mm": [round(s, 2) for s in spacing],
               "flatten_s": round(ours, 4), "full_resolution_s": round(full, 4),
               "ratio": round(full / ours, 1), "max_diff_hu": round(float(diff), 3)}  # fmt: skip
        print(json.dumps(row))


if __name__ == "__main__":
    main()
