"""Peak memory (RSS) of training for each cache mode, and the cache's cost per scan.

    python -m benchmarks.cache_memory --scans 20
    python -m benchmarks.cache_memory --data /data/mosmed1110 --modes disk --epochs 1

Trains ``--epochs`` at the default 128x128x64 on MosMed-sized scans (generated, 512x512 and
30-70 slices, unless ``--data`` names a dataset) with each ``--cache`` mode in its own process,
and prints JSON: the process's peak RSS (``VmHWM``), the disk cache's size per scan, the epoch
times, and for ``memory``/``disk`` the RSS per scan over ``none`` when ``none`` was run too.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from a large parent through fork and exec
TRAIN_AND_MEASURE = """
import re, sys
from app.train import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read()
print("PEAK_RSS_MB", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024)
sys.exit(rc)
"""


def count_scans(data: Path) -> int:
    return sum(1 for p in data.rglob("*.nii.gz") if ".tmp." not in p.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=20, help="scans to generate (half per class)")
    parser.add_argument("--data", type=Path, help="an existing dataset instead of generated scans")
    parser.add_argument("--modes", nargs="+", default=["none", "memory", "disk"])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            subprocess.run(
                [sys.executable, "-m", "app.data", "synth", str(data)]
                + ["--per-class", str(args.scans // 2), "--no-progress"],
                check=True,
                stdout=subprocess.DEVNULL,
                cwd=REPO,
            )
        scans = count_scans(data)
        for mode in args.modes:
            run, cache = Path(tmp) / f"run-{mode}", Path(tmp) / f"cache-{mode}"
            out = subprocess.run(
                [sys.executable, "-c", TRAIN_AND_MEASURE, "--data", str(data)]
                + ["--output", str(run), "--epochs", str(args.epochs), "--cache", mode]
                + ["--device", "cpu", "--no-progress", "--set", f"cache_dir={cache}"],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            ).stdout
            peak = float(
                next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_RSS_MB"))
            )
            with (run / "metrics.csv").open() as f:
                seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
            disk = (
                sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
                if cache.exists()
                else 0
            )
            results[mode] = {
                "peak_rss_mb": round(peak, 1),
                "epoch_seconds": seconds,
                "disk_cache_mb_per_scan": round(disk / 2**20 / scans, 2),
                "disk_cache_gb": round(disk / 2**30, 2),
            }
    if "none" in results:
        base = results["none"]["peak_rss_mb"]
        for mode in set(results) - {"none"}:
            results[mode]["rss_mb_per_scan_over_none"] = round(
                (results[mode]["peak_rss_mb"] - base) / scans, 2
            )
    print(json.dumps({"scans": scans, "data": str(args.data or "generated"), **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
