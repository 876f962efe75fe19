"""Write a run's per-epoch record: metrics.csv, metrics.json, curves.png (and montage.png)."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from app.plots import plot_curves
from app.run_folder import CURVES, METRICS_CSV, METRICS_JSON, MONTAGE, read_metrics
from app.runtime.files import atomic_write_text
from app.training.handlers.write_budget import WriteBudget, is_final_epoch


class RunRecorder:
    """Record each epoch of a training run in its folder, atomically, one row per epoch.

    Attach to the trainer after the validation handler. At each epoch end it writes
    ``metrics.csv`` and ``metrics.json`` (epoch, train and val loss and accuracy, val ROC-AUC,
    sensitivity, specificity, learning rate, seconds) and redraws ``curves.png``, when
    ``budget`` says so (:class:`WriteBudget`: every epoch on a CPU, every few on a fast GPU; the
    final epoch always; the files hold every epoch up to the one written). A resumed run
    keeps the rows up to its checkpoint's epoch and replaces any later ones, so each epoch
    appears exactly once. At the start it draws ``montage.png`` from ``montage_source()``.

    Args:
        output_dir: the run folder.
        evaluator: the validation engine whose metrics are recorded.
        optimizer: its first parameter group's learning rate is recorded.
        metric_names: the trainer's and the evaluator's metrics, as the config names them.
        montage_source: returns a preprocessed (C, x, y, z) volume for ``montage.png``.
        montage_scan: the datalist entry of that volume (``image``, ``label``), named in its title
            with ``class_names``.
        class_names: label 0 and label 1.
        val_interval: validation runs every ``val_interval`` epochs.
        budget: decides which epochs are written (shared with the checkpoint saver); default:
            every epoch.
    """

    def __init__(
        self,
        output_dir: str | Path,
        evaluator: Engine,
        optimizer: Any,
        metric_names: Sequence[str],
        montage_source: Callable[[], Any] | None = None,
        val_interval: int = 1,
        budget: WriteBudget | None = None,
        montage_scan: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.budget = budget or WriteBudget(1.0)
        #: metrics.csv's columns: the epoch, the engines' metrics as the config names them
        self.columns = ("epoch", *metric_names, "lr", "seconds")
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.montage_source = montage_source
        self.montage_caption = (
            f"{Path(str(montage_scan['image'])).name}, {class_names[int(montage_scan['label'])]}"
            if montage_scan and class_names
            else ""
        )
        self.val_interval = val_interval
        self.rows: list[dict[str, Any]] = []
        self._epoch_start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def started(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        done = engine.state.epoch
        self.rows = [r for r in read_metrics(self.output_dir / METRICS_CSV) if r["epoch"] <= done]
        montage = self.output_dir / MONTAGE
        if self.montage_source is not None and not montage.exists():
            from app.plots import plot_montage

            volume = self.montage_source()
            plot_montage(
                volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume,
                montage,
                title="one preprocessed training scan"
                + (f": {self.montage_caption}" if self.montage_caption else ""),
            )

    def epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        train = engine.state.metrics
        validated = epoch % self.val_interval == 0
        val = self.evaluator.state.metrics if validated else {}
        row: dict[str, Any] = {"epoch": epoch}
        for name in self.columns[1:-2]:  # a trainer metric, else a validation one
            row[name] = _number(train[name] if name in train else val.get(name))
        row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        row["seconds"] = round(time.perf_counter() - self._epoch_start, 3)
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        if self.budget.due(epoch, final=is_final_epoch(engine)):
            with self.budget.timed():
                self.write()

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in self.columns})
        atomic_write_text(self.output_dir / METRICS_CSV, buf.getvalue())
        atomic_write_text(self.output_dir / METRICS_JSON, json.dumps(self.rows, indent=1))

        plot_curves(self.rows, self.output_dir / CURVES)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    value = float(value)
    return None if math.isnan(value) else round(value, 6)
