"""Atomic file writes: a kill at any moment leaves the previous file or the new one, never half.

Portable (the bundle carries it): ``app`` and the bundle's predictions writer share it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under the usual 022).

    Read from /proc where it is shown, so the process-wide umask is never changed, not even for
    an instant another thread could see; elsewhere set and restored.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return 0o666 & ~current


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then fsync and rename ``tmp_path`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp makes 0600 files; give the final file the mode any other new file gets (0644 under
    # the usual umask), so a report or JSON is as readable as the CSV beside it
    os.fchmod(fd, file_mode())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    atomic_write(path, write)
