"""What a run folder, a cross-validation folder, an exported bundle and the output folders of
``app.infer`` and ``app.evaluate`` hold: the names of their files (each spelled here once), a
run's metrics and checkpoints (training, inference and export share this), and what
``--overwrite`` removes."""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from app.config import METADATA
from app.errors import ConfigError
from app.readback import ReadBackError, read_finished
from app.runtime.files import atomic_write_text

#: prefix of the resumable checkpoint saved after every epoch (``last_checkpoint_epoch=N.pt``)
LAST_PREFIX = "last"
#: the best model of a run (train.yaml's ``key_metric_filename`` writes it)
BEST_MODEL = "best_model.pt"
#: the run's split (a MONAI datalist) with the record of how it was made
SPLIT = "split.json"
#: the validation metrics a run records, and the words every printed line and plot uses for them
VALIDATION_LABELS = {
    "val_acc": "accuracy",
    "val_auc": "ROC-AUC",
    "val_sensitivity": "sensitivity",
    "val_specificity": "specificity",
}


#: a severity run's words for the same keys, and its own (the grade's figures, then the binary
#: view: normal vs any finding)
SEVERITY_LABELS = {
    "val_acc": "grade accuracy",
    "val_mae": "mean absolute grade error",
    "val_auc": "ROC-AUC (any finding)",
    "val_sensitivity": "sensitivity",
    "val_specificity": "specificity",
}


def validation_figures(row: Mapping[str, Any]) -> str:
    """``row``'s validation metrics in words, e.g. "accuracy 0.944, ROC-AUC 1.000" (a severity
    run's, with ``val_mae``: "grade accuracy ..., mean absolute grade error ...")."""
    labels = SEVERITY_LABELS if row.get("val_mae") is not None else VALIDATION_LABELS
    return ", ".join(
        f"{name} {row[key]:.3f}" for key, name in labels.items() if row.get(key) is not None
    )


#: a row of metrics per epoch (``read_metrics`` reads it back), and the same as JSON
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
#: the command-line overrides a run was started with (read back on --resume), the whole config
#: as MONAI resolved it, and the libraries and machine it ran on
OVERRIDES = "overrides.json"
CONFIG_RECORD = "config.json"
ENVIRONMENT = "environment.json"
#: the learning curves and the montage of a training scan
CURVES = "curves.png"
MONTAGE = "montage.png"
#: a cross-validation folder's summary of its folds, and its out-of-fold threshold and temperature
CV_SUMMARY = "cv_summary.json"
CV_CALIBRATION = "cv_calibration.json"
#: the page ``app.infer --report`` and ``app.evaluate`` write
REPORT_HTML = "report.html"
#: an exported bundle's mark
BUNDLE_MARKER = ".ctclassify-bundle.json"
#: a single model's temperature and threshold, chosen on its validation split
#: (``app.training.operating_point``)
OPERATING_POINT = "operating_point.json"
#: written when a run's training ended (early stop or its last epoch), removed when it resumes
FINISHED = "finished.json"
#: the training's log (``app.train`` copies every log line there)
TRAIN_LOG = "train.log"
#: ``--tracking mlflow``: the run's MLflow store, run name and id (``app.training.tracking``)
TRACKING = "tracking.json"
#: the default MLflow store, a SQLite database in the run folder, its artifacts beside it
TRACKING_DB = "mlruns.db"
TRACKING_ARTIFACTS = "mlartifacts"
#: a cross-validation folder's fold runs: ``fold-0`` ... ``fold-{K-1}``
FOLD_PREFIX = "fold-"
#: what ``app.train`` writes into a run folder (``overrides.json`` first of all)
RUN_ENTRIES = (
    OVERRIDES,
    CONFIG_RECORD,
    ENVIRONMENT,
    TRAIN_LOG,
    METRICS_CSV,
    METRICS_JSON,
    CURVES,
    MONTAGE,
    SPLIT,
    FINISHED,
    BEST_MODEL,
    OPERATING_POINT,
    f"{LAST_PREFIX}_checkpoint_epoch=*.pt",
    "tensorboard",
    TRACKING,
    TRACKING_DB,
    TRACKING_ARTIFACTS,
    "config_*.json",  # the resolved config MONAI's tracking saves (and logs) at the start
    "tmp*",  # a save killed mid-write (ignite's atomic saver)
    ".*.tmp",  # an atomic write killed mid-write (app.runtime.files)
)
#: what ``app.export`` writes into a bundle folder
BUNDLE_ENTRIES = ("configs", "models", "scripts", "docs", "LICENSE", BUNDLE_MARKER)


def _unknown(folder: Path, patterns: Iterable[str]) -> list[str]:
    patterns = tuple(patterns)
    return sorted(
        p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, x) for x in patterns)
    )


def remove_own_folder(folder: Path, kind: str) -> None:
    """Remove ``folder`` for ``--overwrite`` if :func:`check_own_folder` recognises it."""
    check_own_folder(folder, kind)
    if folder.exists():
        shutil.rmtree(folder)


