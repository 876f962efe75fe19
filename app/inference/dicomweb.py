"""The PACS round trip over DICOMweb (the IDC's ``dicomweb-client``): QIDO-RS to find a study's
CT series, WADO-RS to retrieve them, STOW-RS to store the DICOM SRs back.

``python -m app.infer --from-pacs http://HOST:PORT/dicom-web --study UID`` takes this path;
``AE@HOST:PORT`` takes DICOM networking (``app.inference.pacs``). Both write what they retrieve
the same way (``pacs.retrieve_study``): whole files, a series out of sight until it is whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydicom import dcmread

from app.errors import UsageError
from app.inference.pacs import PacsError, check_dates, check_uid, save_instance

__all__ = ["WebPeer", "is_web_address", "parse_web_peer"]

_MAX_STUDIES = 1000


def is_web_address(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def parse_web_peer(text: str) -> WebPeer:
    """A DICOMweb service root such as ``http://127.0.0.1:8042/dicom-web``.

    Raises:
        UsageError: not an http(s) address of a host, or one carrying a user name, query or
            fragment (credentials go in the environment, never on a command line).
    """
    match = re.fullmatch(
        r"(https?)://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\])(:[0-9]{1,5})?(/[^?#@\s]*)?", text
    )
    if match is None:
        raise UsageError(
            f"--from-pacs expects AE@HOST:PORT or a DICOMweb root such as "
            f"http://127.0.0.1:8042/dicom-web, got {text[:120]!r}"
        )
    return WebPeer(text.rstrip("/"))


@dataclass(frozen=True)
class WebPeer:
    """A DICOMweb service (QIDO-RS, WADO-RS, STOW-RS under one root)."""

    url: str

    def __str__(self) -> str:
        return self.url

    def _client(self, timeout: float) -> Any:
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(self.url, timeout=timeout)

    def _call(self, what: str, call: Any) -> Any:
        """``call()``, its network and HTTP failures as one :class:`PacsError` line."""
        import requests

        try:
            return call()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise PacsError(f"{self} refused the {what} (HTTP {status})") from exc
        except requests.RequestException as exc:
            raise PacsError(
                f"{self} did not answer the {what} ({type(exc).__name__}): is the server up?"
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:  # a malformed answer is the peer's
            raise PacsError(f"{self} answered the {what} with something unreadable: {exc}") from exc

    def studies(self, patient: str | None, dates: str | None, timeout: float = 30.0) -> list[str]:
        filters: dict[str, str] = {}
        if patient is not None:
            if not (0 < len(patient) <= 64 and patient.isprintable()):
                raise UsageError(f"--patient expects a Patient ID, got {patient[:80]!r}")
            filters["PatientID"] = patient
        if dates:
            filters["StudyDate"] = check_dates(dates)
        found = self._call(
            "QIDO-RS study search",
            lambda: self._client(timeout).search_for_studies(
                search_filters=filters, limit=_MAX_STUDIES + 1
            ),
        )
        if len(found) > _MAX_STUDIES:
            raise PacsError(f"{self} holds more than 1,000 studies for that query: narrow it")
        return sorted({check_uid(_value(study, "0020000D")) for study in found})

    def ct_series(self, study_uid: str, timeout: float = 30.0) -> dict[str, int | None]:
        found = self._call(
            "QIDO-RS series search",
            lambda: self._client(timeout).search_for_series(
                check_uid(study_uid), fields=["NumberOfSeriesRelatedInstances", "Modality"]
            ),
        )
        series: dict[str, int | None] = {}
        for item in found:
            if _value(item, "00080060") != "CT":
                continue
            count = _value(item, "00201209")
            series[check_uid(_value(item, "0020000E"))] = int(count) if count.isdigit() else None
        return dict(sorted(series.items()))

    def get_series(self, study_uid: str, series_uid: str, folder: Path, timeout: float) -> None:
        def fetch() -> None:
            for ds in self._client(timeout).iter_series(study_uid, series_uid):
                save_instance(ds, folder)

        self._call(f"WADO-RS retrieve of series {series_uid}", fetch)

    def store(self, files: list[Path], timeout: float = 60.0) -> list[str]:
        client = self._client(timeout)
        problems = []
        for path in files:
            try:
                answer = self._call(
                    "STOW-RS store", partial(client.store_instances, [dcmread(path)])
                )
            except PacsError as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            if answer is not None and answer.get("FailedSOPSequence"):
                problems.append(f"{path.name}: {self} did not store it (FailedSOPSequence)")
        return problems


def _value(item: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object, as text ("" where absent)."""
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])
