"""K-fold cross-validation: one run folder per fold, the summary, out-of-fold predictions, and
the operating threshold and temperature chosen from them (never from a test set).

    R/fold-0/ ... R/fold-{K-1}/   normal run folders (resumable, metrics, curves, best_model.pt)
    R/cv_summary.csv, .json       per fold the kept epoch's validation metrics; mean and sd
    R/cv_curves.png               the folds' validation ROC-AUC and accuracy per epoch
    R/oof_predictions.csv         each scan predicted by the fold model that did not train on it
    R/cv_calibration.json         threshold (Youden's J, or a target sensitivity) and temperature
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DataError
from app.evaluation.baseline import DensityBaseline, scan_features
from app.evaluation.metrics import (
    auc_with_ci,
    expected_calibration_error,
    fit_temperature,
    logits_of,
    nll,
    paired_auc_difference,
)
from app.plots import plot_cv_curves
from app.readback import read_split
from app.run_folder import (
    CV_CALIBRATION,
    CV_SUMMARY,
    METRICS_CSV,
    SPLIT,
    fold_dir,
    fold_dirs,
    is_finished,
    kept_row,
    latest_checkpoint,
    read_metrics,
)
from app.runtime.files import atomic_write_text

#: the kept epoch's validation figures in the summary
SUMMARY_METRICS = ("val_acc", "val_auc", "val_sensitivity", "val_specificity", "val_loss")


@dataclass
class CrossValidation:
    """What :func:`cross_validate` returns."""

    output: Path
    folds: int
    fold_dirs: list[Path]
    summary: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    ran: list[int] = field(default_factory=list)


def cross_validate(
    data: str | Path | None,
    output: str | Path,
    folds: int,
    *,
    only_fold: int | None = None,
    demo: bool = False,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
    target_sensitivity: float | None = None,
    recipe: str | None = None,
    tracking: str | None = None,
) -> CrossValidation:
    """Train fold ``only_fold`` (default: every fold not finished yet) of ``folds`` into
    ``output/fold-k``, then, once every fold is finished, write the summary, out-of-fold
    predictions and calibration. A fold folder with a checkpoint is resumed (a finished fold is
    left as it is); ``overwrite`` retrains every fold asked for."""
    from app.training.workflow import train

    if folds < 2:
        raise DataError(f"--folds must be 2 or more, got {folds}")
    if only_fold is not None and not 0 <= only_fold < folds:
        raise DataError(f"--fold must be 0 to {folds - 1}, got {only_fold}")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise DataError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    out = Path(output)
    if not overwrite:
        _check_existing_folds(out, folds)
    created_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    result = CrossValidation(out, folds, [fold_dir(out, k) for k in range(folds)])
    todo = range(folds) if only_fold is None else [only_fold]
    parent = None
    if tracking:  # one MLflow run per fold, under the folder's run
        from app.training.tracking import open_parent

        parent = open_parent(out)["run_id"]
    for k in todo:
        run = fold_dir(out, k)
        started = run.exists() and latest_checkpoint(run) is not None
        created = not run.exists()
        try:
            train(
                data,
                run,
                demo=demo,
                resume=started and not overwrite,
                overwrite=overwrite or (run.exists() and not started),
                overrides={**(overrides or {}), "folds": folds, "fold": k},
                recipe=recipe,
                operating_point=False,  # chosen out of fold for the folder (write_out_of_fold)
                tracking=tracking,
                tracking_parent=parent,
            )
        except BaseException:
            # a fold this call created and that saved no epoch leaves nothing behind
            if created and run.is_dir() and latest_checkpoint(run) is None:
                shutil.rmtree(run)
                if created_out and not any(out.iterdir()):
                    out.rmdir()
            raise
        result.ran.append(k)
    if all(is_finished(d) for d in result.fold_dirs):
        result.summary = write_summary(out, result.fold_dirs)
        result.calibration = write_out_of_fold(out, result.fold_dirs, target_sensitivity)
        if parent is not None:
            from app.training.tracking import close_parent

            close_parent(out, [out / CV_SUMMARY, out / CV_CALIBRATION])
    return result


def _check_existing_folds(out: Path, folds: int) -> None:
    """Refuse a cross-validation folder made with another number of folds: its folds' split
    records say how many; a fold folder beyond K is another K's too."""

    if not out.is_dir():
        return
    for run in fold_dirs(out):
        if int(run.name[5:]) >= folds:
            raise DataError(
                f"{out} holds {run.name}, so it was made with more than {folds} folds: use the "
                "same --folds as before, or another --output"
            )
        split = run / SPLIT
        if split.is_file():
            record = read_split(split)["record"]
            if record is not None and record["folds"] != folds:
                raise DataError(
                    f"{out} was made with --folds {record['folds']} ({split}); --folds {folds} "
                    "would put scans trained on into validation: use the same --folds, or "
                    "another --output"
                )


def _kept_epoch(run: Path) -> dict[str, Any]:
    """The epoch ``best_model.pt`` holds: the first with the best validation accuracy."""

    best = kept_row(read_metrics(run / METRICS_CSV))
    if best is None:
        raise DataError(f"{run} has no validated epoch")
    return {"epoch": best["epoch"], **{k: best.get(k) for k in SUMMARY_METRICS}}


