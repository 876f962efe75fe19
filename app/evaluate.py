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

From Python: ``app.evaluate.evaluate(...)`` returns an :class:`Evaluation`; its ``table()`` is a
list of rows for ``pandas.DataFrame``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from app.cli import (
    add_device_option,
    add_precision_option,
    add_progress_option,
    config_values,
    fail,
    show_progress,
)
from app.errors import EXIT_REFUSED, CTClassifyError, UsageError
from app.evaluation.metrics import BinaryMetrics, Estimate, binary_metrics, ensemble_figures

__all__ = ["Evaluation", "build_parser", "evaluate", "main"]

FILES = (
    "metrics.json",
    "predictions.csv",
    "roc.png",
    "calibration.png",
    "confusion.png",
    "report.html",
)


class EvaluationError(CTClassifyError):
    """The test set gives no figures: no scan classified, or one class only (exit status 2)."""

    exit_status = EXIT_REFUSED


def scans_the_model_used(checkpoint: Path, paths: list[str]) -> dict[str, str]:
    """Which of ``paths`` the model at ``checkpoint`` trained or validated on (``path ->
    "training"``, ``"validation"``, ``"fold k training"``...), from the ``split.json`` of its
    run folder, or of each fold of a cross-validation folder. Files are compared by their real
    paths (``./x``, links); a bundle records no scans and gives ``{}``."""
    import os

    from app.readback import read_split
    from app.run_folder import SPLIT, fold_dirs

    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    splits = [("", folder / SPLIT)]
    splits += [(f"fold {p.name[5:]} ", p / SPLIT) for p in fold_dirs(folder)]
    used: dict[str, str] = {}
    for prefix, path in splits:
        if path.is_file():
            split = read_split(path)
            for part in ("training", "validation"):
                for item in split[part]:
                    used.setdefault(os.path.realpath(item["image"]), f"{prefix}{part}")
    found = {}
    for scan in paths:
        where = used.get(os.path.realpath(scan))
        if where is not None:
            found[scan] = where
    return found


def training_scans(checkpoint: Path) -> list[dict[str, Any]] | None:
    """The scans the model at ``checkpoint`` trained on (its run's ``split.json`` training
    part; for a cross-validation folder every scan of its folds), as ``{image, label}``; None
    when no split is recorded (a bundle, a bare checkpoint file)."""
    from app.readback import read_split
    from app.run_folder import SPLIT

    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (folder / SPLIT).is_file():
        return read_split(folder / SPLIT)["training"]
    if (folder / "fold-0" / SPLIT).is_file():
        split = read_split(folder / "fold-0" / SPLIT)
        return split["training"] + split["validation"]
    return None


def evaluate_defaults() -> dict[str, Any]:
    """``app.evaluate``'s defaults: ``batch_size`` and ``num_workers`` (``common.yaml``, as
    ``app.infer``), then ``evaluate.yaml``'s ``evaluation`` and the threshold
    (:func:`app.evaluation.metrics.evaluation_settings`)."""
    from app.evaluation.metrics import evaluation_settings

    return {**config_values("common.yaml"), **evaluation_settings()}


