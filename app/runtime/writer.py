"""predictions.csv: one column set, one fsync'd row per scan, for ``app.infer`` and bundles."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write_text

#: ``fold_probs``: a cross-validation ensemble's fold probabilities, ``;``-separated (empty for
#: one model); ``tta_spread``: with test-time augmentation, the standard deviation of the
#: probability across the augmented views (empty without); files written before a column
#: existed are rewritten with it on opening
#: the predictions file of app.infer, an exported bundle and app.evaluate
PREDICTIONS_CSV = "predictions.csv"
#: a severity model's label at its threshold: the binary view, normal vs any finding
BINARY_VIEW = ("normal", "abnormal")

COLUMNS = (
    "path",
    "prob_abnormal",
    "label",
    "warnings",
    "error",
    "seconds",
    "fold_probs",
    "tta_spread",
    "grade",
    "grade_probs",
)


def prediction_row(
    path: str,
    prob: float | None,
    label: str | None,
    warnings: Sequence[str] = (),
    error: str | None = None,
    seconds: float | None = None,
    fold_probs: Sequence[float] | None = None,
    tta_spread: float | None = None,
    grade: str | None = None,
    grade_probs: Sequence[float] | None = None,
) -> dict[str, str]:
    """One row of ``predictions.csv`` (probabilities to 6 decimals; empty fields for what is not
    known). A failed row carries its reason and no warnings: they speak of an output it does not
    have. A severity model's row adds its ``grade`` and each grade's probability, in order,
    ``;``-separated (``grade_probs``); ``prob_abnormal`` is then P(any finding)."""
    return {
        "path": str(path),
        "prob_abnormal": "" if prob is None else f"{float(prob):.6f}",
        "label": label or "",
        "warnings": "" if error else "; ".join(warnings),
        "error": error or "",
        "seconds": "" if seconds is None else f"{float(seconds):.3f}",
        "fold_probs": "" if fold_probs is None else ";".join(f"{float(p):.6f}" for p in fold_probs),
        "tta_spread": "" if tta_spread is None else f"{float(tta_spread):.6f}",
        "grade": grade or "",
        "grade_probs": ""
        if grade_probs is None
        else ";".join(f"{float(p):.6f}" for p in grade_probs),
    }


def sentence(
    path: str,
    prob: float | None,
    label: str | None,
    warnings: Sequence[str],
    error: str | None,
    grade: str | None = None,
    grade_probs: Sequence[float] | None = None,
) -> str:
    """One input's console line, the reference's words for both classes with the scan's
    warnings, or its error: what ``app.infer`` and an exported bundle print per scan; a
    severity model's grade and each grade's probability follow the label."""
    if prob is None:
        return f"{path}: error: {error}"
    note = f"  [warning: {'; '.join(warnings)}]" if warnings else ""
    graded = ""
    if grade is not None and grade_probs:
        each = ", ".join(f"{p:.2f}" for p in grade_probs)
        graded = f"; severity {grade} (the median grade; each grade's probability {each})"
    return (
        f"{path}: This model is {100 * (1 - prob):.2f} percent confident that CT scan is normal "
        f"and {100 * prob:.2f} percent that it is abnormal -> {label}{graded}{note}"
    )


def parse_fold_probs(text: str) -> list[float] | None:
    """The ``fold_probs`` field read back: a list of probabilities, or ``None`` when empty or
    not a list of numbers in [0, 1] (a hand-edited file is data, never trusted)."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(";")]
    except ValueError:
        return None
    return values if len(values) <= 100 and all(0.0 <= v <= 1.0 for v in values) else None


