"""Checks that run before and after a scan is read: refuse what cannot be classified (with a
one-line reason), and warn about what can be classified but looks unusual.

Portable (numpy, nibabel; scipy and pydicom where a check needs them): ``app.infer`` and an
exported bundle's ``monai.bundle run`` run the same checks (:mod:`.screen`).
"""

from __future__ import annotations

import gzip
import importlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ScanError(ValueError):
    """This scan cannot be classified; the message says why in one line."""


#: ``descrip`` of every scan ``app.data synth`` writes: how training and inference tell
#: generated scans from real ones
GENERATED_DESCRIP = "ctclassify synth"


def is_generated(header: Any) -> bool:
    """Whether a NIfTI header is that of a scan written by ``app.data synth``."""
    try:
        descrip = bytes(header["descrip"]).split(b"\x00")[0].decode("ascii", "replace")
    except (KeyError, TypeError, ValueError):
        return False
    return descrip.startswith(GENERATED_DESCRIP)


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


@dataclass(frozen=True)
class TrainingContext:
    """What a model was trained on, for warnings about scans unlike its training scans.

    Args:
        generated: the training scans were made by ``app.data synth`` (or ``--demo``).
        spacing_min: smallest voxel spacing of the training scans, per sorted axis (mm).
        spacing_max: largest, per sorted axis (mm).
    """

    generated: bool = False
    spacing_min: tuple[float, ...] | None = None
    spacing_max: tuple[float, ...] | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainingContext:
        data = settings.get("training_data") or {}
        low, high = data.get("spacing_min"), data.get("spacing_max")
        return cls(
            generated=bool(data.get("generated", False)),
            spacing_min=tuple(low) if low else None,
            spacing_max=tuple(high) if high else None,
        )


#: how far (as a factor) a scan's spacing may lie outside the training scans' before a warning
SPACING_FACTOR = 2.0
#: the words of that warning (app.evaluate counts the test scans that carry it)
FAR_SPACING = "is far from the training scans'"
GENERATED_WARNING = (
    "the model was trained on generated scans (app.data synth), not on real CT: its output on "
    "this scan means little"
)


def training_warnings(
    zooms: Sequence[float], generated: bool, training: TrainingContext | None
) -> list[str]:
    """Warnings for a scan unlike the model's training scans: real CT given to a model trained
    on generated data, voxel spacing far outside the training scans' range."""
    if training is None:
        return []
    warnings = []
    if training.generated and not generated:
        warnings.append(GENERATED_WARNING)
    if training.spacing_min and training.spacing_max:
        mine = sorted(float(z) for z in zooms[:3])
        low = [float(z) / SPACING_FACTOR for z in training.spacing_min]
        high = [float(z) * SPACING_FACTOR for z in training.spacing_max]
        if any(not lo <= z <= hi for z, lo, hi in zip(mine, low, high, strict=True)):
            seen = " x ".join(
                f"{a:.3g}" if a == b else f"{a:.3g}-{b:.3g}"
                for a, b in zip(training.spacing_min, training.spacing_max, strict=True)
            )
            warnings.append(
                f"voxel spacing {' x '.join(f'{z:.3g}' for z in mine)} mm {FAR_SPACING} ({seen} mm)"
            )
    return warnings


#: voxel spacings (mm) outside which a header is taken for wrong (units, a placeholder of 1 mm
#: on a resampled array is not caught: it is plausible): a CT's voxels lie well inside
PLAUSIBLE_SPACING = (0.1, 20.0)


def geometry_warnings(
    shape: Sequence[int],
    zooms: Sequence[float],
    affine: np.ndarray,
    training: TrainingContext | None = None,
) -> list[str]:
    """QC warnings from a scan's geometry: very few slices, oblique axes, implausible spacing.

    The spacing is compared with the model's training scans where ``training`` records them
    (:func:`training_warnings`); without that record, only a spacing no CT has (below 0.1 or
    above 20 mm: wrong units?) is warned about, so one scan never carries two spacing warnings.
    """
    warnings = []
    slices = int(min(shape[:3]))
    if slices < 16:
        warnings.append(f"very few slices ({slices})")
    angle = _oblique_degrees(affine)
    if angle > 1.0:
        warnings.append(f"oblique affine ({angle:.1f} degrees off the scanner axes)")
    known = training is not None and bool(training.spacing_min and training.spacing_max)
    low, high = PLAUSIBLE_SPACING
    if not known and not all(low <= float(z) <= high for z in zooms[:3]):
        spacing = " x ".join(f"{float(z):.3g}" for z in zooms[:3])
        warnings.append(f"implausible voxel spacing ({spacing} mm): wrong units in the header?")
    return warnings


