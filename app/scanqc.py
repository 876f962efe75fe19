"""Checks that run before and after a scan is read: refuse what cannot be classified (with a
one-line reason), and warn about what can be classified but looks unusual."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import CTClassifyError


class ScanError(CTClassifyError):
    """This scan cannot be classified; the message says why in one line."""


@dataclass(frozen=True)
class Limits:
    """Caps checked against a header before any voxel is read.

    Args:
        max_voxels: most voxels a scan may have (512 x 512 x 1,144 by default).
        max_bytes: most bytes its voxel data may take on disk, uncompressed.
    """

    max_voxels: int = 300_000_000
    max_bytes: int = 2 * 1024**3


def _oblique_degrees(affine: np.ndarray) -> float:
    """Largest angle between a voxel axis and the nearest world axis, in degrees."""
    rot = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(rot)):
        return 0.0
    cosines = np.abs(rot / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))


def geometry_warnings(
    shape: Sequence[int], zooms: Sequence[float], affine: np.ndarray
) -> list[str]:
    """QC warnings from a scan's geometry: very few slices, oblique axes, unusual spacing."""
    warnings = []
    slices = int(min(shape[:3]))
    if slices < 16:
        warnings.append(f"very few slices ({slices})")
    angle = _oblique_degrees(affine)
    if angle > 1.0:
        warnings.append(f"oblique affine ({angle:.1f} degrees off the scanner axes)")
    in_plane = sorted(float(z) for z in zooms[:3])[:2]
    thickest = max(float(z) for z in zooms[:3])
    if not (min(in_plane) >= 0.3 and max(in_plane) <= 2.0) or not (0.3 <= thickest <= 10.0):
        spacing = " x ".join(f"{float(z):.3g}" for z in zooms[:3])
        warnings.append(f"unusual spacing ({spacing} mm)")
    return warnings


def check_nifti_header(path: str | Path, limits: Limits = Limits()) -> list[str]:
    """Refuse a NIfTI file that cannot hold a classifiable 3D scan, reading its header only.

    Returns QC warnings; raises :class:`ScanError` with a one-line reason otherwise.
    """
    import nibabel as nib

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ScanError("empty file (0 bytes)")
    with path.open("rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if path.name.endswith(".gz") and not compressed:
        raise ScanError("named .nii.gz but not gzip-compressed")
    try:
        img: Any = nib.load(str(path))
        header = img.header
        shape = tuple(int(s) for s in img.shape)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ScanError(f"truncated or corrupt gzip ({exc or type(exc).__name__})") from exc
    except Exception as exc:  # nibabel raises many types for foreign or damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScanError(f"not a NIfTI file ({reason[:160]})") from exc
    if len(shape) < 3:
        raise ScanError(f"not 3D: a {len(shape)}D image of shape {shape}")
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise ScanError(
            f"not 3D: a {len(shape)}D image of shape {shape} ({int(np.prod(shape[3:]))} volumes)"
        )
    if min(shape[:3]) < 1:
        raise ScanError(f"empty image (shape {shape})")
    if min(shape[:3]) == 1:
        raise ScanError(f"not 3D: a single slice of shape {shape}")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > limits.max_voxels:
        raise ScanError(
            f"header claims shape {shape} = {voxels:,} voxels, above the limit of "
            f"{limits.max_voxels:,} (raise it with --max-voxels)"
        )
    itemsize = int(header.get_data_dtype().itemsize)
    nbytes = voxels * itemsize
    if nbytes > limits.max_bytes:
        raise ScanError(f"voxel data of {nbytes:,} bytes exceeds the limit of {limits.max_bytes:,}")
    if not compressed:
        offset = int(header.get("vox_offset", 352) or 352)
        if size < offset + nbytes:
            raise ScanError(
                f"truncated: the header needs {offset + nbytes:,} bytes, the file has {size:,}"
            )
    zooms = [float(z) for z in header.get_zooms()[:3]]
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise ScanError(f"invalid voxel spacing {zooms} in the header")
    return geometry_warnings(shape, zooms, img.affine)


def check_dicom_series(files: Sequence[str], limits: Limits = Limits()) -> list[str]:
    """Refuse a DICOM series whose slices do not form one regular volume; return QC warnings."""
    import pydicom

    headers = []
    for name in files:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise ScanError(
                f"{Path(name).name} has no ImagePositionPatient/ImageOrientationPatient"
            )
        headers.append(ds)
    if len(headers) < 2:
        raise ScanError("not 3D: a DICOM series of a single slice")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) > 1:
        raise ScanError(f"inconsistent DICOM geometry: slices of different sizes {sorted(sizes)}")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise ScanError("inconsistent DICOM geometry: slices with different orientations")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    positions = np.sort(
        [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in headers]
    )
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        raise ScanError("inconsistent DICOM geometry: two slices at the same position")
    median = float(np.median(steps))
    if np.abs(steps - median).max() > max(0.1 * median, 0.05):
        raise ScanError(
            f"inconsistent DICOM geometry: slice steps from {steps.min():.3g} to {steps.max():.3g} mm "
            "(missing slices or a gap)"
        )
    rows, cols = sizes.pop()
    voxels = rows * cols * len(headers)
    if voxels > limits.max_voxels:
        raise ScanError(f"series of {voxels:,} voxels exceeds the limit of {limits.max_voxels:,}")
    pixel = [float(v) for v in getattr(headers[0], "PixelSpacing", [1.0, 1.0])]
    affine = np.eye(4)
    affine[:3, 0] = orientations[0][:3] * pixel[1]
    affine[:3, 1] = orientations[0][3:] * pixel[0]
    affine[:3, 2] = normal * median
    return geometry_warnings((cols, rows, len(headers)), (pixel[1], pixel[0], median), affine)


def check_values(volume: np.ndarray) -> list[str]:
    """Refuse non-finite voxels; warn when values do not look like Hounsfield units."""
    finite = np.isfinite(volume)
    if not finite.all():
        raise ScanError(f"{int((~finite).sum()):,} voxels are NaN or infinite")
    low = float(volume.min())
    high = float(volume.max())
    if low > -900 or float((volume < -900).mean()) < 0.01:
        return [
            f"values do not look like HU (range {low:.4g}..{high:.4g}, no air near -1000): "
            "already normalised or 8-bit data? the model expects HU"
        ]
    return []
