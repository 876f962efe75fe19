"""Coverage of app.evaluate's 95% ROC-AUC interval, simulated (issue 31).

    python -m studies.auc_interval_coverage --sets 2000 --out auc_coverage.json

Binormal equal-variance scores (negatives N(0, 1), positives N(d, 1), true AUC Phi(d / sqrt 2)),
``--sets`` sets per cell of true AUC x scans per class. Each set's interval from
``app.evaluation.metrics.auc_with_ci`` (DeLong on the logit scale; the exact bound where the set
is perfectly separated) and, side by side, the interval perfect separation got before (Hanley
and McNeil's variance on the AUC scale). Prints one row per cell: coverage now, coverage
before, the share of sets perfectly separated, and the mean lower bound of those.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import norm

from app.evaluation.metrics import auc_with_ci, delong_auc


def before(value: float, positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """The interval a perfectly separated set got before issue 31 (Hanley-McNeil, AUC scale)."""
    m, n = len(positive), len(negative)
    _, var = delong_auc(positive, negative)
    a = min(max(value, 0.5 / (m * n)), 1 - 0.5 / (m * n))
    z = float(norm.ppf(0.975))
    return max(0.0, a - z * math.sqrt(var)), min(1.0, a + z * math.sqrt(var))


def cell(auc: float, per_class: int, sets: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    d = math.sqrt(2.0) * float(norm.ppf(auc))
    labels = np.r_[np.ones(per_class, int), np.zeros(per_class, int)]
    covered = covered_before = separated = 0
    lows = []
    for _ in range(sets):
        scores = np.r_[rng.normal(d, 1.0, per_class), rng.normal(0.0, 1.0, per_class)]
        est = auc_with_ci(scores, labels, confidence=0.95, method="delong")
        covered += est.low <= auc <= est.high
        if est.value == 1.0:
            separated += 1
            lows.append(est.low)
            low, high = before(est.value, scores[:per_class], scores[per_class:])
            covered_before += low <= auc <= high
        else:
            covered_before += est.low <= auc <= est.high
    return {
        "true_auc": auc,
        "per_class": per_class,
        "sets": sets,
        "coverage": covered / sets,
        "coverage_before": covered_before / sets,
        "separated": separated / sets,
        "separated_low": float(np.mean(lows)) if lows else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=int, default=2000)
    p.add_argument("--aucs", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98, 0.99])
    p.add_argument("--per-class", type=int, nargs="+", default=[10, 20, 30])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    print("true_auc per_class coverage before separated separated_low")
    for k, per_class in enumerate(args.per_class):
        for j, auc in enumerate(args.aucs):
            row = cell(auc, per_class, args.sets, args.seed + 100 * k + j)
            rows.append(row)
            print(
                f"{auc:8.2f} {per_class:9d} {row['coverage']:8.3f} {row['coverage_before']:6.3f} "
                f"{row['separated']:9.3f} {row['separated_low']:13.4f}",
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