def baseline_figures(
    checkpoint: Path,
    rows: list[dict[str, Any]],
    confidence: float,
    progress: bool,
) -> dict[str, Any] | None:
    """The density baseline (``app.evaluation.baseline``) fitted on the model's own training
    scans, on the classified test scans: its ROC-AUC with its interval and the model's paired
    difference (DeLong); None when the training scans are not recorded or not readable."""
    from app.evaluation.baseline import DensityBaseline
    from app.evaluation.metrics import auc_with_ci, paired_auc_difference

    train = training_scans(checkpoint)
    if not train:
        return None
    present = [t for t in train if Path(t["image"]).exists()]
    try:
        baseline = DensityBaseline.fit(
            [t["image"] for t in present], [t["label"] for t in present], progress=progress
        )
    except ValueError:
        return None
    for r in rows:
        r["prob_baseline"] = ""
    ok = [r for r in rows if r["prob_abnormal"] != ""]
    probs = baseline.predict([r["path"] for r in ok], progress=progress)
    both = np.isfinite(probs)
    labels = np.array([int(r["label"]) for r in ok])[both]
    model = np.array([float(r["prob_abnormal"]) for r in ok])[both]
    for r, p in zip(ok, probs, strict=True):
        r["prob_baseline"] = "" if not np.isfinite(p) else round(float(p), 6)
    if len(set(labels.tolist())) < 2:
        return None
    difference = paired_auc_difference(model, probs[both], labels, confidence)
    return {
        "what": "lung-density features + logistic regression (app.evaluation.baseline)",
        "trained_on": baseline.scans,
        "scans": int(both.sum()),
        "roc_auc": auc_with_ci(probs[both], labels, confidence),
        "difference": difference,
        "verdict": (
            "the model beats its density baseline"
            if difference.low > 0
            else "the model does NOT beat its density baseline (the difference's interval "
            "reaches 0 or below)"
        ),
    }


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

    @property
    def independent(self) -> bool:
        """Whether no test scan was used in the model's training or validation."""
        return self.overlap is None

    def table(self) -> list[dict[str, Any]]:
        """One row per metric (value, CI, method): ``pandas.DataFrame(evaluation.table())``.
        An ensemble adds ``fold K roc_auc`` rows, and ``nll``, ``brier`` and ``ece`` ``before
        temperature`` and ``after temperature``."""
        rows = self.metrics.rows()
        nan = math.nan
        for f in self.folds:
            e: Estimate = f["roc_auc"]
            rows.append(
                {
                    "metric": f"fold {f['fold']} roc_auc",
                    "value": e.value,
                    "ci_low": e.low,
                    "ci_high": e.high,
                    "method": e.method,
                }
            )
        if self.baseline:
            for name in ("roc_auc", "difference"):
                e = self.baseline[name]
                rows.append(
                    {
                        "metric": f"baseline {name}" if name == "roc_auc" else "roc_auc - baseline",
                        "value": e.value,
                        "ci_low": e.low,
                        "ci_high": e.high,
                        "method": e.method,
                    }
                )
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
    from app.bundle.portable.scanqc import TrainingContext
    from app.data.datalist import find_items
    from app.inference.classifier import Classifier

    defaults = evaluate_defaults()
    batch_size = int(defaults["batch_size"] if batch_size is None else batch_size)
    workers = int(defaults["num_workers"] if workers is None else workers)
    n_resamples = int(defaults["bootstrap_resamples"] if n_resamples is None else n_resamples)
    seed = int(defaults["bootstrap_seed"] if seed is None else seed)
    auc_ci = str(defaults["auc_ci"] if auc_ci is None else auc_ci)
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError("--threshold must be in [0, 1]")
    if n_resamples < 100:
        raise UsageError("--bootstrap needs at least 100 resamples")
    out = None if output is None else Path(output)
    if out is not None and (out / "metrics.json").exists() and not overwrite:
        raise UsageError(f"{out} holds an evaluation already: pass --overwrite to replace it")
    items = find_items(data)
    clf = Classifier.load(checkpoint, device=device, threshold=threshold, precision=precision)
    clf.tta = tta
    overlap = scans_the_model_used(Path(str(clf.checkpoint)), [str(i["image"]) for i in items])
    if overlap and not allow_overlap:
        raise UsageError(
            f"{len(overlap)} of the {len(items)} test scans were used by the model "
            f"({_overlap_text(overlap)}, e.g. {next(iter(overlap))}): its figures on them would "
            "not be independent; evaluate on scans it never saw, or pass --allow-overlap to "
            "evaluate anyway (every figure is then marked as not independent)"
        )
    labels = [int(cast(int, item["label"])) for item in items]
    rows = _classify(
        clf, [str(item["image"]) for item in items], labels, batch_size, workers, progress
    )
    ok = [r for r in rows if r["prob_abnormal"] != ""]
    if not ok:
        first = next((r["error"] for r in rows if r["error"]), "")
        raise EvaluationError(
            f"none of the {len(rows)} scans could be classified (first error: {first[:200]}): "
            "no figures"
        )
    if len({int(r["label"]) for r in ok}) < 2:
        raise EvaluationError(
            f"the {len(ok)} classified scans are all of one class ({clf.class_names[int(ok[0]['label'])]}): "
            "ROC-AUC, sensitivity and specificity need scans of both classes"
        )
    metrics = binary_metrics(
        np.array([float(r["prob_abnormal"]) for r in ok]),
        np.array([int(r["label"]) for r in ok]),
        threshold=clf.threshold,
        n_resamples=n_resamples,
        seed=seed,
        auc_method=auc_ci,
    )
    baseline = (
        baseline_figures(Path(str(clf.checkpoint)), rows, defaults["confidence"], progress)
        if with_baseline
        else None
    )
    folds: list[dict[str, Any]] = []
    calibration = None
    if clf.folds:  # a cross-validation ensemble: its members and its calibration too
        folds, calibration = ensemble_figures(
            np.array([[float(r[f"prob_fold_{k}"]) for k in range(clf.folds)] for r in ok]),
            np.array([int(r["label"]) for r in ok]),
            temperature=float(clf.settings["ensemble"]["temperature"]),
            n_resamples=n_resamples,
            seed=seed,
            auc_method=auc_ci,
        )
    result = Evaluation(
        metrics=metrics,
        folds=folds,
        calibration=calibration,
        predictions=rows,
        model={
            **clf.identity(),
            "description": clf.describe(),
            "precision": clf.precision,
            "threshold_method": (clf.settings.get("ensemble") or {}).get("threshold_method"),
            "tta": "left-right flip" if tta else None,
            "generated": TrainingContext.from_settings(clf.settings).generated,
        },
        data=str(data),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        failed=len(rows) - len(ok),
        overlap={"scans": len(overlap), "used_for": _overlap_text(overlap)} if overlap else None,
        baseline=baseline,
    )
    if out is not None:
        result.files = _write(result, out, clf.class_names)
    return result


