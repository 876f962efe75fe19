"""Evaluate a model on a labelled test set: the work behind ``python -m app.evaluate``.

``evaluate(...)`` classifies every scan, measures the figures with their intervals
(``app.evaluation.metrics``), fits the density baseline on the model's own training scans
(``app.evaluation.baseline``), and writes metrics.json, predictions.csv, the plots and
report.html (``app.evaluation.report``); it returns an :class:`Evaluation`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from app.cli import config_values
from app.data.datalist import UNREADABLE, find_items, scan_sha256
from app.errors import EXIT_REFUSED, CTClassifyError, UsageError
from app.evaluation.baseline import NoBaseline, baseline_figures
from app.evaluation.metrics import (
    BinaryMetrics,
    Estimate,
    binary_metrics,
    ensemble_figures,
    evaluation_settings,
)
from app.evaluation.plots import (
    CALIBRATION_PNG,
    CONFUSION_PNG,
    ROC_PNG,
    plot_calibration,
    plot_confusion,
    plot_roc,
)
from app.evaluation.report import write_report
from app.evaluation.severity import severity_metrics
from app.model_settings import split_hashes
from app.readback import read_split
from app.run_folder import METRICS_JSON, REPORT_HTML, SPLIT, fold_dirs, fold_number
from app.runtime.files import atomic_write_text
from app.runtime.scanqc import FAR_SPACING, GENERATED_WARNING, TrainingContext
from app.runtime.writer import PREDICTIONS_CSV

if TYPE_CHECKING:  # the classifier loads PyTorch: app.evaluate's --help must not
    from app.inference.classifier import Classifier

__all__ = [
    "Evaluation",
    "EvaluationError",
    "Independence",
    "check_independence",
    "evaluate",
    "evaluate_defaults",
]

#: what an evaluation folder holds
FILES = (METRICS_JSON, PREDICTIONS_CSV, ROC_PNG, CALIBRATION_PNG, CONFUSION_PNG, REPORT_HTML)


class EvaluationError(CTClassifyError):
    """The test set gives no figures: no scan classified, or one class only (exit status 2)."""

    exit_status = EXIT_REFUSED


def _recorded_splits(checkpoint: Path) -> list[tuple[str, dict[str, Any]]]:
    """The ``split.json`` of the run folder at ``checkpoint``, or of each fold of a
    cross-validation folder, as ``(prefix, split)``: none for a bundle or a bare file."""

    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    splits = [("", folder / SPLIT)]
    splits += [(f"fold {fold_number(p)} ", p / SPLIT) for p in fold_dirs(folder)]
    return [(prefix, read_split(path)) for prefix, path in splits if path.is_file()]


@dataclass
class Independence:
    """Whether a test set is new to a model: ``status`` True (nothing the model trained or
    validated on, checked by content), False (``overlap`` names those it used) or
    ``"unknown"`` (the model records no content hashes of its scans); ``how``: in words."""

    status: bool | str
    overlap: dict[str, str]
    how: str


def check_independence(
    settings: dict[str, Any], checkpoint: Path, paths: list[str]
) -> Independence:
    """Which of ``paths`` the model trained or validated on (``path -> "training"``,
    ``"validation"``, ``"fold k training"``...): by content, against the SHA-256 of every
    training and validation scan its checkpoint or bundle records (``training_data.scan_sha256``:
    copies, hard links and moved files are found), and by path, against its run folder's
    ``split.json`` (relative paths resolved against the folder the training ran in). Reads each
    test scan once; the training scans are never re-read."""

    used: dict[str, str] = {}
    for prefix, split in _recorded_splits(checkpoint):
        for part in ("training", "validation"):
            for item in split[part]:
                used.setdefault(os.path.realpath(item["image"]), f"{prefix}{part}")
    found = {p: used[os.path.realpath(p)] for p in paths if os.path.realpath(p) in used}
    recorded = (settings.get("training_data") or {}).get("scan_sha256")
    if not recorded:
        how = (
            "unknown: the model records no content hashes of its training scans (a checkpoint "
            "written before they were recorded, or a bundle without configs/training_scans.json)"
            + (
                f"; compared by path only, with {len(used)} scans of its split.json"
                if used
                else "; and no split.json beside it to compare paths with"
            )
        )
        return Independence(False if found else "unknown", found, how)
    parts = {part: split_hashes(recorded[part]) for part in ("training", "validation")}
    for path in paths:
        digest = scan_sha256(path)
        for part, hashes in parts.items():
            if path not in found and digest != UNREADABLE and digest in hashes:
                found[path] = f"{part} (same content)"
    scans = sum(len(h) for h in parts.values())
    how = f"compared by content with the {scans} training and validation scans the model records"
    return Independence(not found, found, how + (" and by path" if used else ""))


def evaluate_defaults() -> dict[str, Any]:
    """``app.evaluate``'s defaults: ``batch_size`` and ``num_workers`` (``common.yaml``, as
    ``app.infer``), then ``evaluate.yaml``'s ``evaluation`` and the threshold
    (:func:`app.evaluation.metrics.evaluation_settings`)."""

    return {**config_values("common.yaml"), **evaluation_settings()}


def _overlap_text(overlap: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for where in overlap.values():
        counts[where] = counts.get(where, 0) + 1
    return ", ".join(f"{n} in {where}" for where, n in sorted(counts.items()))


@dataclass
class Evaluation:
    """The result of :func:`evaluate`."""

    metrics: BinaryMetrics
    predictions: list[dict[str, Any]]
    model: dict[str, Any]
    data: str
    date: str
    failed: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    #: a cross-validation ensemble's fold models: ``{"fold", "roc_auc": Estimate, "brier",
    #: "ece"}`` each (empty for one model)
    folds: list[dict[str, Any]] = field(default_factory=list)
    #: an ensemble's ``{"temperature", "before": {nll, brier, ece}, "after": {...}}``
    calibration: dict[str, Any] | None = None
    #: with ``allow_overlap``: ``{"scans", "used_for"}`` of test scans the model trained or
    #: validated on (every figure is then not independent); ``None`` when there were none
    overlap: dict[str, Any] | None = None
    #: the density baseline on the same scans: ``{"what", "trained_on", "scans", "roc_auc":
    #: Estimate, "difference": Estimate (model minus baseline, DeLong paired), "verdict"}``
    baseline: dict[str, Any] | None = None
    #: why there is no baseline (``None`` when there is one, or it was not asked for)
    baseline_note: str | None = None
    #: how independence was checked (:class:`Independence`); ``None``: not checked
    independence: Independence | None = None
    #: a severity model's grade figures (:mod:`app.evaluation.severity`), with the burden
    #: baseline's under ``baseline``; ``None`` for a binary model
    severity: dict[str, Any] | None = None

    @property
    def independent(self) -> bool | str:
        """Whether no test scan was used in the model's training or validation: True (checked
        by content), False, or ``"unknown"`` (nothing to compare with)."""
        if self.overlap is not None:
            return False
        return "unknown" if self.independence is None else self.independence.status

    @property
    def scan_warnings(self) -> dict[str, int]:
        """How many test scans carry warnings: any, voxel spacing far from the training scans',
        real CT given to a model of generated scans (``real_on_generated_model``)."""
        said = [str(r.get("warnings") or "") for r in self.predictions if r["prob_abnormal"] != ""]
        return {
            "warned": sum(1 for w in said if w),
            "far_spacing": sum(1 for w in said if FAR_SPACING in w),
            "real_on_generated_model": sum(1 for w in said if GENERATED_WARNING in w),
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per metric (value, CI, method): ``pandas.DataFrame(evaluation.table())``.
        An ensemble adds ``fold K roc_auc`` rows, and ``nll``, ``brier`` and ``ece`` ``before
        temperature`` and ``after temperature``."""
        rows = self.metrics.rows()
        nan = math.nan
        rows += [_estimate_row(f"fold {f['fold']} roc_auc", f["roc_auc"]) for f in self.folds]
        if self.baseline:
            rows.append(_estimate_row("baseline roc_auc", self.baseline["roc_auc"]))
            rows.append(_estimate_row("roc_auc - baseline", self.baseline["difference"]))
        if self.calibration:
            for when in ("before", "after"):
                for name, value in self.calibration[when].items():
                    rows.append(
                        {
                            "metric": f"{name} {when} temperature",
                            "value": value,
                            "ci_low": nan,
                            "ci_high": nan,
                            "method": f"temperature {self.calibration['temperature']:.3g}",
                        }
                    )
        return rows

    def summary(self) -> dict[str, Any]:
        """What metrics.json holds."""
        return {
            "model": self.model,
            "data": self.data,
            "date": self.date,
            "failed": self.failed,
            "independent": self.independent,
            "independence": None if self.independence is None else self.independence.how,
            "overlap": self.overlap,
            "metrics": {**self.metrics.as_dict(), "rows": self.metrics.rows()},
            "folds": [{**f, "roc_auc": asdict(f["roc_auc"])} for f in self.folds],
            "baseline": None
            if self.baseline is None
            else {
                **self.baseline,
                "roc_auc": asdict(self.baseline["roc_auc"]),
                "difference": asdict(self.baseline["difference"]),
            },
            "calibration": self.calibration,
            "baseline_note": self.baseline_note,
            "scan_warnings": self.scan_warnings,
            "severity": self.severity,
        }


