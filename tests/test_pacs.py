"""A PACS round trip against a real DICOM server (issue 33): Orthanc (the Debian package CI
installs), started here on loopback ports with a throwaway configuration and stopped after,
loaded with the shared real DICOM series. ``app.infer --from-pacs`` finds and retrieves the
study's CT series, classifies them, and ``--send-sr`` stores the SR back: Orthanc then holds it
in the same study."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import SHARED, free_port, in_ci, require_shared, stop_server

from app.infer import main as infer_main
from app.inference.pacs import INCOMPLETE_DIR

#: where Debian's orthanc-dicomweb puts the plugin
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _http(port: int, path: str, data: bytes | None = None) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback only)
        return json.loads(response.read() or b"null")


def _the_study(port: int) -> tuple[dict, list[str]]:
    """Orthanc's one study (its record) and the modalities of its series, sorted."""
    studies = _http(port, "/studies")
    assert isinstance(studies, list) and len(studies) == 1
    study = _http(port, f"/studies/{studies[0]}")
    assert isinstance(study, dict)
    modalities = sorted(
        _http(port, f"/series/{s}")["MainDicomTags"]["Modality"]  # type: ignore[index]
        for s in study["Series"]
    )
    return study, modalities


@pytest.fixture(scope="module")
def series() -> list[Path]:
    return sorted(require_shared(SHARED / "data" / "real-ct" / "cip_ct-64_dicom").iterdir())


