"""A PACS round trip with DICOM networking (pynetdicom): find a study's CT series (C-FIND),
retrieve them (C-GET: no storage server of our own to open), and store results back (C-STORE).

``python -m app.infer --from-pacs AE@HOST:PORT --study UID`` retrieves into the output folder,
classifies as a folder, and with ``--send-sr`` stores each series' DICOM SR back into the study.
Every failure is one line naming the peer and what it said; a retrieve writes each file
atomically into a hidden folder until its series is whole, so an interrupted retrieve leaves
whole files out of the scan finder's sight, its series is a failed row, and a rerun completes it.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from app.errors import EXIT_REFUSED, CTClassifyError, UsageError
from app.runtime.files import atomic_write

__all__ = [
    "CALLING_AET",
    "INCOMPLETE_DIR",
    "Archive",
    "PacsError",
    "Peer",
    "Retrieved",
    "parse_peer",
    "retrieve_study",
    "save_instance",
    "store_files",
]

#: the application entity title this app calls the PACS with
CALLING_AET = "CTCLASSIFY"
# pynetdicom logs each refused connection and abort at ERROR on the root logger's handlers (two
# extra lines on the console, or a logging traceback where those handlers' stream is closed):
# every failure here is our own one line, naming the peer
_NETWORK_LOG = logging.getLogger("pynetdicom")
_NETWORK_LOG.addHandler(logging.NullHandler())
_NETWORK_LOG.propagate = False
#: the CT storage classes a retrieve accepts (each series is stored by one of them)
CT_STORAGE = (CTImageStorage, EnhancedCTImageStorage)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PacsError(CTClassifyError):
    """The PACS cannot be reached, or refused or failed a request (exit status 2)."""

    exit_status = EXIT_REFUSED


@dataclass(frozen=True)
class Peer:
    """A DICOM peer: its application entity title, host and port."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"

    def studies(self, patient: str | None, dates: str | None, timeout: float = 30.0) -> list[str]:
        return find_studies(self, patient, dates, timeout)

    def ct_series(self, study_uid: str, timeout: float = 30.0) -> dict[str, int | None]:
        return find_ct_series(self, study_uid, timeout)

    def get_series(self, study_uid: str, series_uid: str, folder: Path, timeout: float) -> None:
        _get_series(self, study_uid, series_uid, folder, timeout)

    def store(self, files: list[Path], timeout: float = 60.0) -> list[str]:
        return store_files(self, files, timeout)


class Archive(Protocol):
    """What a round trip needs of an image archive: :class:`Peer` (DICOM networking) and
    ``app.inference.dicomweb.WebPeer`` (DICOMweb) each offer it."""

    def studies(self, patient: str | None, dates: str | None, timeout: float = 30.0) -> list[str]:
        """The Study Instance UIDs held for a Patient ID and/or StudyDate range."""

    def ct_series(self, study_uid: str, timeout: float = 30.0) -> dict[str, int | None]:
        """Each CT series of the study, with the number of instances held (None: not said)."""

    def get_series(self, study_uid: str, series_uid: str, folder: Path, timeout: float) -> None:
        """Write each instance of the series into ``folder``, each file atomically."""

    def store(self, files: list[Path], timeout: float = 60.0) -> list[str]:
        """Store each DICOM file; one line per file refused."""


def parse_peer(text: str) -> Peer:
    """``AE@HOST:PORT`` as a :class:`Peer`.

    Raises:
        UsageError: not of that form, an AE title beyond 16 characters, a port outside 1-65535.
    """
    match = re.fullmatch(r"([^@\\\s]{1,16})@([A-Za-z0-9.\-:\[\]]+):([0-9]{1,5})", text)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise UsageError(
            f"--from-pacs expects AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242), got {text!r}"
        )
    return Peer(match.group(1), match.group(2).strip("[]"), int(match.group(3)))


def check_uid(uid: str) -> str:
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        raise UsageError(f"--study expects a Study Instance UID (digits and dots), got {uid!r}")
    return uid


@contextmanager
def _associate(peer: Peer, ae: AE, timeout: float) -> Iterator[Association]:
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet)
    if not assoc.is_established:
        raise PacsError(
            f"cannot open a DICOM association with {peer} (refused, or nothing listens there)"
        )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def check_dates(text: str) -> str:
    """A DICOM date range ``YYYYMMDD-YYYYMMDD`` (either end may be left open) or one date."""
    if not re.fullmatch(r"([0-9]{8})?-?([0-9]{8})?", text) or text in ("", "-"):
        raise UsageError(f"--dates expects YYYYMMDD-YYYYMMDD (either end open), got {text!r}")
    return text


def find_studies(
    peer: Peer, patient: str | None = None, dates: str | None = None, timeout: float = 30.0
) -> list[str]:
    """The Study Instance UIDs the peer holds for ``patient`` (a Patient ID) and/or ``dates`` (a
    StudyDate range), by C-FIND at the study level; at most 1,000."""
    if patient is not None and not (0 < len(patient) <= 64 and patient.isprintable()):
        raise UsageError(f"--patient expects a Patient ID, got {patient[:80]!r}")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientID = patient or ""
    query.StudyDate = check_dates(dates) if dates else ""
    found: list[str] = []
    for identifier in _find(peer, query, timeout):
        found.append(check_uid(str(identifier.StudyInstanceUID)))
        if len(found) > 1000:
            raise PacsError(f"{peer} holds more than 1,000 studies for that query: narrow it")
    return sorted(set(found))


def _find(peer: Peer, query: Dataset, timeout: float) -> Iterator[Dataset]:
    """Each match of a C-FIND (Study Root model) at ``peer``."""
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    with _associate(peer, ae, timeout) as assoc:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"{peer} did not answer the C-FIND in {timeout:g} s")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                yield identifier
            elif code != 0x0000:
                raise PacsError(f"{peer} refused the C-FIND (status 0x{code:04X})")


