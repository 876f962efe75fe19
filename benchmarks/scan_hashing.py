"""What checking a test set's independence by content costs (issue 31).

    python -m benchmarks.scan_hashing --scans 4 --shape 512 512 64

``app.evaluate`` hashes each test scan once (``app.data.datalist.scan_sha256``) and compares
the hashes with those the model recorded at training time; the training scans are never
re-read. Side by side on the same MosMed-size files (int16, gzip NIfTI as MosMedData ships
them): the time to hash a scan, and the time to read it (nibabel, the least any
classification of it costs). Training records the hashes while reading each scan once for
the training data's content digest, which it did before (the same one read).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from app.data.datalist import scan_sha256


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 64])
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.scans):
            volume = rng.normal(-600, 300, args.shape).astype(np.int16)
            path = Path(tmp) / f"scan{i}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 5.0, 1.0])), str(path))
            paths.append(path)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        hash_s, read_s = [], []
        for path in paths:
            start = time.perf_counter()
            scan_sha256(path)
            hash_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.asarray(nib.load(str(path)).dataobj)
            read_s.append(time.perf_counter() - start)
    cpu = platform.processor() or platform.machine()
    print(f"{args.scans} scans {args.shape}, {size:.1f} MB each (gzip), CPU {cpu}")
    print(f"hash: {np.median(hash_s) * 1e3:.1f} ms per scan (median)")
    print(f"read: {np.median(read_s) * 1e3:.1f} ms per scan (median)")
    print(f"hash / read: {np.median(hash_s) / np.median(read_s):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