def _estimate_row(metric: str, e: Estimate) -> dict[str, Any]:
    return {
        "metric": metric,
        "value": e.value,
        "ci_low": e.low,
        "ci_high": e.high,
        "method": e.method,
    }


def evaluate(
    data: str | Path,
    checkpoint: str | Path | None = None,
    output: str | Path | None = None,
    *,
    device: str = "auto",
    threshold: float | None = None,
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    n_resamples: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_overlap: bool = False,
    auc_ci: str | None = None,
    with_baseline: bool = True,
    tta: bool = False,
) -> Evaluation:
    """Classify every scan of the labelled set ``data`` with the model at ``checkpoint`` (run
    folder, checkpoint file or exported bundle) and measure it; with ``output``, write the
    files listed in the module docstring there. ``None``: the configs' value (``batch_size``,
    ``num_workers``: ``common.yaml``; the rest: ``evaluate.yaml``'s ``evaluation``).

    Raises:
        DataError: ``data`` has no labelled scans.
        CheckpointError: the model cannot be loaded.
        UsageError: ``output`` holds an evaluation already (pass ``overwrite``), a value is
            out of range, or test scans were used in the model's training or validation (their
            run folders' ``split.json``), unless ``allow_overlap``.
        EvaluationError: no scan could be classified, or those classified are of one class.
    """
    from app.inference.classifier import Classifier

    settings = _settings(batch_size, workers, n_resamples, seed, auc_ci, threshold)
    out = None if output is None else Path(output)
    if out is not None and (out / METRICS_JSON).exists() and not overwrite:
        raise UsageError(f"{out} holds an evaluation already: pass --overwrite to replace it")
    clf = Classifier.load(checkpoint, device=device, threshold=threshold, precision=precision)
    items = find_items(data, class_names=clf.grades)
    clf.tta = tta
    independence = _independence(clf, [str(i["image"]) for i in items], allow_overlap)
    overlap = independence.overlap
    labels = [int(cast(int, item["label"])) for item in items]
    rows = _classify(
        clf,
        [str(item["image"]) for item in items],
        labels,
        settings["batch_size"],
        settings["workers"],
        progress,
    )
    ok = _classified(rows, clf.class_names)
    metrics, folds, calibration = _figures(clf, ok, settings)
    severity, baseline, baseline_note = _baselines(clf, rows, ok, settings, with_baseline, progress)
    result = Evaluation(
        metrics=metrics,
        folds=folds,
        calibration=calibration,
        predictions=rows,
        model=_model_record(clf, tta),
        data=str(data),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        failed=len(rows) - len(ok),
        overlap={"scans": len(overlap), "used_for": _overlap_text(overlap)} if overlap else None,
        baseline=baseline,
        baseline_note=baseline_note,
        independence=independence,
        severity=severity,
    )
    if out is not None:
        result.files = _write(result, out, clf.label_names)
    return result


