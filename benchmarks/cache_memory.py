"""Peak memory (RSS) of training for each cache mode, and the cache's cost per scan.

    python benchmarks/cache_memory.py --scans 20

Generates MosMed-sized scans (512x512, 30-70 slices), then trains 2 epochs at the default
128x128x64 with `--cache memory`, `disk` and `none`, each in its own process, and reports the
process's peak RSS, the disk cache's size per scan, and the epoch times.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=20, help="scans in all (half per class)")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "app.data",
                "synth",
                str(data),
                "--per-class",
                str(args.scans // 2),
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for mode in ("none", "memory", "disk"):
            run, cache = Path(tmp) / f"run-{mode}", Path(tmp) / f"cache-{mode}"
            code = (
                "import resource, sys; from app.train import main; "
                f"rc = main(['--data', '{data}', '--output', '{run}', '--epochs', '2', '--cache', '{mode}', "
                f"'--device', 'cpu', '--no-progress', '--set', 'cache_dir={cache}']); "
                "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
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
                "disk_cache_mb_per_scan": round(disk / 2**20 / args.scans, 2),
            }
    base = results["none"]["peak_rss_mb"]
    for mode in ("memory", "disk"):
        results[mode]["rss_mb_per_scan_over_none"] = round(
            (results[mode]["peak_rss_mb"] - base) / args.scans, 2
        )
    print(json.dumps({"scans": args.scans, **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
