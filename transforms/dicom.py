"""DICOM series read as DICOM defines them: slices ordered by their position along the slice
normal (ImagePositionPatient onto the normal of ImageOrientationPatient), not by InstanceNumber,
which is optional, may be out of order, and says nothing about geometry.

A series may hold files that are not its slices: a localizer (``ImageType`` LOCALIZER, or an
orientation the other slices do not share) is left out and said so. Two slices at one position
are refused, naming both files. The slices may step along a direction that is not the normal (a
gantry tilt): the affine follows the step, and the series is said to be tilted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: orientation cosines that differ by more than this are another orientation
ORIENTATION_TOLERANCE = 1e-3
#: a step between slice positions shorter than this (mm) puts two slices at one position
SAME_POSITION_MM = 1e-3
#: a slice step this far (degrees) from the normal is a gantry tilt worth saying
TILT_DEGREES = 0.5


class DicomSeriesError(ValueError):
    """The files cannot be read as one series; the message names the files."""


@dataclass
class OrderedSeries:
    """The slices of a series in position order along their normal.

    Args:
        files: the slice files, in order.
        headers: their pydicom datasets (pixels included where read with them).
        normal: the slice normal (unit vector, DICOM's LPS patient space).
        positions: each slice's position along the normal (mm).
        notes: what was left out or is unusual, one line each (localizers, a gantry tilt).
    """

    files: list[str]
    headers: list[Any]
    normal: np.ndarray
    positions: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> np.ndarray:
        """The mean step between consecutive slices' ImagePositionPatient (LPS, mm)."""
        first = np.asarray([float(v) for v in self.headers[0].ImagePositionPatient])
        if len(self.headers) < 2:
            return self.normal * float(getattr(self.headers[0], "SliceThickness", 1.0) or 1.0)
        last = np.asarray([float(v) for v in self.headers[-1].ImagePositionPatient])
        return (last - first) / (len(self.headers) - 1)

    def tilt_degrees(self) -> float:
        """Angle between the slices' step and their normal (0 without a gantry tilt)."""
        step = self.step
        norm = float(np.linalg.norm(step))
        if norm == 0:
            return 0.0
        return float(np.degrees(np.arccos(np.clip(abs(step @ self.normal) / norm, 0, 1))))


def _name(path: str) -> str:
    return Path(path).name


def _is_localizer(ds: Any) -> bool:
    kinds = [str(v).upper() for v in ensure_tuple(getattr(ds, "ImageType", ()))]
    return "LOCALIZER" in kinds


def order_series(files: Sequence[str], headers: Sequence[Any]) -> OrderedSeries:
    """The slices of one series in order of their position along the slice normal.

    Localizers (``ImageType`` LOCALIZER) and files whose orientation differs from the most
    common one are left out, with a note. Refused (:class:`DicomSeriesError`, naming files): a
    file without ImagePositionPatient or ImageOrientationPatient, non-finite geometry, no
    slice left, two slices at one position.
    """
    kept: list[tuple[str, Any, np.ndarray]] = []
    localizers: list[str] = []
    for name, ds in zip(files, headers, strict=True):
        if _is_localizer(ds):
            localizers.append(_name(name))
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise DicomSeriesError(
                f"{_name(name)} has no ImagePositionPatient/ImageOrientationPatient: its place "
                "in the volume is unknown"
            )
        try:
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        except (TypeError, ValueError) as exc:
            raise DicomSeriesError(f"{_name(name)}: unreadable geometry ({exc})") from exc
        if orientation.shape != (6,) or position.shape != (3,):
            raise DicomSeriesError(f"{_name(name)}: ImageOrientationPatient/Position malformed")
        if not (np.isfinite(orientation).all() and np.isfinite(position).all()):
            raise DicomSeriesError(f"{_name(name)}: non-finite ImageOrientation/PositionPatient")
        kept.append((name, ds, orientation))
    notes = []
    if localizers:
        notes.append(f"{len(localizers)} localizer image(s) left out ({', '.join(localizers[:3])})")
    if not kept:
        raise DicomSeriesError(f"no slices in the series ({len(files)} files, all localizers)")
    groups: list[list[int]] = []
    for i, (_, _, orientation) in enumerate(kept):
        for group in groups:
            if np.abs(kept[group[0]][2] - orientation).max() <= ORIENTATION_TOLERANCE:
                group.append(i)
                break
        else:
            groups.append([i])
    main = max(groups, key=len)
    others = [_name(kept[i][0]) for g in groups if g is not main for i in g]
    if others:
        notes.append(
            f"{len(others)} file(s) of another orientation left out (a localizer?): "
            f"{', '.join(others[:3])}"
        )
    chosen = [kept[i] for i in main]
    orientation = chosen[0][2]
    normal = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise DicomSeriesError(f"{_name(chosen[0][0])}: ImageOrientationPatient is degenerate")
    normal = normal / norm
    positions = np.asarray(
        [
            float(normal @ np.asarray([float(v) for v in ds.ImagePositionPatient]))
            for _, ds, _ in chosen
        ]
    )
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    names = [chosen[i][0] for i in order]
    same = np.flatnonzero(np.diff(positions) < SAME_POSITION_MM)
    if len(same):
        a, b = names[same[0]], names[same[0] + 1]
        raise DicomSeriesError(
            f"two slices at one position ({positions[same[0]]:.2f} mm along the normal): "
            f"{_name(a)} and {_name(b)} (duplicates, or two series with one SeriesInstanceUID)"
        )
    series = OrderedSeries(names, [chosen[i][1] for i in order], normal, positions, notes)
    tilt = series.tilt_degrees()
    if tilt > TILT_DEGREES:
        series.notes.append(f"gantry tilt of {tilt:.1f} degrees (the affine follows it)")
    return series


def series_affine(series: OrderedSeries) -> np.ndarray:
    """The RAS affine of the volume indexed (column, row, slice in position order), as MONAI's
    ``PydicomReader`` with ``swap_ij`` builds it, with the third column the slices' own step
    (a gantry tilt shears it)."""
    ds = series.headers[0]
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    spacing = [float(v) for v in getattr(ds, "PixelSpacing", (1.0, 1.0))]
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]  # along a row: the next column
    lps[:3, 1] = orientation[3:] * spacing[0]  # along a column: the next row
    lps[:3, 2] = series.step if len(series.headers) > 1 else series.normal
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _hu(ds: Any) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return (ds.pixel_array.astype(np.float32) * slope + intercept).T  # (column, row)