def _settings(
    batch_size: int | None,
    workers: int | None,
    n_resamples: int | None,
    seed: int | None,
    auc_ci: str | None,
    threshold: float | None,
) -> dict[str, Any]:
    """The evaluation's settings: the given ones, the configs' for ``None``; checked."""
    defaults = evaluate_defaults()
    given = {  # argument: (value, its config key)
        "batch_size": (batch_size, "batch_size"),
        "workers": (workers, "num_workers"),
        "n_resamples": (n_resamples, "bootstrap_resamples"),
        "seed": (seed, "bootstrap_seed"),
        "auc_ci": (auc_ci, "auc_ci"),
    }
    settings = {k: defaults[key] if v is None else v for k, (v, key) in given.items()}
    settings["confidence"] = float(defaults["confidence"])
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError("--threshold must be in [0, 1]")
    if int(settings["n_resamples"]) < 100:
        raise UsageError("--bootstrap needs at least 100 resamples")
    return settings


def _independence(clf: Classifier, paths: list[str], allow_overlap: bool) -> Independence:
    """Whether the test scans are new to the model (:func:`check_independence`); test scans it
    trained or validated on are refused unless ``allow_overlap``."""
    independence = check_independence(clf.settings, Path(str(clf.checkpoint)), paths)
    overlap = independence.overlap
    if overlap and not allow_overlap:
        raise UsageError(
            f"{len(overlap)} of the {len(paths)} test scans were used by the model "
            f"({_overlap_text(overlap)}, e.g. {next(iter(overlap))}): its figures on them would "
            "not be independent; evaluate on scans it never saw, or pass --allow-overlap to "
            "evaluate anyway (every figure is then marked as not independent)"
        )
    return independence