def _classify(
    clf: Any,
    paths: list[str],
    labels: list[int],
    batch_size: int,
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    from tqdm import tqdm

    names = clf.class_names
    rows = []
    with tqdm(total=len(paths), unit="scan", disable=not progress, file=sys.stderr) as bar:
        for path, label, pred in zip(
            paths,
            labels,
            clf.predict_many(paths, batch_size=batch_size, workers=workers),
            strict=True,
        ):
            ok = pred.prob_abnormal is not None
            predicted = int(pred.prob_abnormal >= clf.threshold) if ok else ""
            row = {
                "path": path,
                "label": label,
                "label_name": names[label],
                "prob_abnormal": pred.prob_abnormal if ok else "",
                "predicted": predicted,
                "predicted_name": names[predicted] if ok else "",
                "error": pred.error or "",
            }
            if clf.tta:  # the spread across the scan and its mirror: an uncertainty
                row["tta_spread"] = pred.tta_spread if ok and pred.tta_spread is not None else ""
            for k in range(clf.folds):  # an ensemble: each fold model's (scaled) probability
                row[f"prob_fold_{k}"] = pred.fold_probs[k] if ok and pred.fold_probs else ""
            rows.append(row)
            bar.update(1)
    return rows


def _write(result: Evaluation, out: Path, class_names: list[str]) -> dict[str, Path]:
    from app.bundle.portable.files import atomic_write_text
    from app.evaluation.plots import plot_calibration, plot_confusion, plot_roc
    from app.evaluation.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in result.predictions if r["prob_abnormal"] != ""]
    probs = np.array([float(r["prob_abnormal"]) for r in ok])
    labels = np.array([int(r["label"]) for r in ok])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result.predictions[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.predictions)
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    summary = result.summary()
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1, default=_plain))
    plot_roc(probs, labels, result.metrics, out / "roc.png")
    temperature = (result.calibration or {}).get("temperature")
    plot_calibration(
        probs, labels, result.metrics, out / "calibration.png", temperature=temperature
    )
    plot_confusion(result.metrics, out / "confusion.png", class_names)
    write_report(summary, result.predictions, out)
    return {name: out / name for name in FILES}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


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
    p.add_argument(
        "--batch-size",
        type=int,
        default=int(defaults["batch_size"]),
        help="scans per forward pass (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(defaults["num_workers"]),
        help="reading processes (default %(default)s; 0: a thread)",
    )
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
    print(
        f"{m.n} scans ({m.n_positive} abnormal, {m.n_negative} normal), {result.failed} failed; "
        f"threshold {m.threshold:g}; {int(100 * m.confidence)}% confidence intervals"
    )
    for row in result.table():
        ci = "" if math.isnan(row["ci_low"]) else f" ({row['ci_low']:.3f} to {row['ci_high']:.3f})"
        print(f"  {row['metric']:<24} {row['value']:.3f}{ci}")
    if result.baseline:
        print(f"baseline: {result.baseline['verdict']}")
    method = result.model.get("threshold_method") or ""
    if method.startswith("sensitivity"):
        print(
            f"operating point: the threshold was chosen for {method} on single fold models' "
            f"out-of-fold predictions; this ensemble measured sensitivity {m.sensitivity.text()}, "
            f"specificity {m.specificity.text()} here"
        )
    print(f"report: {result.files['report.html']}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