def series_files(source: str | os.PathLike[str] | Sequence[str]) -> tuple[list[str], str | None]:
    """The DICOM files a source names, and the SeriesInstanceUID it selects (or ``None``): a
    folder (its DICOM files, not recursive), ``FOLDER#UID`` (one series of a folder), or a
    list of files."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        uid = None
        if not os.path.isdir(text) and "#" in text and os.path.isdir(text.rsplit("#", 1)[0]):
            text, uid = text.rsplit("#", 1)
        if os.path.isdir(text):
            names = sorted(str(p) for p in Path(text).iterdir() if p.is_file() and looks_dicom(p))
            return names, uid
        return [text], None
    return [os.fspath(s) for s in source], None


def looks_dicom(path: Path) -> bool:
    """A DICOM file by its name (:data:`DICOM_SUFFIXES`) or the ``DICM`` after its preamble."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_series(source: str | os.PathLike[str] | Sequence[str]) -> OrderedSeries:
    """Read a DICOM series (:func:`series_files` names the sources) with its pixels, in position
    order (:func:`order_series`). Errors name the user's files."""
    import pydicom

    files, uid = series_files(source)
    if not files:
        raise DicomSeriesError(f"no DICOM files in {os.fspath(source)}")  # type: ignore[arg-type]
    headers = []
    for name in files:
        try:
            ds = pydicom.dcmread(name)
        except Exception as exc:  # pydicom raises many types for damaged files
            raise DicomSeriesError(f"cannot read DICOM file {_name(name)}: {exc}") from exc
        if uid is None or str(getattr(ds, "SeriesInstanceUID", "")) == uid:
            headers.append((name, ds))
    if not headers:
        raise DicomSeriesError(f"no file of series {uid} in {files[0]}'s folder")
    return order_series([n for n, _ in headers], [d for _, d in headers])


class DicomSeriesReader(ImageReader):
    """A MONAI ``ImageReader`` for DICOM series, slices in position order (:func:`order_series`):
    a folder, ``FOLDER#SeriesInstanceUID``, or a list of slice files is one volume, indexed
    (column, row, slice) with an RAS affine, as MONAI's ``PydicomReader`` (``swap_ij``) gives it
    for a well-formed series (``tests/test_dicom.py`` compares them). The metadata's
    ``dicom_notes`` carries what :func:`order_series` noted."""

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        names = [os.fspath(f) for f in ensure_tuple(filename)]
        return all(
            os.path.isdir(n)
            or n.lower().endswith(DICOM_SUFFIXES)
            or ("#" in n and os.path.isdir(n.rsplit("#", 1)[0]))
            for n in names
        )

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> OrderedSeries:
        names = ensure_tuple(data)
        if not self.verify_suffix(names):
            raise DicomSeriesError(f"not a DICOM series: {names[0]}")
        return read_series(names[0] if len(names) == 1 else names)

    def get_data(self, img: OrderedSeries) -> tuple[np.ndarray, dict[str, Any]]:
        volume = np.stack([_hu(ds) for ds in img.headers], axis=-1)
        affine = series_affine(img)
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(volume.shape),
            "original_channel_dim": "no_channel",
            "space": "RAS",
            "filename_or_obj": img.files[0],
            "dicom_notes": list(img.notes),
        }
        return volume, meta