def find_ct_series(peer: Peer, study_uid: str, timeout: float = 30.0) -> dict[str, int | None]:
    """The study's CT series (C-FIND at the series level): each Series Instance UID with the
    number of instances the peer holds of it (None where it does not say)."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = check_uid(study_uid)
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.NumberOfSeriesRelatedInstances = ""
    found: dict[str, int | None] = {}
    for identifier in _find(peer, query, timeout):
        if str(identifier.get("Modality", "")) != "CT":
            continue
        count = str(identifier.get("NumberOfSeriesRelatedInstances", "") or "")
        found[str(identifier.SeriesInstanceUID)] = int(count) if count.isdigit() else None
    return dict(sorted(found.items()))


#: where a series is retrieved before it is whole (a hidden folder: the scan finder skips it,
#: so a half-retrieved series is never classified; a rerun continues into it)
INCOMPLETE_DIR = ".incomplete"


@dataclass
class Retrieved:
    """What :func:`retrieve_study` brought: the whole series' folders, and each series it could
    not bring whole (its would-be folder, as the scan finder names it, with the reason)."""

    folders: list[Path]
    failed: dict[str, str]


def retrieve_study(peer: Archive, study_uid: str, dest: Path, timeout: float = 60.0) -> Retrieved:
    """Retrieve each CT series of the study into ``dest/SERIES_UID/`` (C-GET), one file per
    instance, each written atomically. A series goes to ``dest/.incomplete/`` first and moves
    to its folder once the peer sent every instance it holds of it; one already whole is not
    retrieved again. A series that fails (the peer stops, refuses or sends less than it holds)
    is left where it was and named in :attr:`Retrieved.failed`: a rerun completes it.

    Raises:
        PacsError: the peer cannot be reached or holds no CT series of the study.
    """
    series = peer.ct_series(study_uid, timeout)
    if not series:
        raise PacsError(f"{peer} holds no CT series of study {study_uid}")
    result = Retrieved([], {})
    for uid, expected in series.items():
        folder = dest / uid
        try:
            _retrieve_series(peer, study_uid, uid, folder, expected, timeout)
        except PacsError as exc:
            result.failed[str(folder)] = str(exc)
            continue
        result.folders.append(folder)
    return result


def save_instance(ds: Dataset, folder: Path) -> Path:
    """One retrieved instance, written atomically as ``folder/SOP_INSTANCE_UID.dcm`` (its UID
    made a safe file name: it is the peer's data)."""
    path = folder / (re.sub(r"[^0-9.]", "_", str(ds.SOPInstanceUID))[:64] + ".dcm")
    atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return path


def _instances(folder: Path) -> int:
    return sum(1 for p in folder.glob("*.dcm")) if folder.is_dir() else 0


def _retrieve_series(
    peer: Archive, study_uid: str, uid: str, folder: Path, expected: int | None, timeout: float
) -> None:
    if expected is not None and _instances(folder) >= expected:
        return  # whole already (a rerun)
    work = folder.parent / INCOMPLETE_DIR / folder.name
    work.parent.mkdir(parents=True, exist_ok=True)
    if folder.is_dir():  # the peer holds more of it now: continue it out of sight
        if work.exists():
            shutil.rmtree(work)
        folder.rename(work)
    peer.get_series(study_uid, uid, work, timeout)
    got = _instances(work)
    if got == 0 or (expected is not None and got < expected):
        raise PacsError(
            f"series {uid} arrived incomplete from {peer}: {got} of "
            f"{expected if expected is not None else 'its'} instances; rerun to complete it"
        )
    work.rename(folder)


def _get_series(peer: Peer, study_uid: str, series_uid: str, folder: Path, timeout: float) -> None:
    def store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        try:
            save_instance(ds, folder)
        except (OSError, ValueError, AttributeError):  # e.g. a full disk: the peer counts it
            return 0xA700
        return 0x0000

    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for storage in CT_STORAGE:
        ae.add_requested_context(storage)
    roles: list[Any] = [build_role(storage, scp_role=True) for storage in CT_STORAGE]
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.aet, ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )  # fmt: skip
    if not assoc.is_established:
        raise PacsError(f"cannot open a DICOM association with {peer} to retrieve {series_uid}")
    try:
        last = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if getattr(status, "Status", None) is None:
                raise PacsError(
                    f"{peer} stopped answering the C-GET of series {series_uid}; the instances "
                    "it sent are kept, rerun to complete it"
                )
            last = status
        if last is not None and last.Status not in (0x0000, 0xFF00):
            failed = int(last.get("NumberOfFailedSuboperations", 0) or 0)
            raise PacsError(
                f"{peer} could not send all of series {series_uid} (status "
                f"0x{last.Status:04X}, {failed} instances failed): rerun to complete it"
            )
    finally:
        if assoc.is_established:
            assoc.release()


def store_files(peer: Peer, files: list[Path], timeout: float = 60.0) -> list[str]:
    """C-STORE each DICOM SR file to ``peer``; returns one line per file the peer refused."""
    if not files:
        return []
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(Comprehensive3DSRStorage)
    problems = []
    with _associate(peer, ae, timeout) as assoc:
        for path in files:
            if not assoc.is_established:  # the peer aborted: the rest are not stored either
                problems.append(f"{path.name}: {peer} closed the association before it")
                continue
            status = assoc.send_c_store(dcmread(path))
            code = getattr(status, "Status", None)  # an empty answer: refused or aborted
            if code != 0x0000:
                said = "no status" if code is None else f"status 0x{code:04X}"
                problems.append(f"{path.name}: {peer} did not store it ({said})")
    return problems
