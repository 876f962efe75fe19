"""Results as DICOM Structured Reports (issue 33): one Comprehensive 3D SR per classified DICOM
series, validated by David Clunie's dciodvfy (dicom3tools, the Debian package CI installs) and
read back with pydicom: the numbers equal predictions.csv, the study is the series' own."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import in_ci

from app.infer import main as infer_main
from app.inference.dicom_sr import LABEL, PROBABILITY, SR_SERIES_NUMBER


def _dciodvfy() -> str:
    found = shutil.which("dciodvfy")
    if found is None:
        if in_ci():
            pytest.fail("dciodvfy is missing in CI: .ci/run installs dicom3tools")
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed here")
    return found


def _items(dataset: pydicom.Dataset):
    """Every content item of an SR, depth first."""
    for item in getattr(dataset, "ContentSequence", []):
        yield item
        yield from _items(item)


def _named(dataset: pydicom.Dataset, code) -> list[pydicom.Dataset]:
    return [
        i
        for i in _items(dataset)
        if "ConceptNameCodeSequence" in i
        and i.ConceptNameCodeSequence[0].CodeValue == code.value
        and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator
    ]


@pytest.fixture(scope="module")
def classified(real_ct_dir, tmp_path_factory, checkpoint):
    """app.infer --dicom-sr over a folder of a real series, a real 3-slice series (warned), a
    real NIfTI scan and a series cut short (failed)."""
    tmp = tmp_path_factory.mktemp("sr")
    scans = tmp / "scans"
    shutil.copytree(real_ct_dir / "cip_ct-64_dicom", scans / "chest")
    shutil.copytree(real_ct_dir / "dcmqi_ct-3slice_dicom", scans / "thin")
    shutil.copytree(real_ct_dir / "cip_ct-64_dicom", scans / "broken")
    shutil.copy(real_ct_dir / "cip_ct-64_chest.nii.gz", scans / "chest.nii.gz")
    for f in (scans / "broken").iterdir():
        f.chmod(0o644)
    cut = sorted((scans / "broken").iterdir())[10]
    cut.write_bytes(cut.read_bytes()[:-3000])
    out, reports = tmp / "out", tmp / "sr"
    args = [str(scans), "--checkpoint", str(checkpoint), "--output", str(out), "--dicom-sr",
            str(reports), "--device", "cpu", "--no-progress"]  # fmt: skip
    return scans, out, reports, infer_main(args)


@pytest.fixture(scope="module")
def real_ct_dir() -> Path:
    from conftest import SHARED, require_shared

    return require_shared(SHARED / "data" / "real-ct")


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def test_one_sr_per_classified_series_none_for_nifti_or_failed(classified, capsys):
    scans, out, reports, status = classified
    assert status == 1  # the series cut short failed; its reason stays in the CSV
    rows = _rows(out)
    assert rows["broken"]["error"] and rows["chest"]["prob_abnormal"]
    written = sorted(p.name for p in reports.glob("*.dcm"))
    # named as the input (the series "chest" shares its name with chest.nii.gz: a hash added)
    assert len(written) == 2 and "thin.dcm" in written and written[0].startswith("chest-"), written


def test_the_sr_passes_dciodvfy(classified):
    """No error from the reference validator of DICOM objects (its warnings name our private
    coding scheme and the source series' own person names)."""
    dciodvfy = _dciodvfy()
    _, _, reports, _ = classified
    for path in reports.glob("*.dcm"):
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        errors = [
            line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")
        ]
        assert errors == [], (path.name, errors)


def test_the_sr_read_back_equals_the_predictions_and_joins_the_study(classified, tmp_path):
    scans, out, reports, _ = classified
    rows = _rows(out)
    for name in ("chest", "thin"):
        source = pydicom.dcmread(next((scans / name).iterdir()), stop_before_pixels=True)
        sr = pydicom.dcmread(next(reports.glob(f"{name}*.dcm")))  # NAME.dcm or NAME-HASH.dcm
        assert sr.Modality == "SR" and sr.SeriesNumber == SR_SERIES_NUMBER
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.PatientID == source.PatientID
        referenced = [
            s.SeriesInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for s in study.ReferencedSeriesSequence
        ]
        assert referenced == [source.SeriesInstanceUID]
        value = _named(sr, PROBABILITY)[0].MeasuredValueSequence[0].NumericValue
        assert abs(float(value) - float(rows[name]["prob_abnormal"])) < 1e-6
        label = _named(sr, LABEL)[0].ConceptCodeSequence[0].CodeMeaning
        assert label == rows[name]["label"]
        comments = [i.TextValue for i in _items(sr) if i.ValueType == "TEXT"]
        parameters = " ".join(comments)
        assert "threshold 0.5" in parameters and "best_model.pt" in parameters
        assert str(tmp_path.parent) not in sr.to_json()  # no folder of this machine
        for warning in filter(None, rows[name]["warnings"].split("; ")):
            assert f"warning: {warning}" in comments
    assert rows["thin"]["warnings"]  # the 3-slice series is warned about, and its SR says so


def test_the_console_says_why_nifti_inputs_get_none(real_ct_dir, tmp_path, checkpoint, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(real_ct_dir / "cip_ct-64_chest.nii.gz", scans / "chest.nii.gz")
    args = [str(scans), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"),
            "--dicom-sr", str(tmp_path / "sr"), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert infer_main(args) == 0
    said = capsys.readouterr().out
    assert "DICOM SR: 0 written" in said and "none for 1 NIfTI inputs" in said
    assert not (tmp_path / "sr").exists() or not list((tmp_path / "sr").glob("*.dcm"))


def test_a_severity_models_sr_carries_its_grade_and_passes_dciodvfy(real_ct_dir, tmp_path):
    """A severity model's report: the grade as a second qualitative evaluation beside the
    label, each grade's probability in a comment; still no dciodvfy error."""
    from app.inference.dicom_sr import GRADE, write_dicom_sr

    files = sorted(str(p) for p in (real_ct_dir / "dcmqi_ct-3slice_dicom").iterdir())
    model = {"checkpoint": "best_model.pt", "sha256": "0" * 64, "threshold": 0.3,
             "description": "a severity model"}  # fmt: skip
    probs = [("CT-0", 0.1), ("CT-1", 0.2), ("CT-2", 0.5), ("CT-3", 0.15), ("CT-4", 0.05)]
    path = write_dicom_sr(files, 0.9, "abnormal", [], model, tmp_path / "sr.dcm", "CT-2", probs)
    sr = pydicom.dcmread(path)
    assert _named(sr, GRADE)[0].ConceptCodeSequence[0].CodeMeaning == "CT-2"
    assert _named(sr, LABEL)[0].ConceptCodeSequence[0].CodeMeaning == "abnormal"
    comments = [i.TextValue for i in _items(sr) if i.ValueType == "TEXT"]
    assert "grade probabilities: CT-0 0.100000, CT-1 0.200000, CT-2 0.500000" in " ".join(comments)
    proc = subprocess.run([_dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