def _classified(rows: list[dict[str, Any]], class_names: list[str]) -> list[dict[str, Any]]:
    """The rows with a probability; refused when none, or when all are of one class."""
    ok = [r for r in rows if r["prob_abnormal"] != ""]
    if not ok:
        first = next((r["error"] for r in rows if r["error"]), "")
        raise EvaluationError(
            f"none of the {len(rows)} scans could be classified (first error: {first[:200]}): "
            "no figures"
        )
    if len({int(r["true_label"]) > 0 for r in ok}) < 2:
        raise EvaluationError(
            f"the {len(ok)} classified scans are all of one class "
            f"({class_names[int(ok[0]['true_label'])]}): ROC-AUC, sensitivity and specificity need "
            "scans of both classes"
        )
    return ok


def _figures(
    clf: Classifier, ok: list[dict[str, Any]], settings: dict[str, Any]
) -> tuple[BinaryMetrics, list[dict[str, Any]], dict[str, Any] | None]:
    """The metrics of the classified rows, and for an ensemble its folds' and calibration (a
    severity model's binary view: normal vs any grade)."""
    labels = np.array([int(int(r["true_label"]) > 0) for r in ok])
    common = {
        "confidence": settings["confidence"],
        "n_resamples": int(settings["n_resamples"]),
        "seed": int(settings["seed"]),
        "auc_method": str(settings["auc_ci"]),
    }
    metrics = binary_metrics(
        np.array([float(r["prob_abnormal"]) for r in ok]), labels, threshold=clf.threshold, **common
    )
    if not clf.folds:
        return metrics, [], None
    folds, calibration = ensemble_figures(  # a cross-validation ensemble: its members too
        np.array([[float(r[f"prob_fold_{k}"]) for k in range(clf.folds)] for r in ok]),
        labels,
        temperature=float(clf.settings["ensemble"]["temperature"]),
        **common,
    )
    return metrics, folds, calibration