class PredictionCSV:
    """Append-only ``predictions.csv``: each row is written and fsync'd as soon as its scan is
    done, so a crash or kill keeps every finished row; opening an existing file drops a
    half-written last line (a kill mid-write).

    Args:
        path: the CSV file (its folder is created).
        fresh: start an empty file instead of continuing an existing one.
        keep: which existing rows to keep (the others are removed, atomically, before appending).
    """

    def __init__(
        self,
        path: str | Path,
        fresh: bool = False,
        keep: Callable[[dict[str, str]], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.unlink(missing_ok=True)
        self._repair()
        self.rows, header = self._read()
        kept = self.rows if keep is None else [r for r in self.rows if keep(r)]
        if len(kept) != len(self.rows) or header not in (None, list(COLUMNS)):
            self.rows = kept
            self._rewrite(kept)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="")
        if new:
            self._write(",".join(COLUMNS) + "\n")

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _read(self) -> tuple[list[dict[str, str]], list[str] | None]:
        """The existing rows (every column of :data:`COLUMNS`, empty where the file lacks it)
        and the file's own columns (``None``: no file or an empty one)."""
        if not self.path.exists():
            return [], None
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [{k: r.get(k) or "" for k in COLUMNS} for r in reader]
            return rows, None if reader.fieldnames is None else list(reader.fieldnames)

    def _rewrite(self, rows: Iterable[dict[str, str]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())

    def _write(self, text: str) -> None:
        self._file.write(text)  # one write: a kill leaves a whole line or a repairable part
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, row: dict[str, str]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n").writerow(row)
        self._write(buf.getvalue())
        self.rows.append(row)

    def close(self) -> None:
        self._file.close()


class PredictionWriter:
    """A bundle's ``predictions.csv`` (:data:`COLUMNS`), written as batches complete.

    The label comes from the postprocessing's thresholded ``pred`` (the threshold is the
    config's, written once), the probability from ``prob``. A severity model's output also
    holds ``grade_probs`` (``app.runtime.ordinal.SeverityViewd``): its label is then normal or
    abnormal (the binary view) and its grade the median grade's name, as ``app.infer`` writes.

    Args:
        output_dir: folder of the CSV (created).
        class_names: label 0 and label 1 (a severity model's: its grades, in order).
        prob_key: key of the probability in the engine's (decollated) output.
        pred_key: key of the thresholded 0/1 prediction.
        path_key: key of the scan path in the batch.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        prob_key: str = "prob",
        pred_key: str = "pred",
        path_key: str = "path",
    ) -> None:
        self.path = Path(output_dir) / PREDICTIONS_CSV
        self.class_names = list(class_names)
        self.prob_key = prob_key
        self.pred_key = pred_key
        self.path_key = path_key
        self.csv: PredictionCSV | None = None
        self.classified = 0
        self.failed = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Any) -> None:
        self.csv = PredictionCSV(self.path, fresh=True)
        self.classified = self.failed = 0

    def write(self, engine: Any) -> None:
        assert self.csv is not None, "attach() first"
        batch = engine.state.batch  # MONAI engines decollate it into a list of dicts
        paths = (
            [b[self.path_key] for b in batch] if isinstance(batch, list) else batch[self.path_key]
        )
        items = batch if isinstance(batch, list) else [{} for _ in paths]
        for path, item, inputs in zip(paths, engine.state.output, items, strict=True):
            prob = float(item[self.prob_key])
            error = str(inputs.get("error") or "")  # screen.Screened: the scan's checks
            if not error and not math.isfinite(prob):
                error = "the model gave a non-finite probability (NaN or inf): no label"
            warnings = [w for w in str(inputs.get("warnings") or "").split("; ") if w]
            if error:  # a failed scan with its reason, never a probability
                self.csv.append(prediction_row(path, None, None, warnings, error=error))
                print(sentence(path, None, None, [], error), flush=True)
                self.failed += 1
                continue
            grade, grade_probs = None, None
            names = self.class_names
            if item.get("grade_probs") is not None:  # a severity model
                from .ordinal import grades_of  # torch: only where a model runs

                grade_probs = [round(float(q), 6) for q in item["grade_probs"]]
                grade = names[int(grades_of([grade_probs])[0])]
                names = list(BINARY_VIEW)
            label = names[int(float(item[self.pred_key]))]
            self.csv.append(
                prediction_row(
                    path, prob, label, warnings=warnings, grade=grade, grade_probs=grade_probs
                )  # fmt: skip
            )
            print(sentence(path, round(prob, 6), label, warnings, None, grade, grade_probs),
                  flush=True)  # fmt: skip
            self.classified += 1

    def completed(self, engine: Any) -> None:
        if self.csv is not None:
            self.csv.close()

    def exit_status(self) -> None:
        """After the run: print the summary; exit with status 1 when some inputs failed (as
        ``app.infer`` does; their rows say why), else return (``monai.bundle run`` exits 0)."""
        print(f"summary: {self.classified} classified, {self.failed} failed; {self.path}")
        if self.failed:
            raise SystemExit(1)
