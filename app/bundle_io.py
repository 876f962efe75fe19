"""Bundle-side building blocks: find scans (NIfTI files and DICOM series), write
predictions.csv, read an exported bundle's settings. Standard library, PyTorch, Ignite and MONAI only: ``python -m app.export`` copies this
module into a bundle's ``scripts/``, where the bundle runs without this app installed."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

SCAN_SUFFIXES = (".nii", ".nii.gz")  # as app.datalist; restated: this module must stand alone


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")  # as app.inputs; restated: this module stands alone


def _looks_dicom(path: Path) -> bool:
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_series_folders(root: Path) -> tuple[list[str], list[str]]:
    """Folders under ``root`` that hold one DICOM series each (MONAI's ``PydicomReader`` reads
    such a folder as one volume), and the reasons other DICOM files were skipped."""
    series, skipped = [], []
    for folder, _, names in os.walk(root):
        files = [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
        dicom = [
            f
            for f in files
            if f.is_file() and not f.name.endswith(SCAN_SUFFIXES) and _looks_dicom(f)
        ]
        if not dicom:
            continue
        try:
            import pydicom
        except ImportError:
            skipped.append(f"{folder}: {len(dicom)} DICOM files (pydicom is not installed)")
            continue
        uids = set()
        for f in dicom:
            try:
                ds = pydicom.dcmread(
                    f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
                )
                uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
            except Exception:  # not readable as DICOM: not a scan of this folder
                uids.add(f"unreadable:{f.name}")
        if len(uids) == 1:
            series.append(str(folder))
        else:
            skipped.append(
                f"{folder}: {len(dicom)} DICOM files of {len(uids)} series (one series per "
                "folder here; python -m app.infer separates them)"
            )
    return series, skipped


def find_scans(root: str | Path) -> list[dict[str, str]]:
    """A datalist ``[{"image": path, "path": path}]`` of the NIfTI files and the single-series
    DICOM folders under ``root``, sorted; what is skipped is logged as a warning, never dropped
    silently."""
    import logging

    root = Path(root)
    if root.is_file():
        return [{"image": str(root), "path": str(root)}]
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {root} does not exist")
    paths = [  # hidden files are temporary or not the user's scans
        str(p)
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(SCAN_SUFFIXES) and not p.name.startswith(".")
    ]
    series, skipped = _dicom_series_folders(root)
    for reason in skipped:
        logging.getLogger("ctclassify.bundle").warning("skipped %s", reason)
    paths = sorted(paths + series)
    if not paths:
        raise FileNotFoundError(f"no .nii/.nii.gz scan or DICOM series under {root}")
    return [{"image": p, "path": p} for p in paths]


class PredictionWriter:
    """Write ``output_dir/predictions.csv`` (path, prob_abnormal, label) as batches complete.

    Args:
        output_dir: folder of the CSV (created).
        threshold: P(abnormal) from which a scan is labelled ``abnormal``.
        prob_key: key of the probability in the engine's (decollated) output.
        path_key: key of the scan path in the batch.
    """

    def __init__(
        self,
        output_dir: str | Path,
        threshold: float,
        prob_key: str = "prob",
        path_key: str = "path",
    ) -> None:
        self.path = Path(output_dir) / "predictions.csv"
        self.threshold = float(threshold)
        self.prob_key = prob_key
        self.path_key = path_key

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)

    def started(self, engine: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            f.write("path,prob_abnormal,label\n")

    def write(self, engine: Any) -> None:
        batch = engine.state.batch  # MONAI engines decollate it into a list of dicts
        paths = (
            [b[self.path_key] for b in batch] if isinstance(batch, list) else batch[self.path_key]
        )
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for path, item in zip(paths, engine.state.output, strict=True):
                prob = float(item[self.prob_key])
                writer.writerow(
                    [path, f"{prob:.6f}", "abnormal" if prob >= self.threshold else "normal"]
                )
            f.flush()
            os.fsync(f.fileno())


def bundle_settings(bundle_root: str | Path, max_bytes: int = 1 << 20) -> Any:
    """The ``run_settings`` written into an exported bundle's ``configs/inference.yaml``.

    Read as plain YAML (a bundle's ``$`` expressions are code and are never evaluated here) and
    returned as read: the caller validates them (``app.model_settings.validate_settings``).
    """
    import yaml

    path = Path(bundle_root) / "configs" / "inference.yaml"
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes:,} bytes: not a bundle config")
    config = yaml.safe_load(path.read_text())
    return config.get("run_settings") if isinstance(config, dict) else None
