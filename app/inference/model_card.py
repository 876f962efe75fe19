"""What a model is and where it does not apply: the lines ``app.infer`` prints before it
classifies, and what identifies the predictions a model wrote."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.run_folder import VALIDATION_LABELS, fold_dirs, validation_figures

#: below these a validation figure is called "little better than chance" (accuracy, ROC-AUC) or
#: a class is never found (sensitivity, specificity)
CHANCE_FLOORS = {"val_acc": 0.6, "val_auc": 0.6, "val_sensitivity": 0.01, "val_specificity": 0.01}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensemble_digest(folder: Path) -> str:
    """The content digest of a cross-validation ensemble: SHA-256 over each fold's
    ``best_model.pt`` SHA-256 (in fold order) and its ``cv_calibration.json``, so predictions
    written by one ensemble are never continued by another in the same folder."""

    folds = fold_dirs(folder)
    parts = [f"{p.name}:{_file_sha256(p / 'best_model.pt')}" for p in folds]
    parts.append(f"calibration:{_file_sha256(folder / 'cv_calibration.json')}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """A model's settings (validated), checkpoint, threshold and class names.

    Args:
        settings: the checkpoint's validated settings (``training_data``, ``validation``...).
        checkpoint: where the weights came from.
        threshold: P(abnormal) from which a scan is abnormal.
        class_names: label 0 and label 1.
    """

    settings: dict[str, Any]
    checkpoint: Path | None
    threshold: float
    class_names: list[str]

    def identity(self) -> dict[str, Any]:
        """What identifies this model's predictions: checkpoint, its SHA-256, threshold, classes."""
        digest = None
        if self.checkpoint is not None and self.checkpoint.is_file():
            digest = _file_sha256(self.checkpoint)
        elif self.checkpoint is not None and self.settings.get("ensemble"):
            digest = ensemble_digest(self.checkpoint)
        return {
            "checkpoint": str(self.checkpoint.resolve()) if self.checkpoint else None,
            "sha256": digest,
            "threshold": self.threshold,
            "class_names": self.class_names,
            # binary: normal vs abnormal; severity: ordered grades (the class names), the
            # threshold on P(any grade above the first)
            "task": self.task,
        }

    @property
    def task(self) -> str:
        """``binary`` or ``severity`` (a model of more than two ordered grades)."""
        return "severity" if int(self.settings.get("grades", 2)) > 2 else "binary"

    def describe(self) -> str:
        """One line: the model, what it was trained on, and how it did on its validation data."""
        data = self.settings.get("training_data") or {}
        if data:
            counts = data.get("class_counts") or [None] * len(self.class_names)
            kind = "generated" if data.get("generated") else "real"
            each = ", ".join(
                f"{n} {name}" for n, name in zip(counts, self.class_names, strict=False)
            )
            trained = (
                f"trained on {data.get('scans')} {kind} scans ({each}) from "
                f"{data.get('source', 'unknown')}"
            )
        else:
            source = self.settings.get("dataset_dir")
            trained = f"trained on {source}" if source else "training data not recorded"
        ensemble = self.settings.get("ensemble")
        if ensemble:  # a cross-validation ensemble: the record is one fold's
            trained = f"{ensemble['members']} fold models, each {trained}"
        val = self.settings.get("validation") or {}
        if val:
            where = (
                f"validation at epoch {val['epoch']}"
                if "epoch" in val
                else "cross-validation, mean over the folds"
            )
            scored = f"{where}: {validation_figures(val)}"
        else:
            scored = "validation metrics not recorded"
        what = ""
        if self.task == "severity":
            what = (
                f"a severity model ({self.settings.get('ordinal_head', 'softmax')} head) of grades "
                f"{', '.join(self.class_names)}, "
            )
        return f"{self.checkpoint}: {what}{trained}; {scored}; {self.threshold_line()}"

    def threshold_line(self) -> str:
        """The threshold, and where the model's own was chosen with what it gave there."""
        point = self.settings.get("operating_point")
        if not point or abs(self.threshold - float(self.settings.get("threshold", -1))) > 1e-12:
            return f"threshold {self.threshold:g}"
        temperature = float(self.settings.get("temperature", 1.0))
        return describe_operating_point(point, self.threshold, temperature)

    def caveats(self) -> list[str]:
        """Warnings about the model itself, for the console (not per scan)."""
        notes = []
        data = self.settings.get("training_data") or {}
        if data.get("generated"):
            notes.append(
                "this model was trained on generated scans (app.data synth / --demo): its answers "
                "on real CT are not evidence of anything; train on MosMedData for real use"
            )
        val = self.settings.get("validation") or {}
        weak = [
            f"{name} {val[key]:.2f}"
            for key, name in VALIDATION_LABELS.items()
            if val.get(key) is not None and val[key] < CHANCE_FLOORS[key]
        ]
        if weak:
            notes.append(
                f"this model did little better than chance on its validation data "
                f"({', '.join(weak)} "
                + (f"at epoch {val['epoch']})" if "epoch" in val else "over the folds)")
            )
        if not val:
            notes.append("this model's validation metrics are unknown (no metrics.csv beside it)")
        method = (self.settings.get("ensemble") or {}).get("threshold_method", "")
        if method.startswith("sensitivity"):
            notes.append(
                f"the threshold was chosen for {method} on single fold models' out-of-fold "
                "predictions; the ensemble's mean of "
                f"{self.settings['ensemble']['members']} models is less spread, so its "
                "sensitivity on new scans is usually higher and its specificity lower than that "
                "target implies: measure them with app.evaluate"
            )
        return notes


def describe_operating_point(point: dict[str, Any], threshold: float, temperature: float) -> str:
    """One line for the console: a single model's threshold, how it was chosen on its validation
    split (``app.training.operating_point``; ``point`` as ``app.model_settings`` checked it),
    and what it gave there."""
    if not point["chosen"]:
        return f"threshold {threshold:g} ({point['method']})"

    def ci(v: list[float]) -> str:
        return f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})"

    return (
        f"threshold {threshold:g} on P(abnormal), temperature "
        f"{temperature:.3g} ({point['method']}, {point['scans']} scans: sensitivity "
        f"{ci(point['sensitivity'])}, specificity {ci(point['specificity'])} there; chosen on "
        "those scans, so expect less on new ones: measure with app.evaluate)"
    )