def check_own_folder(folder: Path, kind: str) -> None:
    """Raise :class:`ConfigError` unless ``folder`` is absent, empty, or recognisably a ``kind``
    folder (``run`` or ``bundle``) written by ctclassify and holding nothing else."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError(f"--overwrite: {folder} is not a folder (a file or a link): not removed")
    if not folder.exists():
        return
    entries: tuple[str, ...]
    if kind == "run":
        entries, signature = RUN_ENTRIES, folder / OVERRIDES
    else:
        entries, signature = BUNDLE_ENTRIES, folder / "configs" / METADATA
    if not any(folder.iterdir()):
        return
    unknown = _unknown(folder, entries)
    if not signature.is_file() or unknown:
        what = f"it holds {', '.join(unknown[:5])}" if unknown else f"it has no {signature.name}"
        raise ConfigError(
            f"--overwrite: {folder} does not look like a {kind} folder written by ctclassify "
            f"({what}); nothing was removed: choose another --output or remove it yourself"
        )


def kept_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The epoch ``best_model.pt`` holds: the first with the best validation accuracy (None
    when no epoch was validated)."""
    validated = [r for r in rows if r.get("val_acc") is not None]
    return max(validated, key=lambda r: (r["val_acc"], -int(r["epoch"]))) if validated else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` as dicts of floats (``epoch`` as int); [] if there is none.

    Read as data: columns are plain metric names (``epoch``, ``val_acc``...), ``epoch`` a
    whole number from 1, every other value a finite number or empty, at most 100,000 rows and
    16 MB; anything else is a :class:`app.readback.ReadBackError` naming the file, row and column.
    """

    path = Path(path)
    if not path.exists():
        return []
    if path.stat().st_size > 16 * 1024**2:
        raise ReadBackError(f"{path} is larger than 16 MB: not a run's metrics")
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            bad = next((n for n in names if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", n)), None)
            if bad is not None or "epoch" not in names:
                raise ReadBackError(
                    f"{path}: column {str(bad)[:60]!r} is not a metric name"
                    if bad is not None
                    else f"{path}: no 'epoch' column"
                )
            for number, row in enumerate(reader, start=2):
                if number > 100_001:
                    raise ReadBackError(f"{path}: more than 100,000 rows")
                out: dict[str, Any] = {}
                for key, text in row.items():
                    if key is None or text is None:
                        raise ReadBackError(f"{path}, line {number}: not one value per column")
                    try:
                        value = int(text) if key == "epoch" else (float(text) if text else None)
                    except ValueError:
                        value = math.nan
                    if key == "epoch" and (not isinstance(value, int) or value < 1):
                        raise ReadBackError(
                            f"{path}, line {number}: column 'epoch' must be a whole number from "
                            f"1, got {text[:40]!r}"
                        )
                    if isinstance(value, float) and not math.isfinite(value):
                        raise ReadBackError(
                            f"{path}, line {number}: column {key!r} must be a finite number or "
                            f"empty, got {text[:40]!r}"
                        )
                    out[key] = value
                rows.append(out)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReadBackError(f"{path} cannot be read ({str(exc)[:200]})") from None
    return rows


def last_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every ``last_checkpoint_epoch=N.pt`` in ``run_dir``."""
    found = []
    for path in Path(run_dir).glob(f"{LAST_PREFIX}_checkpoint_epoch=*.pt"):
        try:
            found.append((int(path.stem.rsplit("=", 1)[1]), path))
        except ValueError:
            continue
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``last_checkpoint_epoch=N.pt`` in ``run_dir`` (highest N), or ``None``."""
    found = last_checkpoints(run_dir)
    return max(found)[1] if found else None


def mark_finished(run_dir: str | Path, epoch: int, reason: str) -> None:
    """Record that the run in ``run_dir`` ended at ``epoch`` (:data:`FINISHED`)."""

    atomic_write_text(
        Path(run_dir) / FINISHED, json.dumps({"epoch": int(epoch), "reason": str(reason)[:400]})
    )


def is_finished(run_dir: str | Path) -> bool:
    """Whether the run's record says its training ended; its :data:`FINISHED` file is checked
    as data (a malformed one is refused, naming the file)."""

    path = Path(run_dir) / FINISHED
    if not path.is_file():
        return False
    read_finished(path)
    return True


def fold_dir(folder: str | Path, fold: int) -> Path:
    """Fold ``fold``'s run folder in the cross-validation folder ``folder``."""
    return Path(folder) / f"{FOLD_PREFIX}{fold}"


def fold_number(path: str | Path) -> int:
    """The fold a fold folder holds (``fold-3`` -> 3)."""
    return int(Path(path).name.removeprefix(FOLD_PREFIX))


def fold_dirs(folder: str | Path) -> list[Path]:
    """The ``fold-K`` folders of a cross-validation folder, in fold order."""
    found = [
        p
        for p in Path(folder).glob(f"{FOLD_PREFIX}*")
        if p.name.removeprefix(FOLD_PREFIX).isdigit()
    ]
    return sorted(found, key=fold_number)
