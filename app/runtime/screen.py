"""One scan checked, read and preprocessed, with every failure turned into a one-line reason.

``app.infer`` (``ScanPreparer``) and an exported bundle's ``monai.bundle run`` (:class:`Screened`,
the dataset's transform) both use :func:`screen_scan`: the same header checks, value checks and
warnings, and one bad file never stops the others.
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .scanqc import (
    Limits,
    ScanError,
    TrainingContext,
    check_dicom_series,
    check_nifti_header,
    check_values,
)
from .scans import ScanInput, find_inputs

Chain = Callable[[dict[str, Any]], dict[str, Any]]


def split_loading(preprocessing: Any) -> tuple[Chain, Chain]:
    """The preprocessing chain (a MONAI ``Compose`` starting with ``LoadImaged``) cut into the
    loading (load, channel first) and the rest, so the values can be checked between them."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    transforms = list(preprocessing.transforms)
    n_load = 0
    while n_load < len(transforms) and isinstance(
        transforms[n_load], (LoadImaged, EnsureChannelFirstd)
    ):
        n_load += 1
    return Compose(transforms[:n_load]), Compose(transforms[n_load:])


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (MONAI wraps a reader's error in "applying transform
    <...LoadImaged object at 0x...>", which names no file and no problem)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def describe(exc: BaseException) -> str:
    """One line for an unexpected reader error, naming the usual causes."""

    chain = [exc, *(e for e in (exc.__cause__, exc.__context__) if e is not None)]
    for e in chain:
        if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
            return f"truncated or corrupt gzip ({e or type(e).__name__})"
    inner = root_cause(exc)
    text = " ".join(str(inner).split())
    return f"cannot read the scan: {type(inner).__name__}: {text[:200]}"


def dicom_problem(files: Sequence[str], exc: BaseException) -> str:
    """One line naming the DICOM file that cannot be read and why (each file's pixels are
    decoded with pydicom until one fails), else the series and the reader's own reason."""
    import pydicom

    for name in files:
        try:
            pydicom.dcmread(name).pixel_array  # noqa: B018  (decoding is the check)
        except Exception as bad:  # pydicom raises many types for damaged files
            reason = " ".join(str(bad).split())[:200] or type(bad).__name__
            return f"cannot read DICOM file {Path(name).name} of the series: {reason}"
    inner = root_cause(exc)
    reason = " ".join(str(inner).split())[:200] or type(inner).__name__
    return f"cannot read the DICOM series ({len(files)} files): {type(inner).__name__}: {reason}"


def screen_scan(
    scan: ScanInput,
    load: Chain,
    rest: Chain,
    limits: Limits,
    training: TrainingContext | None = None,
    key: str = "image",
) -> dict[str, Any]:
    """Check, read and preprocess ``scan``; never raises.

    Returns ``{"path", "image" (the preprocessed tensor, or None), "warnings" (list),
    "error" (None, or why the scan cannot be classified), "seconds"}``.
    """
    start = time.perf_counter()
    result: dict[str, Any] = {"path": scan.key, "image": None, "warnings": [], "error": None}
    try:
        if scan.kind == "unreadable":
            raise ScanError(scan.problem)
        if scan.kind == "nifti":
            result["warnings"] = check_nifti_header(scan.key, limits, training)
            loaded = load({key: scan.key})
        else:
            result["warnings"] = check_dicom_series(scan.files, limits, training)
            try:  # the user's own files, one series (the chain's reader orders the slices)
                loaded = load({key: list(scan.files)})
            except Exception as exc:
                raise ScanError(dicom_problem(scan.files, exc)) from exc
        volume = loaded[key]
        affine = getattr(volume, "affine", None)
        result["warnings"] += check_values(
            np.asarray(volume), None if affine is None else np.asarray(affine)
        )
        result["image"] = rest(loaded)[key]
    except ScanError as exc:
        result["error"] = str(exc)
    except MemoryError:
        result["error"] = "not enough memory to read this scan"
    except Exception as exc:  # one bad file must never stop a folder
        result["error"] = describe(exc)
    result["seconds"] = time.perf_counter() - start
    return result


class Screened:
    """A bundle's dataset transform: :func:`screen_scan` on each datalist item, so a bundle runs
    the checks ``app.infer`` runs. A scan that cannot be classified becomes a zero image of the
    network's input size with its ``error`` (the writer gives it a failed row, never a
    probability); the others carry their ``warnings``.

    Args:
        preprocessing: the evaluation chain (starting with ``LoadImaged``).
        spatial_size: the network's input size (of the placeholder for a failed scan).
        run_settings: the model's recorded settings (its training data: for the warnings about
            scans unlike its training scans).
        image_key: the image's key.
    """

    def __init__(
        self,
        preprocessing: Any,
        spatial_size: Sequence[int],
        run_settings: Mapping[str, Any] | None = None,
        image_key: str = "image",
    ) -> None:
        self.load, self.rest = split_loading(preprocessing)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.training = TrainingContext.from_settings(dict(run_settings or {}))
        self.key = image_key
        self.limits = Limits()

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        path = str(item.get("path", item[self.key]))
        problem = str(item.get("problem") or "")
        if problem:
            scan = ScanInput(path, "unreadable", problem=problem)
        else:  # the input of that key (a file, a series folder, or one series of a folder)
            found = [s for s in find_inputs(item[self.key]) if s.key == path]
            scan = found[0] if found else ScanInput(path, "unreadable", problem="not found")
        result = screen_scan(scan, self.load, self.rest, self.limits, self.training, self.key)
        image = result["image"]
        if image is None:
            image = torch.zeros((1, *self.spatial_size), dtype=torch.float32)
        elif hasattr(image, "as_tensor"):  # a MetaTensor: a plain tensor collates with the zeros
            image = image.as_tensor()
        return {
            **item,
            self.key: image,
            "path": path,
            "warnings": "; ".join(result["warnings"]),
            "error": result["error"] or "",
        }
