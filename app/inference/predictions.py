"""predictions.csv written as it goes (one fsync'd line per scan) and resumable; predictions.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from app.errors import ConfigError
from app.inference.classifier import Prediction
from app.runtime.files import atomic_write_text
from app.runtime.writer import (
    PREDICTIONS_CSV,
    PredictionCSV,
    parse_fold_probs,
    prediction_row,
)

JSON_NAME = "predictions.json"
MODEL_NAME = "model.json"


def _spread(text: str) -> float | None:
    """``tta_spread`` read back: a number in [0, 0.5], else ``None`` (a file is data)."""

    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 <= value <= 0.5 else None


def is_complete_row(row: dict[str, str]) -> bool:
    """Whether a ``predictions.csv`` row read back is a whole result: a path, a finite
    probability in [0, 1], a short plain label, a number of seconds (or empty) and fold
    probabilities that parse (or empty)."""

    try:
        prob = float(row["prob_abnormal"])
        seconds = float(row["seconds"]) if row.get("seconds") else 0.0
    except (ValueError, TypeError):
        return False
    label = row.get("label") or ""
    return (
        bool(row.get("path"))
        and math.isfinite(prob)
        and 0.0 <= prob <= 1.0
        and math.isfinite(seconds)
        and 0 < len(label) <= 64
        and not label.lstrip().startswith(("$", "@", "%", "="))
        and (not row.get("fold_probs") or parse_fold_probs(row["fold_probs"]) is not None)
    )


class OutputFolderError(ConfigError):
    """The output folder holds predictions of another model or threshold."""


class PredictionLog:
    """Append-only ``predictions.csv`` in ``out_dir``, written by one model.

    Each row is written and fsync'd as soon as its scan is done, so a crash or kill keeps every
    finished row. Opening an existing file drops a half-written last line (a kill mid-write) and
    the rows of inputs that failed (a rerun retries them: their rows are superseded, never
    duplicated), and remembers the inputs already classified, so a rerun adds each remaining
    input exactly once. ``OUT/model.json`` records the model (checkpoint and its SHA-256) and
    threshold that wrote the folder; opening it with another raises :class:`OutputFolderError`.

    Args:
        out_dir: output folder (created).
        overwrite: start a new file instead of completing the existing one.
        model: what identifies the model and its settings (JSON-ready), e.g. checkpoint,
            ``sha256``, threshold.
    """

    def __init__(
        self, out_dir: str | Path, overwrite: bool = False, model: dict[str, Any] | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / PREDICTIONS_CSV
        if overwrite:
            self.csv_path.unlink(missing_ok=True)
            (self.out_dir / JSON_NAME).unlink(missing_ok=True)
            (self.out_dir / MODEL_NAME).unlink(missing_ok=True)
        if model is not None:
            self._claim(model)
        failed: list[str] = []

        def keep(row: dict[str, str]) -> bool:
            # a rerun retries the inputs that failed, and any row that is not a whole result
            # (a hand-edited or damaged file is data: such a row is never counted as done)
            if row["error"] or not is_complete_row(row):
                failed.append(row["path"])
                return False
            return True

        self._csv = PredictionCSV(self.csv_path, keep=keep)
        self.retried = failed

    def _claim(self, model: dict[str, Any]) -> None:
        """Record ``model`` as this folder's, or refuse a folder that another model wrote."""
        record = self.out_dir / MODEL_NAME
        has_rows = self.csv_path.exists() and self.csv_path.stat().st_size > 0
        if record.exists():
            try:
                before = json.loads(record.read_text())
            except (OSError, ValueError):
                before = None
            if before != model:
                changed = (
                    [k for k in sorted(model) if before.get(k) != model.get(k)]
                    if isinstance(before, dict)
                    else ["an unreadable model.json"]
                )
                raise OutputFolderError(
                    f"{self.out_dir} holds predictions of another model or setting "
                    f"({', '.join(changed)} differ: see {record}); add --overwrite to replace "
                    "them, or choose another --output"
                )
            return
        if has_rows:
            raise OutputFolderError(
                f"{self.csv_path} exists without {MODEL_NAME}: which model wrote it is unknown; "
                "add --overwrite to replace it, or choose another --output"
            )
        atomic_write_text(record, json.dumps(model, indent=1))

    @property
    def done(self) -> set[str]:
        return {r["path"] for r in self.rows}

    @property
    def rows(self) -> list[dict[str, str]]:
        return self._csv.rows

    def append(self, pred: Prediction) -> None:
        self._csv.append(
            prediction_row(
                pred.path,
                pred.prob_abnormal,
                pred.label,
                pred.warnings,
                pred.error,
                pred.seconds,
                pred.fold_probs,
                pred.tta_spread,
                pred.grade,
                pred.grade_probs,
            )
        )

    def append_row(self, row: dict[str, str]) -> None:
        """A row another log wrote (one rank's part of a folder), as it is."""
        self._csv.append({k: row.get(k, "") for k in row})

    def write_json(self) -> None:
        rows: list[dict[str, Any]] = []
        for r in self.rows:
            rows.append(
                {
                    "path": r["path"],
                    "prob_abnormal": float(r["prob_abnormal"]) if r["prob_abnormal"] else None,
                    "label": r["label"] or None,
                    "warnings": [w for w in r["warnings"].split("; ") if w],
                    "error": r["error"] or None,
                    "seconds": float(r["seconds"]) if r.get("seconds") else None,
                    # a cross-validation ensemble: each fold model's temperature-scaled
                    # probability (prob_abnormal is their mean); null for one model
                    "fold_probs": parse_fold_probs(r.get("fold_probs", "")),
                    "tta_spread": _spread(r.get("tta_spread", "")),
                    # a severity model: the median grade, each grade's probability in order
                    "grade": r.get("grade") or None,
                    "grade_probs": parse_fold_probs(r.get("grade_probs", "")),
                }
            )
        atomic_write_text(self.out_dir / JSON_NAME, json.dumps(rows, indent=1))

    def close(self) -> None:
        self._csv.close()