def write_summary(out: Path, runs: list[Path]) -> dict[str, Any]:

    per_fold = [{"fold": k, **_kept_epoch(run)} for k, run in enumerate(runs)]
    stats: dict[str, dict[str, float]] = {}
    for name in SUMMARY_METRICS:
        values = [float(f[name]) for f in per_fold if f.get(name) is not None]
        if values:
            stats[name] = {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    summary = {"folds": per_fold, "mean_sd": stats}
    atomic_write_text(out / CV_SUMMARY, json.dumps(summary, indent=1))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fold", "epoch", *SUMMARY_METRICS])
    for f in per_fold:
        writer.writerow([f["fold"], f["epoch"], *(f.get(k, "") for k in SUMMARY_METRICS)])
    for what in ("mean", "sd"):
        writer.writerow([what, "", *(stats.get(k, {}).get(what, "") for k in SUMMARY_METRICS)])
    atomic_write_text(out / "cv_summary.csv", buf.getvalue())
    plot_cv_curves([read_metrics(r / METRICS_CSV) for r in runs], out / "cv_curves.png")
    return summary


def out_of_fold(runs: list[Path]) -> list[dict[str, Any]]:
    """Each validation scan of each fold, predicted by that fold's best model."""
    from app.inference.classifier import Classifier

    rows = []
    for k, run in enumerate(runs):
        items = read_split(run / SPLIT)["validation"]
        clf = Classifier.load(run, device="auto", precision="auto")
        paths = [str(item["image"]) for item in items]
        for item, pred in zip(items, clf.predict_many(paths), strict=True):
            rows.append(
                {
                    "path": str(item["image"]),
                    "label": int(item["label"]),
                    "fold": k,
                    "prob_abnormal": "" if pred.prob_abnormal is None else pred.prob_abnormal,
                    "error": pred.error or "",
                }
            )
    return rows


def choose_threshold(
    probs: np.ndarray, labels: np.ndarray, target_sensitivity: float | None = None
) -> tuple[float, str]:
    """Youden's J (sensitivity + specificity - 1, at its maximum), or the highest threshold
    whose sensitivity (``prob >= threshold`` called abnormal) reaches ``target_sensitivity``.

    Every distinct probability is a candidate (``roc_curve`` with ``drop_intermediate=False``:
    the default drops points a target can fall on)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)
    if target_sensitivity is None:
        best = int(np.argmax(tpr - fpr))
        return float(thresholds[best]), "Youden's J"
    reaching = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
    return float(thresholds[reaching[0]]), f"sensitivity >= {target_sensitivity:g}"


def write_out_of_fold(
    out: Path, runs: list[Path], target_sensitivity: float | None = None
) -> dict[str, Any]:

    rows = out_of_fold(runs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "oof_predictions.csv", buf.getvalue())
    ok = [r for r in rows if r["prob_abnormal"] != ""]
    probs = np.array([float(r["prob_abnormal"]) for r in ok])
    labels = np.array([int(r["label"]) for r in ok])
    if len(set(labels.tolist())) < 2:
        raise DataError("the out-of-fold predictions hold one class only: no threshold")
    threshold, method = choose_threshold(probs, labels, target_sensitivity)
    logits = logits_of(probs)
    temperature = fit_temperature(logits, labels)
    calibrated = 1 / (1 + np.exp(-logits / temperature))
    calibration = {
        "threshold": threshold,
        "threshold_method": method,
        # what the threshold was fitted on; the ensemble's own operating point is measured by
        # app.evaluate on new scans (docs/evaluation.md: the shift a sensitivity target sees)
        "threshold_basis": "out-of-fold probabilities of single fold models",
        "temperature": temperature,
        # the same cut on the temperature-scaled probabilities (the scaling is monotone), the
        # one threshold app.infer, app.evaluate and the bundle use and print: to 4 decimals, so
        # that it reads the same as a percentage to 2 (the console's P(abnormal))
        "threshold_calibrated": round(
            1 / (1 + math.exp(-float(logits_of(np.array([threshold]))[0]) / temperature)), 4
        ),
        "scans": len(ok),
        "failed": len(rows) - len(ok),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
        "ece_before": expected_calibration_error(probs, labels),
        "ece_after": expected_calibration_error(calibrated, labels),
    }
    atomic_write_text(out / CV_CALIBRATION, json.dumps(calibration, indent=1))
    summary_path = out / CV_SUMMARY
    if summary_path.is_file():  # the density baseline out of fold, beside the CNN's
        summary = json.loads(summary_path.read_text())
        summary["baseline"] = baseline_out_of_fold(rows)
        atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return calibration


def baseline_out_of_fold(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The density baseline (``app.evaluation.baseline``) cross-validated on the same folds:
    for each fold, fitted on the other folds' scans and applied to its own; its out-of-fold
    ROC-AUC and the CNN's, and their paired difference (DeLong), on the scans both scored."""

    features = scan_features([str(r["path"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    folds = np.array([int(r["fold"]) for r in rows])
    baseline = np.full(len(rows), np.nan)
    for k in sorted(set(folds.tolist())):
        try:
            fitted = DensityBaseline.fit_features(features[folds != k], labels[folds != k])
        except ValueError:
            return None
        baseline[folds == k] = fitted.predict_features(features[folds == k])
    model = np.array(
        [np.nan if r["prob_abnormal"] == "" else float(r["prob_abnormal"]) for r in rows]
    )
    both = np.isfinite(model) & np.isfinite(baseline)
    if len(set(labels[both].tolist())) < 2:
        return None
    estimates = {
        "baseline_auc": auc_with_ci(baseline[both], labels[both]),
        "model_auc": auc_with_ci(model[both], labels[both]),
        "difference": paired_auc_difference(model[both], baseline[both], labels[both]),
    }
    if not all(math.isfinite(v) for e in estimates.values() for v in (e.value, e.low, e.high)):
        return None
    return {"scans": int(both.sum()), **{k: asdict(e) for k, e in estimates.items()}}