def _baselines(
    clf: Classifier,
    rows: list[dict[str, Any]],
    ok: list[dict[str, Any]],
    settings: dict[str, Any],
    with_baseline: bool,
    progress: bool,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """A severity model's grade figures (with the burden baseline's), the density baseline's
    figures, and why there is no baseline (``None`` where there is one or none was asked)."""
    severity = None if not clf.grades else _severity(clf.grades, ok, settings)
    baseline, baseline_note = None, None
    if with_baseline:
        try:
            baseline = baseline_figures(
                Path(str(clf.checkpoint)), rows, settings["confidence"], progress, clf.grades
            )
        except NoBaseline as exc:
            baseline_note = f"no density baseline: {exc}"
    graded = None if baseline is None else baseline.pop("graded", None)
    if severity is not None and clf.grades and graded is not None:
        severity["baseline"] = _graded_baseline(clf.grades, ok, graded, settings)
        if severity["baseline"] is None:
            severity["baseline_note"] = "no burden baseline: no test scan's lung was found"
    return severity, baseline, baseline_note


def _severity(
    grades: list[str], ok: list[dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    """A severity model's grade figures (:func:`app.evaluation.severity.severity_metrics`)."""
    return severity_metrics(
        np.array([int(r["true_label"]) for r in ok]),
        np.array([[float(p) for p in r["grade_probs"].split(";")] for r in ok]),
        grades,
        confidence=settings["confidence"],
        n_resamples=int(settings["n_resamples"]),
        seed=int(settings["seed"]),
        auc_method=str(settings["auc_ci"]),
    )


def _graded_baseline(
    grades: list[str], ok: list[dict[str, Any]], graded: list[int], settings: dict[str, Any]
) -> dict[str, Any] | None:
    """The burden baseline's grades (:func:`app.evaluation.baseline.burden_grades`) judged as
    the model's: kappa, grade error and accuracy on the scans where it found lung; ``None``
    where it found lung in none."""
    true = np.array([int(r["true_label"]) for r in ok])
    found = np.array(graded) >= 0
    if not found.any():
        return None
    one_hot = np.eye(len(grades))[np.clip(graded, 0, None)][found]
    figures = severity_metrics(
        true[found], one_hot, grades, confidence=settings["confidence"],
        n_resamples=int(settings["n_resamples"]), seed=int(settings["seed"]),
    )  # fmt: skip
    figures.pop("per_grade")  # one grade per scan: no ranking to score
    figures["what"] = (
        "share of the lung at ground-glass or consolidation density, cut between grades where "
        "it best splits the model's training scans (app.evaluation.baseline.burden_grades)"
    )
    return figures


def _model_record(clf: Classifier, tta: bool) -> dict[str, Any]:
    """What metrics.json says of the model."""

    return {
        **clf.identity(),
        "description": clf.describe(),
        "precision": clf.precision,
        "threshold_method": (clf.settings.get("ensemble") or {}).get("threshold_method"),
        "tta": "left-right flip" if tta else None,
        "generated": TrainingContext.from_settings(clf.settings).generated,
    }


def _classify(
    clf: Classifier,
    paths: list[str],
    labels: list[int],
    batch_size: int,
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    names, called = clf.class_names, clf.label_names
    rows = []
    with tqdm(total=len(paths), unit="scan", disable=not progress, file=sys.stderr) as bar:
        for path, label, pred in zip(
            paths,
            labels,
            clf.predict_many(paths, batch_size=batch_size, workers=workers),
            strict=True,
        ):
            prob = pred.prob_abnormal
            ok = prob is not None
            predicted = int(prob >= clf.threshold) if prob is not None else None
            row: dict[str, Any] = {
                "path": path,
                "true_label": label,
                "true_name": names[label],
                "prob_abnormal": prob if ok else "",
                "predicted": "" if predicted is None else predicted,
                "predicted_name": "" if predicted is None else called[predicted],
                "error": pred.error or "",
                "warnings": "; ".join(pred.warnings),  # as app.infer writes them
            }
            if clf.grades:  # a severity model: its grade and each grade's probability
                row["grade"] = pred.grade or ""
                row["grade_probs"] = ";".join(f"{p:.6f}" for p in pred.grade_probs or [])
            if clf.tta:  # the spread across the scan and its mirror: an uncertainty
                row["tta_spread"] = pred.tta_spread if ok and pred.tta_spread is not None else ""
            for k in range(clf.folds):  # an ensemble: each fold model's (scaled) probability
                row[f"prob_fold_{k}"] = pred.fold_probs[k] if ok and pred.fold_probs else ""
            rows.append(row)
            bar.update(1)
    return rows


def _write(result: Evaluation, out: Path, class_names: list[str]) -> dict[str, Path]:

    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result.predictions if r["prob_abnormal"] != ""]
    probs = np.array([float(r["prob_abnormal"]) for r in ok])
    labels = np.array([int(int(r["true_label"]) > 0) for r in ok])  # severity: any grade
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result.predictions[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.predictions)
    atomic_write_text(out / PREDICTIONS_CSV, buf.getvalue())
    summary = result.summary()
    atomic_write_text(out / METRICS_JSON, json.dumps(summary, indent=1, default=_json_default))
    plot_roc(probs, labels, result.metrics, out / ROC_PNG)
    temperature = (result.calibration or {}).get("temperature")
    plot_calibration(probs, labels, result.metrics, out / CALIBRATION_PNG, temperature=temperature)
    plot_confusion(result.metrics, out / CONFUSION_PNG, class_names)
    write_report(summary, result.predictions, out)
    return {name: out / name for name in FILES}


def _json_default(value: Any) -> Any:
    """``json.dumps``'s ``default``: a path as its text; anything else is refused."""
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
