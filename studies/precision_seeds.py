"""Does bfloat16 training change accuracy? The demo trained with fp32 and bf16, several seeds.

    python -m studies.precision_seeds --seeds 0 1 2       # about 25 minutes on 2 CPU cores

Runs ``python -m app.train --demo --seed S --precision P`` for each seed and precision (runs in
``--output``/P-S) and prints, per run, the kept model's epoch (best validation accuracy, as
``best_model.pt``), its validation accuracy and ROC-AUC, and the mean +- sd over seeds per
precision. ``studies/log.md`` (*Precision*) has the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kept_epoch(run: Path) -> dict:
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: (float(r["val_acc"]), -int(r["epoch"])))
    return {
        "epochs": len(rows),
        "kept_epoch": int(best["epoch"]),
        "val_acc": float(best["val_acc"]),
        "val_auc": float(best["val_auc"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "precision-seeds")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for precision in args.precisions:
            run = args.output / f"{precision}-{seed}"
            subprocess.run(
                [sys.executable, "-m", "app.train", "--demo", "--output", str(run)]
                + ["--overwrite", "--no-progress", "--seed", str(seed)]
                + ["--precision", precision],
                cwd=REPO,
                check=True,
                capture_output=True,
            )
            runs.setdefault(precision, []).append({"seed": seed, **kept_epoch(run)})
    summary = {}
    for precision, found in runs.items():
        aucs = [r["val_auc"] for r in found]
        accs = [r["val_acc"] for r in found]
        summary[precision] = {
            "runs": found,
            "val_auc_mean": statistics.mean(aucs),
            "val_auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "val_acc_mean": statistics.mean(accs),
            "val_acc_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
