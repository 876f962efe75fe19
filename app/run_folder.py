"""What a run folder and an exported bundle hold: the names of their files, their metrics and
checkpoints (training, inference and export share this), and ``--overwrite`` removes only
those."""

from __future__ import annotations

import csv
import fnmatch
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from app.errors import ConfigError

#: prefix of the resumable checkpoint saved after every epoch (``last_checkpoint_epoch=N.pt``)
LAST_PREFIX = "last"
#: the best model of a run (train.yaml's ``key_metric_filename`` writes it)
BEST_MODEL = "best_model.pt"
#: what ``app.train`` writes into a run folder (``overrides.json`` first of all)
RUN_ENTRIES = (
    "overrides.json",
    "config.json",
    "environment.json",
    "train.log",
    "metrics.csv",
    "metrics.json",
    "curves.png",
    "montage.png",
    "split.json",
    BEST_MODEL,
    f"{LAST_PREFIX}_checkpoint_epoch=*.pt",
    "tensorboard",
    "tmp*",  # a save killed mid-write (ignite's atomic saver)
    ".*.tmp",  # an atomic write killed mid-write (app.bundle.portable.files)
)
#: what ``app.export`` writes into a bundle folder
BUNDLE_ENTRIES = ("configs", "models", "scripts", "docs", "LICENSE")


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
        entries, signature = RUN_ENTRIES, folder / "overrides.json"
    else:
        entries, signature = BUNDLE_ENTRIES, folder / "configs" / "metadata.json"
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
    """Rows of a ``metrics.csv`` as dicts of floats (``epoch`` as int); [] if there is none."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.append(
                {
                    k: (int(v) if k == "epoch" else (float(v) if v != "" else None))
                    for k, v in row.items()
                }
            )
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
