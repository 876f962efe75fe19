"""A classification service: the model loaded once, one scan per request (``python -m app.serve``).

``POST /predict`` takes the scan as the request body: a NIfTI file (``.nii`` or ``.nii.gz``)
or a zip of one DICOM series, recognised by their first bytes. It answers with the row
``app.infer`` writes for that scan (``prob_abnormal``, ``label``, ``threshold``, ``warnings``,
``error``); ``POST /predict?saliency=true`` adds ``saliency``: the montage ``app.infer
--saliency`` draws (PNG) and the map on the scan's own grid (NIfTI; a DICOM series' as the
app reads it), each
base64-encoded. ``GET /health`` says the service is up; ``GET /model`` is the model card.

Bounded whatever a client sends: the body's size (413 beyond it, read no further), a zip's
members (count, unpacked size, no path outside its folder, no links), the work at once (a slot
per inference; beyond slots and queue, 503 with ``Retry-After``), each request's time (504).
A bad upload is a 4xx with one line in ``error``; inference runs in worker threads, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.inference.classifier import Classifier, Prediction
from app.inference.folder import write_saliency

__all__ = ["ServiceLimits", "UploadError", "create_app"]

#: NIfTI-1 and NIfTI-2 files start with their header's size
NIFTI_HEADER_SIZES = (348, 540)


@dataclass(frozen=True)
class ServiceLimits:
    """What one request and the service at once may cost."""

    #: the largest request body, bytes
    max_upload_bytes: int = 1 << 30
    #: inferences at once (each in its own worker thread)
    max_concurrent: int = 1
    #: requests that may wait for a slot; beyond them: 503
    max_queue: int = 4
    #: seconds a request may take, waiting included; beyond: 504
    timeout_s: float = 300.0
    #: members and unpacked bytes of a zipped DICOM series
    max_zip_members: int = 5000
    max_unzipped_bytes: int = 4 << 30


class UploadError(Exception):
    """A request the service cannot classify: ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _kind(head: bytes) -> str:
    """``nii.gz``, ``nii`` or ``zip`` from the body's first bytes."""
    if head[:2] == b"\x1f\x8b":
        return "nii.gz"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in NIFTI_HEADER_SIZES:
        return "nii"
    if len(head) >= 4 and int.from_bytes(head[:4], "big") in NIFTI_HEADER_SIZES:
        return "nii"
    raise UploadError(
        415, "the body is neither a NIfTI file (.nii, .nii.gz) nor a zip of one DICOM series"
    )


def _unzip(archive: Path, folder: Path, limits: ServiceLimits) -> Path:
    """The series in ``archive``, unpacked into ``folder`` within ``limits``."""
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            if len(members) > limits.max_zip_members:
                raise UploadError(
                    413, f"the zip holds {len(members)} files, more than {limits.max_zip_members}"
                )
            if sum(m.file_size for m in members) > limits.max_unzipped_bytes:
                raise UploadError(
                    413, f"the zip unpacks to more than {limits.max_unzipped_bytes:,} bytes"
                )
            for m in members:
                name = PurePosixPath(m.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in m.filename:
                    raise UploadError(
                        400, f"the zip names a path outside its folder: {m.filename[:100]!r}"
                    )
                if (m.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UploadError(400, f"the zip holds a symbolic link: {m.filename[:100]!r}")
                target = folder / Path(*name.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
    except zipfile.BadZipFile as exc:
        raise UploadError(400, f"the zip cannot be read ({exc})") from None
    return folder


def _row(pred: Prediction, threshold: float) -> dict[str, Any]:
    """The row ``app.infer`` writes to predictions.csv, as JSON."""
    return {
        "prob_abnormal": pred.prob_abnormal,
        "label": pred.label,
        "threshold": threshold,
        "warnings": list(pred.warnings),
        "error": pred.error,
        # a severity model: its grade and each grade's probability (null for a binary model)
        "grade": pred.grade,
        "grade_probs": pred.grade_probs,
    }


def _classify(clf: Classifier, scan: Path, saliency: Path | None) -> dict[str, Any]:
    """One scan's row; with ``saliency`` (a folder for the files) its saliency, base64."""
    if saliency is None:
        return _row(clf.predict(scan), clf.threshold)
    pred = next(clf.predict_many([scan], keep_images=True))
    row = _row(pred, clf.threshold)
    if pred.prob_abnormal is not None:
        written = write_saliency(clf, pred, saliency, "scan")
        row["saliency"] = {
            "png": base64.b64encode(written["saliency"].read_bytes()).decode(),
            "nifti": base64.b64encode(written["saliency_nifti"].read_bytes()).decode(),
        }
    return row


async def _read_body(request: Request, path: Path, limit: int) -> bytes:
    """The body into ``path``, refused (413) past ``limit`` bytes without reading further;
    returns its first bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"the body is {int(declared):,} bytes, more than {limit:,}")
    size, head = 0, b""
    with path.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadError(413, f"the body is more than {limit:,} bytes")
            if len(head) < 8:
                head += chunk[: 8 - len(head)]
            f.write(chunk)
    if size == 0:
        raise UploadError(400, "the body is empty: send the scan as the request body")
    return head


def create_app(clf: Classifier, limits: ServiceLimits = ServiceLimits()) -> FastAPI:
    """The service around ``clf`` (loaded once, by the caller)."""
    app = FastAPI(title="ctclassify", summary="chest CT: normal vs viral pneumonia (research use)")
    workers = ThreadPoolExecutor(max_workers=limits.max_concurrent, thread_name_prefix="infer")
    slots = asyncio.Semaphore(limits.max_concurrent)
    state = {"admitted": 0}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return clf.card_json()

    async def classify(request: Request, folder: Path, saliency: bool) -> JSONResponse:
        body = folder / "upload"
        head = await _read_body(request, body, limits.max_upload_bytes)
        kind = _kind(head)
        if kind == "zip":
            scan = _unzip(body, folder / "series", limits)
        else:
            scan = body.rename(folder / f"scan.{kind}")  # a broken file: the reader says why
        async with slots:
            loop = asyncio.get_running_loop()
            work = partial(_classify, clf, scan, folder / "saliency" if saliency else None)
            row = await loop.run_in_executor(workers, work)
        return JSONResponse(row, status_code=200 if row["error"] is None else 422)

    @app.post("/predict")
    async def predict(request: Request, saliency: bool = False) -> JSONResponse:
        if saliency and clf.folds:
            return JSONResponse(
                {"error": f"saliency needs one network; this service runs an ensemble of "
                 f"{clf.folds} fold models"},
                status_code=400,
            )  # fmt: skip
        if state["admitted"] >= limits.max_concurrent + limits.max_queue:
            return JSONResponse(
                {"error": "busy: every inference slot and queue place is taken; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        state["admitted"] += 1
        try:
            with tempfile.TemporaryDirectory(prefix="ctclassify-upload-") as tmp:
                return await asyncio.wait_for(
                    classify(request, Path(tmp), saliency), limits.timeout_s
                )
        except UploadError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except (OSError, EOFError) as exc:
            return JSONResponse(
                {"error": f"the upload cannot be read ({exc})"[:300]}, status_code=400
            )
        except asyncio.TimeoutError:
            return JSONResponse(
                {"error": f"the request took more than {limits.timeout_s:g} s"}, status_code=504
            )
        finally:
            state["admitted"] -= 1

    return app
