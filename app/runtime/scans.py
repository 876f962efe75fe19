"""Find the scans under a folder: NIfTI files, and DICOM series (one input per SeriesInstanceUID).

The one scan finder: ``app.infer``, ``app.data.datalist`` and an exported bundle's ``monai.bundle
run`` (:func:`find_scans`) all use it.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .scanqc import dicom_module

SCAN_SUFFIXES = (".nii.gz", ".nii")


def is_scan_name(name: str) -> bool:
    """A scan's file name: ``.nii``/``.nii.gz``, not hidden, not a temporary file being written
    (``*.tmp.nii.gz`` of older versions of ``app.data synth``)."""
    return name.endswith(SCAN_SUFFIXES) and not name.startswith(".") and ".tmp.nii" not in name


@dataclass(frozen=True)
class ScanInput:
    """One input to classify.

    Args:
        key: what identifies it in outputs (file path, series folder, or ``folder#SeriesUID``).
        kind: ``nifti``, ``dicom`` or ``unreadable`` (found but not openable: reported as an error).
        files: the files of a DICOM series (empty for NIfTI).
        problem: why an ``unreadable`` input cannot be read.
        folder: the folder a DICOM series was found in (its key may add ``#SeriesUID``; the
            folder's own name may hold a ``#`` too).
    """

    key: str
    kind: str
    files: tuple[str, ...] = field(default_factory=tuple)
    problem: str = ""
    folder: str = ""


def _is_dicom(path: Path) -> bool:
    """A DICOM file by its name or its preamble (``transforms.dicom``, which reads the series)."""
    return bool(dicom_module().looks_dicom(path))


def _dicom_series(folder: Path, files: list[Path]) -> tuple[list[ScanInput], list[ScanInput]]:
    """Group ``files`` by SeriesInstanceUID; files pydicom cannot parse become error inputs."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[str]] = defaultdict(list)
    bad: list[ScanInput] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            groups[str(getattr(ds, "SeriesInstanceUID", "") or "unknown")].append(str(path))
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as exc:
            bad.append(
                ScanInput(str(path), "unreadable", problem=f"not a readable DICOM file ({exc})")
            )
    series = [
        ScanInput(
            str(folder) if len(groups) == 1 else f"{folder}#{uid}",
            "dicom",
            tuple(sorted(paths)),
            folder=str(folder),
        )
        for uid, paths in sorted(groups.items())
    ]
    return series, bad


def _not_regular(path: Path) -> str:
    """Why ``path`` is not read as a file (a named pipe, socket or device: reading it could
    block forever or never end), or ``""`` for a regular file (or a link to one)."""

    try:
        mode = path.stat().st_mode
    except OSError:
        return ""  # the reader reports what it cannot open
    if stat.S_ISREG(mode):
        return ""
    kind = (
        "a named pipe"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    )
    return f"{kind}, not a regular file: not read"


def find_inputs(root: str | Path) -> list[ScanInput]:
    """Every NIfTI file and DICOM series under ``root`` (recursively), sorted by key.

    Symbolic-link loops, unreadable folders and unreadable files become ``unreadable`` inputs,
    so they are reported next to the results instead of stopping the run.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        odd = _not_regular(root)
        if odd:
            return [ScanInput(str(root), "unreadable", problem=odd)]
        kind = "nifti" if root.name.endswith(SCAN_SUFFIXES) else "dicom"
        return [ScanInput(str(root), kind, (str(root),) if kind == "dicom" else ())]
    found: list[ScanInput] = []

    def on_error(exc: OSError) -> None:
        found.append(
            ScanInput(
                str(exc.filename), "unreadable", problem=f"cannot list folder ({exc.strerror})"
            )
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        dicom_files: list[Path] = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = folder / name
            if path.is_symlink() and not path.exists():
                found.append(
                    ScanInput(str(path), "unreadable", problem="broken or looping symbolic link")
                )
                continue
            if name.endswith(SCAN_SUFFIXES) and not is_scan_name(name):
                continue  # a temporary file being written
            odd = _not_regular(path)
            if odd:
                if name.endswith(SCAN_SUFFIXES):  # named as a scan: say why it is not read
                    found.append(ScanInput(str(path), "unreadable", problem=odd))
                continue
            if name.endswith(SCAN_SUFFIXES):
                if not os.access(path, os.R_OK):
                    found.append(ScanInput(str(path), "unreadable", problem="permission denied"))
                else:
                    found.append(ScanInput(str(path), "nifti"))
            elif _is_dicom(path):
                dicom_files.append(path)
        if dicom_files:
            series, bad = _dicom_series(folder, dicom_files)
            found.extend(series + bad)
    return sorted(found, key=lambda s: s.key)


def find_scans(root: str | Path) -> list[dict[str, str]]:
    """:func:`find_inputs` as a MONAI datalist ``[{"image": ..., "path": key, "problem": ...}]``
    for a bundle's ``monai.bundle run``: every NIfTI file and DICOM series, each of several series
    in one folder too (``path`` ``folder#SeriesUID``), and what cannot be read with its
    ``problem``, so that each input gets a row (``screen.Screened`` turns a problem into a
    failed row). Raises ``FileNotFoundError`` when ``root`` holds no input at all."""
    found = find_inputs(root)
    if not found:
        raise FileNotFoundError(f"no .nii/.nii.gz scan or DICOM series under {root}")
    items = []
    for scan in found:
        image = scan.folder if scan.kind == "dicom" and scan.folder else scan.key
        items.append({"image": image, "path": scan.key, "problem": scan.problem})
    return items