@contextlib.contextmanager
def _orthanc(work: Path, series: list[Path], allow_store: bool = True, web: bool = False):
    """A real Orthanc on two free loopback ports, holding the real series; stopped after.
    ``allow_store`` False: it refuses C-STORE from any peer (its REST API still loads it).
    ``web``: with its DICOMweb plugin (Debian package orthanc-dicomweb) at /dicom-web/."""
    binary = shutil.which("Orthanc")
    if binary is None:
        if in_ci():
            pytest.fail("Orthanc is missing in CI: .ci/run installs the Debian package orthanc")
        pytest.skip("Orthanc (Debian package orthanc) is not installed here")
    plugins = [str(DICOMWEB_PLUGIN)] if web else []
    if web and not DICOMWEB_PLUGIN.is_file():
        if in_ci():
            pytest.fail("Orthanc's DICOMweb plugin is missing in CI: .ci/run installs it")
        pytest.skip("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb) is not here")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "ctclassify-test", "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"), "HttpPort": http, "DicomPort": dicom,
        "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": allow_store, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True, "Plugins": plugins,
        "DicomWeb": {"Enable": web, "Root": "/dicom-web/"},
    }  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("w")
    server = subprocess.Popen([binary, str(work / "orthanc.json")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _http(http, "/system")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(
                        f"Orthanc did not start: {(work / 'orthanc.log').read_text()[-2000:]}"
                    )
                time.sleep(0.2)
        for path in series:
            _http(http, "/instances", path.read_bytes())
        yield {"http": http, "dicom": dicom, "server": server}
    finally:
        stop_server(server)
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, series):
    with _orthanc(tmp_path_factory.mktemp("orthanc"), series) as ports:
        yield ports


def test_a_study_retrieved_classified_and_its_sr_stored_back(orthanc, series, checkpoint, tmp_path):
    study = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    source = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    out = tmp_path / "out"
    args = ["--from-pacs", f"ORTHANC@127.0.0.1:{orthanc['dicom']}", "--study", study,
            "--send-sr", "--checkpoint", str(checkpoint), "--output", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert infer_main(args) == 0
    retrieved = sorted((out / "retrieved" / study / source).glob("*.dcm"))
    assert len(retrieved) == len(series)
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["prob_abnormal"] and not rows[0]["error"]
    # Orthanc holds the SR now, in the same study, beside the CT series
    assert _the_study(orthanc["http"])[1] == ["CT", "SR"]


def test_studies_found_by_patient_and_date_range(orthanc, series, checkpoint, tmp_path, capsys):
    """--patient and --dates query the peer (C-FIND at the study level) for the studies to
    retrieve; a range that holds none is one line, exit 2."""
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    peer = f"ORTHANC@127.0.0.1:{orthanc['dicom']}"
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    query = ["--patient", str(header.PatientID), "--dates", f"{header.StudyDate}-"]
    assert infer_main(["--from-pacs", peer, *query, "--output", str(tmp_path / "a"), *common]) == 0
    assert "1 studies found" in capsys.readouterr().out
    assert (tmp_path / "a" / "retrieved" / str(header.StudyInstanceUID)).is_dir()
    empty = ["--dates", "19000101-19000102", "--output", str(tmp_path / "b")]
    assert infer_main(["--from-pacs", peer, *empty, *common]) == 2
    assert "holds no study for that query" in capsys.readouterr().err


def test_a_refused_store_is_a_line_per_report_and_a_rerun_sends_again(
    series, checkpoint, tmp_path, capsys
):
    """A PACS that refuses C-STORE: the scans are classified and their rows kept; each SR it
    refused is an error line, exit 1; nothing else is lost."""
    study = str(pydicom.dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    with _orthanc(tmp_path / "orthanc", series, allow_store=False) as ports:
        args = ["--from-pacs", f"ORTHANC@127.0.0.1:{ports['dicom']}", "--study", study,
                "--send-sr", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"),
                "--device", "cpu", "--no-progress"]  # fmt: skip
        code = infer_main(args)
        captured = capsys.readouterr()
        assert code in (1, 2), captured.err
        assert "ORTHANC@127.0.0.1" in captured.err and "Traceback" not in captured.err
        with (tmp_path / "o" / "predictions.csv").open() as f:
            assert [r["error"] for r in csv.DictReader(f)] == [""]
        assert len(list((tmp_path / "o" / "sr").glob("*.dcm"))) == 1
        assert len(_http(ports["http"], "/series")) == 1  # type: ignore[arg-type]


def test_a_peer_that_does_not_answer_is_one_line(tmp_path, checkpoint, capsys):
    args = ["--from-pacs", f"NOBODY@127.0.0.1:{free_port()}", "--study", "1.2.3",
            "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert infer_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open a DICOM association with NOBODY@127.0.0.1")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, says",
    [
        (["--from-pacs", "no-port", "--study", "1.2"], "AE@HOST:PORT"),
        (["--from-pacs", "A@127.0.0.1:104", "--study", "1.2; rm -rf /"], "Study Instance UID"),
        (["--from-pacs", "A@127.0.0.1:104"], "--study"),
        (["--from-pacs", "A@127.0.0.1:104", "--dates", "2006"], "YYYYMMDD"),
        (["--from-pacs", "http://user:pw@127.0.0.1/dicom-web", "--study", "1.2"], "DICOMweb root"),
        (["--from-pacs", "ftp://127.0.0.1/dicom-web", "--study", "1.2"], "AE@HOST:PORT"),
        (["--send-sr", "somewhere"], "--send-sr needs --from-pacs"),
    ],
)
def test_pacs_options_are_checked_before_any_network(tmp_path, checkpoint, capsys, args, says):
    if args[0] == "--send-sr":
        (tmp_path / "somewhere").mkdir()
        args = [str(tmp_path / "somewhere"), "--send-sr"]
    full = [
        *args,
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    code = infer_main(full)
    err = capsys.readouterr().err
    assert code == 2 and says in err, err


def _kill_when_retrieving(server: subprocess.Popen, incoming: Path) -> threading.Thread:
    """Kill the server (SIGKILL) as soon as the first instance of the series arrives."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            if incoming.is_dir() and any(incoming.glob("*.dcm")):
                server.kill()
                return
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_server_stopped_mid_retrieve_is_a_failed_row_and_a_rerun_completes_it(
    series, checkpoint, tmp_path, capsys
):
    """Orthanc killed while it sends the series: the series is one failed row naming the peer,
    its instances so far stay out of sight (whole files, in retrieved/STUDY/.incomplete/), no
    scan is classified from part of a series; with the server back, the same command retrieves
    the rest and classifies it."""
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    study, uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    out = tmp_path / "o"
    common = ["--study", study, "--checkpoint", str(checkpoint), "--output", str(out),
              "--device", "cpu", "--no-progress"]  # fmt: skip
    with _orthanc(tmp_path / "orthanc", series) as ports:
        watcher = _kill_when_retrieving(
            ports["server"], out / "retrieved" / study / INCOMPLETE_DIR / uid
        )
        code = infer_main(["--from-pacs", f"ORTHANC@127.0.0.1:{ports['dicom']}", *common])
        watcher.join()
    captured = capsys.readouterr()
    assert code == 1, captured.err
    rows = _rows(out)
    assert len(rows) == 1 and not rows[0]["prob_abnormal"]
    assert rows[0]["path"] == str(out / "retrieved" / study / uid)
    assert "ORTHANC@127.0.0.1" in rows[0]["error"] and "rerun" in rows[0]["error"]
    assert not (out / "retrieved" / study / uid).exists()
    partial = sorted((out / "retrieved" / study / INCOMPLETE_DIR / uid).iterdir())
    assert 0 < len(partial) < len(series)
    for path in partial:  # whole files only: each reads to its last pixel
        assert pydicom.dcmread(path).pixel_array.shape == (64, 64)
    with _orthanc(tmp_path / "orthanc", series) as ports:  # the server is back
        assert infer_main(["--from-pacs", f"ORTHANC@127.0.0.1:{ports['dicom']}", *common]) == 0
    rows = _rows(out)
    assert len(rows) == 1 and rows[0]["prob_abnormal"] and not rows[0]["error"]
    assert len(list((out / "retrieved" / study / uid).glob("*.dcm"))) == len(series)
    assert not (out / "retrieved" / study / INCOMPLETE_DIR / uid).exists()


def test_a_series_the_peer_holds_in_part_fails_and_a_rerun_completes_it(
    series, checkpoint, tmp_path, capsys
):
    """The PACS holds the series without three of its middle slices (the scanner still sending
    them): the series retrieved is refused by the slice-gap check, a failed row; once the PACS
    holds them, the same command retrieves the series again (it holds more instances now) and
    classifies it."""
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    study, uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    by_position = sorted(
        series,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    held = by_position[:30] + by_position[33:]
    out = tmp_path / "o"
    with _orthanc(tmp_path / "orthanc", held) as ports:
        args = ["--from-pacs", f"ORTHANC@127.0.0.1:{ports['dicom']}", "--study", study,
                "--checkpoint", str(checkpoint), "--output", str(out), "--device", "cpu",
                "--no-progress"]  # fmt: skip
        assert infer_main(args) == 1
        (row,) = _rows(out)
        assert "missing slices or a gap" in row["error"] and not row["prob_abnormal"]
        for path in by_position[30:33]:  # the rest arrives at the PACS
            _http(ports["http"], "/instances", path.read_bytes())
        assert infer_main(args) == 0
    (row,) = _rows(out)
    assert row["prob_abnormal"] and not row["error"]
    assert len(list((out / "retrieved" / study / uid).glob("*.dcm"))) == len(series)
    assert "Traceback" not in capsys.readouterr().err


def test_a_study_over_dicomweb_retrieved_classified_and_its_sr_stored_back(
    series, checkpoint, tmp_path, capsys
):
    """The same round trip over DICOMweb (Orthanc's plugin): QIDO-RS finds the study by patient,
    WADO-RS retrieves its CT series, STOW-RS stores the SR back into the same study; the
    probability equals app.infer's on the shared series read from disk."""
    header = pydicom.dcmread(series[0], stop_before_pixels=True)
    study = str(header.StudyInstanceUID)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    assert infer_main([str(series[0].parent), "--output", str(tmp_path / "disk"), *common]) == 0
    with _orthanc(tmp_path / "orthanc", series, web=True) as ports:
        root = f"http://127.0.0.1:{ports['http']}/dicom-web"
        args = ["--from-pacs", root, "--patient", str(header.PatientID), "--send-sr",
                "--output", str(tmp_path / "web"), *common]  # fmt: skip
        assert infer_main(args) == 0, capsys.readouterr().err
        said = capsys.readouterr().out
        assert "1 studies found" in said and "sent 1 of 1 DICOM SRs" in said
        stored, modalities = _the_study(ports["http"])
        assert modalities == ["CT", "SR"]
        assert stored["MainDicomTags"]["StudyInstanceUID"] == study
    (web_row,) = _rows(tmp_path / "web")
    (disk_row,) = _rows(tmp_path / "disk")
    assert web_row["prob_abnormal"] == disk_row["prob_abnormal"] != ""


def test_a_dicomweb_root_that_does_not_answer_is_one_line(tmp_path, checkpoint, capsys):
    args = ["--from-pacs", f"http://127.0.0.1:{free_port()}/dicom-web", "--study", "1.2.3",
            "--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert infer_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: http://127.0.0.1:") and "did not answer the QIDO-RS" in err
    assert len(err.strip().splitlines()) == 1
