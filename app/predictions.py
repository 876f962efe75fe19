"""predictions.csv written as it goes (one fsync'd line per scan) and resumable; predictions.json."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from app.classifier import Prediction
from app.errors import ConfigError
from app.fileio import atomic_write_text

COLUMNS = ("path", "prob_abnormal", "label", "warnings", "error", "seconds")
CSV_NAME = "predictions.csv"
JSON_NAME = "predictions.json"


MODEL_NAME = "model.json"


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
        self.csv_path = self.out_dir / CSV_NAME
        if overwrite:
            self.csv_path.unlink(missing_ok=True)
            (self.out_dir / JSON_NAME).unlink(missing_ok=True)
            (self.out_dir / MODEL_NAME).unlink(missing_ok=True)
        if model is not None:
            self._claim(model)
        self._repair()
        self.rows = self.read()
        self.retried = [r["path"] for r in self.rows if r["error"]]
        if self.retried:
            self.rows = [r for r in self.rows if not r["error"]]
            self._rewrite()
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._file = self.csv_path.open("a", newline="")
        if new:
            self._write_line(",".join(COLUMNS) + "\n")

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

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def _repair(self) -> None:
        if not self.csv_path.exists():
            return
        data = self.csv_path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self.csv_path.open("r+b") as f:
                f.truncate(keep)

    def read(self) -> list[dict[str, str]]:
        if not self.csv_path.exists():
            return []
        with self.csv_path.open(newline="") as f:
            return list(csv.DictReader(f))

    @property
    def done(self) -> set[str]:
        return {r["path"] for r in self.rows}

    def _write_line(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, pred: Prediction) -> None:
        row = {
            "path": pred.path,
            "prob_abnormal": "" if pred.prob_abnormal is None else f"{pred.prob_abnormal:.6f}",
            "label": pred.label or "",
            "warnings": "; ".join(pred.warnings),
            "error": pred.error or "",
            "seconds": f"{pred.seconds:.3f}",
        }
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n").writerow(row)
        self._write_line(
            buf.getvalue()
        )  # one write: a kill leaves a whole line or a repairable part
        self.rows.append(row)

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
                }
            )
        atomic_write_text(self.out_dir / JSON_NAME, json.dumps(rows, indent=1))

    def close(self) -> None:
        self._file.close()
