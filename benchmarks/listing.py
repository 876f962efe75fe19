"""Cohort-scale folders: listing them, and the time to the first prediction (issue 33).

    python -m benchmarks.listing --sizes 100 10000 --checkpoint nets/weights/generated.pt

For each size, a folder of that many small NIfTI scans (copies of one 40 x 40 x 20 int16 scan,
hard-linked: the disk holds one): the time ``find_inputs`` takes to list it (it opens no NIfTI
file), and the time from starting ``python -m app.infer`` on it to its first prediction line
(model loading included), side by side in one run. The first prediction should not wait for the
folder: only the listing grows with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from app.runtime.scans import find_inputs


def _folder(root: Path, size: int, source: Path) -> Path:
    folder = root / f"n{size}"
    folder.mkdir()
    for i in range(size):
        os.link(source, folder / f"scan{i:05d}.nii.gz")
    return folder


def _first_prediction(folder: Path, checkpoint: str, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "app.infer", str(folder), "--checkpoint", checkpoint,
         "--output", str(out), "--device", "cpu", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "percent confident" in line:
            break
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000])
    p.add_argument("--checkpoint", default="nets/weights/generated.pt")
    args = p.parse_args(argv)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        volume = np.full((40, 40, 20), -1000, np.int16)
        volume[5:35, 8:32] = rng.integers(-900, 100, size=(30, 24, 20))
        source = root / "one.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([-8.0, 8.0, 10.0, 1.0])), str(source))
        for size in args.sizes:
            folder = _folder(root, size, source)
            start = time.perf_counter()
            found = find_inputs(folder)
            listed = time.perf_counter() - start
            first = _first_prediction(folder, args.checkpoint, root / f"out{size}")
            print(
                f"{size:>6} scans: listed in {listed:.3f} s ({len(found)} inputs); first "
                f"prediction {first:.2f} s after start",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
