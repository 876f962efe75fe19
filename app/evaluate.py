"""python -m app.evaluate: a model on a labelled test set, every figure with its 95% CI.

    python -m app.evaluate --data TEST --checkpoint runs/demo --output outputs/eval

TEST: class folders (CT-0/ normal, CT-23/ abnormal) or a CSV/JSON datalist. Writes to OUTPUT:
metrics.json (ROC-AUC with DeLong's CI on the logit scale, or a seeded stratified bootstrap; accuracy, sensitivity,
specificity, PPV, NPV with Wilson CIs; Brier score; expected calibration error; the model,
data and date), predictions.csv, roc.png (with the operating point), calibration.png
(reliability diagram), confusion.png and report.html (one self-contained page). Scans that
cannot be read are listed with their error and left out of the metrics (exit status 1).

A cross-validation folder (``app.train --folds K``) is evaluated as the ensemble it is, and as
its parts: each fold model's ROC-AUC with its CI, Brier score and ECE, and the ensemble's NLL,
Brier score and ECE before and after the temperature fitted out of fold (``folds`` and
``calibration`` in metrics.json; ``prob_fold_K`` columns in predictions.csv).

From Python: ``app.evaluate.evaluate(...)`` (``app.evaluation.workflow``) returns an :class:`Evaluation`; its ``table()`` is a
list of rows for ``pandas.DataFrame``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from app.cli import (
    add_device_option,
    add_precision_option,
    add_progress_option,
    add_reading_options,
    fail,
    show_progress,
)
from app.errors import CTClassifyError
from app.evaluation.workflow import Evaluation, EvaluationError, evaluate, evaluate_defaults
from app.run_folder import REPORT_HTML

__all__ = ["Evaluation", "EvaluationError", "build_parser", "evaluate", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, required=True, help="class folders or a datalist")
    p.add_argument(
        "--checkpoint", help="run folder, checkpoint file or bundle (default: the newest run)"
    )
    p.add_argument("--output", type=Path, required=True, help="folder for the evaluation")
    p.add_argument("--threshold", type=float, help="P(abnormal) threshold (default: the model's)")
    add_precision_option(p, default="auto")
    add_device_option(p, "where to run the model (default auto: CUDA when there is a GPU)")
    defaults = evaluate_defaults()
    add_reading_options(p, defaults)
    p.add_argument(
        "--auc-ci",
        choices=("delong", "bootstrap"),
        default=str(defaults["auc_ci"]),
        help="ROC-AUC interval (default %(default)s): delong, DeLong's variance on the logit scale "
        "(coverage 0.95-0.96 in simulation from 10 scans in the smaller class), or bootstrap, a "
        "stratified BCa bootstrap",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=int(defaults["bootstrap_resamples"]),
        help="bootstrap resamples (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=int(defaults["bootstrap_seed"]),
        help="seed of the bootstrap (default %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an evaluation in --output")
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: each scan averaged with its left-right mirror (the "
        "spread goes to predictions.csv's tta_spread)",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the lung-density baseline (fitted on the model's recorded training scans)",
    )
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="evaluate even when test scans were used in the model's training or validation "
        "(refused by default); every figure is then marked as not independent",
    )
    add_progress_option(p)
    return p


def scan_warning_lines(counts: dict[str, int], n: int, generated_model: bool) -> list[str]:
    """What the console says of the test scans' warnings (app.infer gives them per scan)."""
    lines = []
    if counts.get("far_spacing"):
        lines.append(
            f"{counts['far_spacing']} of {n} test scans have voxel spacing far from the training "
            "scans': the figures below may not hold for them (predictions.csv names them)"
        )
    if generated_model and counts.get("real_on_generated_model"):
        lines.append(
            f"{counts['real_on_generated_model']} of {n} test scans are real CT given to a model "
            "trained on generated scans: its figures on them mean little"
        )
    if counts.get("warned") and not lines:
        lines.append(f"{counts['warned']} of {n} test scans carry warnings (predictions.csv)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(
            args.data,
            args.checkpoint,
            args.output,
            device=args.device,
            threshold=args.threshold,
            precision=args.precision,
            batch_size=max(1, args.batch_size),
            workers=max(0, args.workers),
            n_resamples=args.bootstrap,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=show_progress(args.no_progress),
            allow_overlap=args.allow_overlap,
            auc_ci=args.auc_ci,
            with_baseline=not args.no_baseline,
            tta=args.tta,
        )
    except CTClassifyError as exc:
        return fail(exc)
    m = result.metrics
    print(f"model: {result.model['description']}")
    if result.overlap:
        print(
            f"NOT INDEPENDENT: {result.overlap['scans']} test scans were used by the model "
            f"({result.overlap['used_for']}); every figure below is optimistic"
        )
    elif result.independent == "unknown" and result.independence is not None:
        print(f"INDEPENDENCE UNKNOWN: {result.independence.how.removeprefix('unknown: ')}")
    print(
        f"{m.n} scans ({m.n_positive} abnormal, {m.n_negative} normal), {result.failed} failed; "
        f"threshold {m.threshold:g}; {int(100 * m.confidence)}% confidence intervals"
    )
    for line in scan_warning_lines(result.scan_warnings, m.n, bool(result.model.get("generated"))):
        print(f"warning: {line}")
    for row in result.table():
        ci = "" if math.isnan(row["ci_low"]) else f" ({row['ci_low']:.3f} to {row['ci_high']:.3f})"
        print(f"  {row['metric']:<24} {row['value']:.3f}{ci}")
    if result.baseline:
        print(f"baseline: {result.baseline['verdict']}")
    elif result.baseline_note:
        print(result.baseline_note)
    if result.severity:
        _print_severity(result.severity)
    method = result.model.get("threshold_method") or ""
    if method.startswith("sensitivity"):
        print(
            f"operating point: the threshold was chosen for {method} on single fold models' "
            f"out-of-fold predictions; this ensemble measured sensitivity {m.sensitivity.text()}, "
            f"specificity {m.specificity.text()} here"
        )
    print(f"report: {result.files[REPORT_HTML]}")
    return 1 if result.failed else 0


def _print_severity(figures: dict[str, Any]) -> None:
    """A severity model's grade figures, the burden baseline's beside them."""
    from app.evaluation.metrics import Estimate
    from app.evaluation.severity import severity_lines

    for line in severity_lines(figures):
        print(line)
    base = figures.get("baseline")
    if base:
        kappa = Estimate(**base["quadratic_weighted_kappa"]).text()
        mae = Estimate(**base["mean_absolute_error"]).text()
        print(f"  burden baseline ({base['scans']} scans): kappa {kappa}, grade error {mae}")


if __name__ == "__main__":
    raise SystemExit(main())
