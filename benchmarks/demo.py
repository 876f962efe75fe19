"""Does the demo converge? Runs `python -m app.train --demo` and reports time and validation AUC.

    python -m benchmarks.demo [--output runs/demo-bench] [--set precision=fp32]

Prints JSON: wall-clock seconds (data generation included on a fresh cache), epochs, the best
validation ROC-AUC and the AUC of the best model (best validation accuracy). The issue's target:
at most 10 minutes on 2 CPU cores and a validation ROC-AUC of at least 0.9.
"""

from __future__ import annotations

import argparse
import json
import time

from app.config import parse_set_options
from app.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="runs/demo-bench")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = train(
        output=args.output,
        demo=True,
        overwrite=True,
        overrides={"progress": False, **parse_set_options(args.sets)},
    )
    seconds = time.perf_counter() - start
    rows = result.metrics
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    report = {
        "seconds": round(seconds, 1),
        "epochs": len(rows),
        "best_val_auc": max(r["val_auc"] for r in rows),
        "best_model_epoch": best["epoch"],
        "best_model_val_acc": best["val_acc"],
        "best_model_val_auc": best["val_auc"],
        "target_met": seconds <= 600 and max(r["val_auc"] for r in rows) >= 0.9,
    }
    print(json.dumps(report, indent=1))
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
