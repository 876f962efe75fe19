"""Inference over a folder of many small scans: peak memory and steady throughput.

    /usr/bin/time -v python -m benchmarks.soak_infer --scans 1000

Writes N small generated scans, trains nothing (a random model of the spec's shape), runs
`app.infer` in this process and prints per-scan seconds for the first and last tenth of the
folder, and the peak resident memory of this process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from checkpoints import write_spec_checkpoint

from app.infer import main as infer_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.scans):
            vol = np.full((64, 64, 16), -1000, np.int16)
            vol[8:56, 12:52] = rng.integers(-900, 100, size=(48, 40, 16))
            nib.save(
                nib.Nifti1Image(vol, np.diag([-0.8, 0.8, 8.0, 1.0])),
                str(folder / f"s{i:05d}.nii.gz"),
            )
        ckpt = write_spec_checkpoint(Path(tmp) / "model.pt", spatial_size=[48, 48, 48])
        out = Path(tmp) / "out"
        start = time.perf_counter()
        code = infer_main(
            [
                str(folder),
                "--checkpoint",
                str(ckpt),
                "--output",
                str(out),
                "--device",
                "cpu",
                "--no-progress",
                "--batch-size",
                "4",
            ]
        )
        elapsed = time.perf_counter() - start
        with (out / "predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
    tenth = max(len(rows) // 10, 1)
    report = {
        "scans": len(rows),
        "exit_code": code,
        "seconds": round(elapsed, 1),
        "scans_per_s": round(len(rows) / elapsed, 2),
        "read_seconds_first_tenth_median": statistics.median(
            float(r["seconds"]) for r in rows[:tenth]
        ),
        "read_seconds_last_tenth_median": statistics.median(
            float(r["seconds"]) for r in rows[-tenth:]
        ),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