def check_nifti_header(
    path: str | Path, limits: Limits = Limits(), training: TrainingContext | None = None
) -> list[str]:
    """Refuse a NIfTI file that cannot hold a classifiable 3D scan, reading its header only.

    Returns QC warnings (with ``training``: also those for a scan unlike the training scans);
    raises :class:`ScanError` with a one-line reason otherwise.
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
    return geometry_warnings(shape, zooms, img.affine, training) + training_warnings(
        zooms, is_generated(header), training
    )


def _dicom_int(ds: Any, keyword: str, default: int, name: str) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value if value is not None and value != "" else default)
    except (TypeError, ValueError) as exc:
        raise ScanError(f"{Path(name).name}: {keyword} {value!r} is not a number") from exc


def dicom_sizes(files: Sequence[str], limits: Limits = Limits()) -> list[Any]:
    """Headers of a series, refused before any pixel is read when the sizes they claim (rows x
    columns x frames x bytes per sample, summed over files) exceed ``limits``, and when a file
    holds several frames (an enhanced multi-frame object: not read as a series here)."""
    import pydicom

    headers, voxels, nbytes = [], 0, 0
    for name in files:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
        rows = _dicom_int(ds, "Rows", 0, name)
        cols = _dicom_int(ds, "Columns", 0, name)
        frames = _dicom_int(ds, "NumberOfFrames", 1, name)
        bits = _dicom_int(ds, "BitsAllocated", 16, name)
        samples = _dicom_int(ds, "SamplesPerPixel", 1, name)
        if min(rows, cols, frames, bits, samples) < 1:
            raise ScanError(
                f"{Path(name).name}: claims {rows} x {cols} pixels, {frames} frames, {bits} bits: "
                "not an image"
            )
        voxels += rows * cols * frames
        nbytes += rows * cols * frames * samples * -(-bits // 8)
        if voxels > limits.max_voxels or nbytes > limits.max_bytes:
            raise ScanError(
                f"DICOM headers claim {voxels:,} voxels ({nbytes:,} bytes) by "
                f"{Path(name).name}, above the limit of {limits.max_voxels:,} voxels / "
                f"{limits.max_bytes:,} bytes (raise it with --max-voxels)"
            )
        if frames > 1:
            raise ScanError(
                f"{Path(name).name} is a multi-frame DICOM object ({frames} frames, e.g. an "
                "enhanced CT): convert it to a series of single-frame files or to NIfTI "
                "(e.g. dcm2niix)"
            )
        headers.append(ds)
    return headers


def transforms_module(name: str) -> Any:
    """``transforms.NAME``: this project's package beside this one in a bundle
    (``scripts.transforms``), the installed ``transforms`` in the app. The DICOM reader and the
    lung mask live there once, for the checks, the preprocessing and the baseline alike."""

    try:
        return importlib.import_module(f"..transforms.{name}", __package__)
    except ImportError:
        return importlib.import_module(f"transforms.{name}")


def dicom_module() -> Any:
    """``transforms.dicom`` (:func:`transforms_module`)."""
    return transforms_module("dicom")


def check_dicom_series(
    files: Sequence[str], limits: Limits = Limits(), training: TrainingContext | None = None
) -> list[str]:
    """Refuse a DICOM series whose slices do not form one regular volume; return QC warnings.

    The slices are those ``transforms.dicom.order_series`` keeps, in its order (by position
    along the slice normal; localizers left out, said in a warning), as the reader reads them.
    """
    dicom = dicom_module()
    headers = dicom_sizes(files, limits)
    try:
        series = dicom.order_series(list(files), headers)
    except dicom.DicomSeriesError as exc:
        raise ScanError(f"inconsistent DICOM geometry: {exc}") from exc
    if len(series.headers) < 2:
        raise ScanError("not 3D: a DICOM series of a single slice")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in series.headers}
    if len(sizes) > 1:
        raise ScanError(f"inconsistent DICOM geometry: slices of different sizes {sorted(sizes)}")
    steps = np.diff(series.positions)
    median = float(np.median(steps))
    if np.abs(steps - median).max() > max(0.1 * median, 0.05):
        raise ScanError(
            f"inconsistent DICOM geometry: slice steps from {steps.min():.3g} to {steps.max():.3g} mm "
            "(missing slices or a gap)"
        )
    rows, cols = sizes.pop()
    voxels = rows * cols * len(series.headers)
    if voxels > limits.max_voxels:
        raise ScanError(f"series of {voxels:,} voxels exceeds the limit of {limits.max_voxels:,}")
    affine = dicom.series_affine(series)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    warnings = list(series.notes)
    warnings += geometry_warnings((cols, rows, len(series.headers)), zooms, affine, training)
    return warnings + training_warnings(zooms, False, training)


#: a volume without air and with at most this many distinct values (in a sample of the voxels)
#: is named a label map or mask
MASK_VALUES = 16
#: every CT in Hounsfield units holds air (about -1000) or lung (-950 to -700) somewhere
AIR_OR_LUNG_HU = -500.0


def check_values(volume: np.ndarray, affine: np.ndarray | None = None) -> list[str]:
    """Refuse what is not CT in Hounsfield units; warn about a scan with little lung.

    Refused (a :class:`ScanError`, so the scan becomes a failed row and never a probability):
    non-finite voxels; a volume with nothing at or below :data:`AIR_OR_LUNG_HU` (no air, no
    lung: normalised, 8-bit, z-scored, stored without its rescale intercept, or a label map or
    mask, named as such when it holds at most :data:`MASK_VALUES` distinct values). Given the
    volume's ``affine`` (to find its axial slices), a scan with little or no lung is warned
    about (:func:`lung_warnings`).
    """
    finite = np.isfinite(volume)
    if not finite.all():
        raise ScanError(f"{int((~finite).sum()):,} voxels are NaN or infinite")
    low, high = float(volume.min()), float(volume.max())
    if low > AIR_OR_LUNG_HU:
        flat = np.asarray(volume).ravel()
        distinct = np.unique(flat[:: max(1, flat.size // 1_000_000)])
        if len(distinct) <= MASK_VALUES:
            shown = ", ".join(f"{v:.4g}" for v in distinct[:6])
            raise ScanError(
                f"a label map or mask ({len(distinct)} distinct values: {shown}"
                f"{', ...' if len(distinct) > 6 else ''}), not CT in Hounsfield units"
            )
        raise ScanError(
            f"not CT in Hounsfield units: values {low:.4g}..{high:.4g}, nothing at or below "
            f"{AIR_OR_LUNG_HU:.0f} (no air, no lung): normalised, 8-bit, or stored without its "
            "rescale intercept? give the scan in HU"
        )
    return lung_warnings(volume, affine) if affine is not None else []


def lung_warnings(volume: np.ndarray, affine: np.ndarray) -> list[str]:
    """The lung mask's doubts (``transforms.lung.Lungs.doubts``) on the volume's axial slices
    (the voxel axis closest to the world's S/I axis): "little or no lung ... not a chest CT?"
    (measured on ``testdata/qc_corpus.py``: ``docs/reliability.md``), a field of view that cuts
    the lungs, one side with little lung."""
    vol = np.asarray(volume)
    vol = vol.reshape(vol.shape[-3:]) if vol.ndim == 4 and vol.shape[0] == 1 else vol
    if vol.ndim != 3:
        return []
    rot = np.asarray(affine, dtype=float)[:3, :3]
    axis = int(np.argmax(np.abs(rot[2])))
    order = [a for a in range(3) if a != axis] + [axis]
    spacing = [float(np.linalg.norm(rot[:, a])) for a in order]
    lungs = transforms_module("lung").find_lungs(np.transpose(vol, order), spacing=spacing)
    return list(lungs.doubts())
