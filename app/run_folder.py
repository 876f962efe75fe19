"""What a run folder and an exported bundle hold, so that ``--overwrite`` removes only those."""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Iterable
from pathlib import Path

from app.errors import ConfigError

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
    "last_checkpoint_epoch=*.pt",
    "tensorboard",
    "tmp*",  # a save killed mid-write (ignite's atomic saver)
    ".*.tmp",  # an atomic write killed mid-write (app.fileio)
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
