"""Every input is checked before it is classified (issue 21 and after): each bad input kind
gets its one-line reason, DICOM series and their headers are bounded before any pixel is read,
the QC warnings and the checks as a classifier on a labelled corpus."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ct_volume, nifti

from app.inference.classifier import Classifier
from app.runtime.scanqc import (
    Limits,
    ScanError,
    check_dicom_series,
    check_nifti_header,
    check_values,
)
from app.runtime.scans import find_inputs

# --- bad inputs: each one is reported with a one-line reason -------------------------------------


def broken_files(folder: Path) -> dict[str, str]:
    """name -> expected error fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.nii.gz").write_bytes(b"")
    good = nifti(folder / "tmp.nii.gz", ct_volume())
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\x00" * 64
    (folder / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    (folder / "notnifti.nii").write_text("this is not an image\n" * 50)
    (folder / "plain.nii.gz").write_bytes(nib.Nifti1Image(ct_volume(), np.eye(4)).to_bytes())
    nifti(folder / "flat2d.nii.gz", ct_volume()[:, :, 0])
    nifti(folder / "series4d.nii.gz", np.stack([ct_volume()] * 3, axis=-1))
    nan = ct_volume().astype(np.float32)
    nan[3, 3, 3] = np.nan
    nifti(folder / "nan.nii.gz", nan)
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    huge.header.set_data_shape((30000, 30000, 3000))
    (folder / "absurd.nii").write_bytes(huge.header.binaryblock + b"\x00" * 100)
    return {
        "empty.nii.gz": "empty file",
        "truncated.nii.gz": "truncated or corrupt gzip",
        "corrupt.nii.gz": "corrupt gzip",
        "notnifti.nii": "not a NIfTI file",
        "plain.nii.gz": "not gzip-compressed",
        "flat2d.nii.gz": "not 3D",
        "series4d.nii.gz": "not 3D: a 4D image",
        "nan.nii.gz": "NaN or infinite",
        "absurd.nii": "above the limit",
    }


def test_every_bad_input_kind_gets_its_error(tmp_path, checkpoint):
    expected = broken_files(tmp_path / "in")
    clf = Classifier.load(checkpoint, device="cpu")
    results = {Path(p.path).name: p for p in clf.predict_many(find_inputs(tmp_path / "in"))}
    assert set(results) == set(expected)
    for name, fragment in expected.items():
        pred = results[name]
        assert pred.prob_abnormal is None and pred.error and fragment in pred.error, (
            name,
            pred.error,
        )
        assert "\n" not in pred.error


def test_absurd_header_is_refused_before_reading(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((32000, 32000, 32000))
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as f:  # tiny file whose header claims 3.3e13 voxels
        f.write(img.header.binaryblock + b"\x00" * 4)
    with pytest.raises(ScanError, match="above the limit"):
        check_nifti_header(path, Limits())
    assert path.stat().st_size < 1000


def test_qc_warnings_still_classify(tmp_path, checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    oblique = np.diag([-1.0, 1.0, 3.0, 1.0])
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    oblique[:2, :2] = [[-c, -s], [-s, c]]
    nifti(folder / "oblique.nii.gz", ct_volume(), oblique)
    nifti(folder / "thin.nii.gz", ct_volume((40, 40, 5)))
    nifti(folder / "spacing.nii.gz", ct_volume(), np.diag([-5.0, 5.0, 25.0, 1.0]))
    clf = Classifier.load(checkpoint, device="cpu")
    results = {Path(p.path).name: p for p in clf.predict_many(find_inputs(folder))}
    expected = {
        "oblique.nii.gz": "oblique",
        "thin.nii.gz": "very few slices",
        "spacing.nii.gz": "implausible voxel spacing",
    }
    for name, fragment in expected.items():
        pred = results[name]
        assert pred.prob_abnormal is not None and 0 <= pred.prob_abnormal <= 1, name
        assert any(fragment in w for w in pred.warnings), (name, pred.warnings)


def test_check_values_accepts_ct():
    assert check_values(ct_volume().astype(np.float32)) == []


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda ct: (ct.clip(-1000, 400) + 1000) / 1400, "not CT in Hounsfield",
                     id="normalised-0-1"),
        pytest.param(lambda ct: (ct - ct.mean()) / ct.std(), "not CT in Hounsfield", id="z-scored"),
        pytest.param(lambda ct: np.round((ct.clip(-1000, 400) + 1000) / 1400 * 255),
                     "not CT in Hounsfield", id="8-bit"),
        pytest.param(lambda ct: ct + 1024, "not CT in Hounsfield", id="no-rescale-intercept"),
        pytest.param(lambda ct: (ct < -500).astype(np.float32), "label map or mask", id="mask"),
        pytest.param(lambda ct: np.digitize(ct, [-500, 0, 200]).astype(np.float32) * 10,
                     "label map or mask", id="label-map"),
    ],
)  # fmt: skip
def test_input_that_is_not_ct_in_hu_is_refused(tmp_path, checkpoint, make, reason):
    """Issue 21: a mask, a normalised, z-scored or 8-bit volume is a failed row with the reason,
    never a probability (each of these was once "100.00 percent confident ... abnormal")."""
    volume = make(ct_volume().astype(np.float32))
    with pytest.raises(ScanError, match=reason):
        check_values(volume)
    path = nifti(tmp_path / "x.nii.gz", volume.astype(np.float32))
    pred = Classifier.load(checkpoint, device="cpu").predict(path)
    assert not pred.ok and pred.prob_abnormal is None and reason in str(pred.error)
    assert "percent confident" not in pred.sentence() and reason in pred.sentence()


# --- DICOM ----------------------------------------------------------------------------------------


def test_dicom_series_equals_nifti_volume(real_ct, checkpoint):
    clf = Classifier.load(checkpoint, device="cpu")
    series = find_inputs(real_ct / "cip_ct-64_dicom")
    assert len(series) == 1 and series[0].kind == "dicom" and len(series[0].files) == 79
    from_dicom = clf.preparer(series[0])
    from_nifti = clf.preparer(find_inputs(real_ct / "cip_ct-64_chest.nii.gz")[0])
    assert from_dicom["error"] is None and from_nifti["error"] is None
    torch.testing.assert_close(from_dicom["image"], from_nifti["image"])


def test_small_and_gapped_dicom_series(real_ct, checkpoint):
    assert "very few slices (3)" in check_dicom_series(
        find_inputs(real_ct / "dcmqi_ct-3slice_dicom")[0].files
    )
    with pytest.raises(ScanError, match="gap"):
        check_dicom_series(find_inputs(real_ct / "monai_CT_DICOM_head_16x16")[0].files)


def test_jpeg2000_compressed_series_and_two_series_in_one_folder(real_ct, tmp_path, checkpoint):
    import pydicom
    from pydicom.uid import JPEG2000Lossless, generate_uid

    folder = tmp_path / "mixed"
    folder.mkdir()
    other_uid = generate_uid()
    for i, src in enumerate(sorted((real_ct / "cip_ct-64_dicom").iterdir())):
        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless)
        ds.save_as(folder / f"a{i:03d}.dcm")
        if i < 20:  # a second, uncompressed series of 20 slices in the same folder
            plain = pydicom.dcmread(src)
            plain.SeriesInstanceUID = other_uid
            plain.save_as(folder / f"b{i:03d}.dcm")
    inputs = find_inputs(folder)
    assert sorted(len(s.files) for s in inputs) == [20, 79]
    assert all("#" in s.key for s in inputs)
    clf = Classifier.load(checkpoint, device="cpu")
    compressed = next(s for s in inputs if len(s.files) == 79)
    reference = clf.preparer(find_inputs(real_ct / "cip_ct-64_chest.nii.gz")[0])["image"]
    torch.testing.assert_close(clf.preparer(compressed)["image"], reference)
    preds = list(clf.predict_many(inputs))
    assert all(p.ok for p in preds)


# --- checkpoints ----------------------------------------------------------------------------------


def dicom_slice(path: Path, **fields) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SeriesInstanceUID = "1.2.3"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [1, 1]
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.PixelData = b"\0" * 128  # far less than the header claims: it must never be read
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"NumberOfFrames": 400}, "multi-frame DICOM object", id="enhanced-multiframe"),
        pytest.param(
            {"Rows": 65535, "Columns": 65535, "NumberOfFrames": 1000},
            "above the limit",
            id="huge-frames",
        ),
        pytest.param({"Rows": 65535, "Columns": 65535}, "above the limit", id="huge-slices"),
        pytest.param({"BitsAllocated": 0}, "not an image", id="zero-bits"),
        pytest.param({"Rows": 0}, "not an image", id="zero-rows"),
    ],
)
def test_dicom_claims_are_bounded_before_reading(tmp_path, checkpoint, fields, message):
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(30):
        dicom_slice(folder / f"{i:03d}.dcm", ImagePositionPatient=[0, 0, float(i)], **fields)
    with pytest.raises(ScanError, match=message):
        check_dicom_series([str(p) for p in sorted(folder.iterdir())], Limits())
    pred = Classifier.load(checkpoint, device="cpu").predict(folder)
    assert not pred.ok and message in pred.error


@pytest.mark.parametrize(
    ("slices", "lung_slices", "thickness", "warned"),
    [
        (20, 4, 5.0, True),  # lung in 20% of the slices, over 20 mm
        (20, 5, 5.0, False),  # in 25%
        (20, 20, 5.0, False),
        (100, 20, 5.0, False),  # in 20%, but over 100 mm: a chest-abdomen-pelvis CT
        (100, 15, 5.0, True),  # in 15%, over 75 mm
    ],
)
def test_lung_warning_below_a_quarter_of_the_slices_and_80_mm(
    slices, lung_slices, thickness, warned
):
    """README: "not a chest CT?" when lung is in under 25% of the axial slices and spans under
    80 mm (a chest CT that also covers the abdomen holds lung in few slices, over many mm)."""
    from app.runtime.scanqc import check_values

    vol = np.full((64, 64, slices), -1000.0)
    vol[8:56, 8:56, :] = 40.0  # a body in every slice
    vol[16:30, 16:48, :lung_slices] = -850.0  # lungs in the first slices only
    warnings = check_values(vol, np.diag([0.8, 0.8, thickness, 1.0]))
    assert any("not a chest CT?" in w for w in warnings) == warned, warnings


def test_sentence_carries_the_warnings():
    """Issue 21: the README's Python example prints ``sentence()``; it must not drop warnings."""
    from app.inference.classifier import Prediction

    pred = Prediction("a.nii.gz", 0.25, "normal", warnings=["very few slices (3)", "x"])
    assert pred.sentence().endswith("-> normal  [warning: very few slices (3); x]")
    assert "[warning" not in Prediction("b.nii.gz", 0.25, "normal").sentence()


def test_qc_corpus_no_chest_ct_called_not_chest_every_other_input_caught(real_ct, tmp_path):
    """docs/reliability.md's table: on the labelled corpus (the shared real files, generated
    scans, inputs made from the real chest CT), no chest CT is warned "not a chest CT?" or
    refused, every non-chest CT is warned or refused, every non-HU input is refused as such."""
    from testdata import qc_corpus as qc

    rows = qc.run_checks(qc.build(real_ct.parent.parent, tmp_path))
    assert len(rows) == 32  # the README and docs/reliability.md quote the corpus size
    for row in rows:
        item, flags, refused = row["item"], row["flags"], row["refused"]
        if item.truth == "chest":
            assert not refused and not flags["not chest"] and not flags["not HU"], (item, row)
        elif item.truth == "not-chest":
            assert refused or flags["not chest"], (item, row)
            assert not flags["not HU"], (item, row)
        else:
            assert refused and flags["not HU"], (item, row)
        if item.origin == "generated":  # in the training scans' spacing range: no warning
            assert not flags["spacing"] or "512x512" in item.name, (item, row)
    assert "| not chest | 4 | 4 | 0" in qc.table(rows)


@pytest.mark.parametrize(
    ("zooms", "warned"),
    [
        ((0.8, 0.8, 8.0), False),
        ((0.41, 0.41, 4.1), False),  # just inside half the smallest
        ((0.8, 0.8, 3.9), True),  # slices under half the training scans' 8 mm
        ((0.8, 0.8, 16.0), False),
        ((0.8, 0.8, 16.5), True),  # over twice
    ],
)
def test_spacing_warning_beyond_twice_the_training_range(zooms, warned):
    """README: a warning when the spacing lies more than 2x outside the training scans'."""
    from app.runtime.scanqc import TrainingContext, training_warnings

    context = TrainingContext(
        generated=False, spacing_min=(0.82, 0.82, 8.0), spacing_max=(0.9, 0.9, 8.0)
    )
    warnings = training_warnings(zooms, False, context)
    assert any("far from the training scans'" in w for w in warnings) == warned, warnings


def test_unreadable_dicom_series_names_the_file_and_the_problem(real_ct, tmp_path, checkpoint):
    """Issue 21: it said "RuntimeError: applying transform <monai...LoadImaged object at 0x...>"."""
    folder = tmp_path / "series"
    shutil.copytree(real_ct / "cip_ct-64_dicom", folder)
    bad = sorted(folder.iterdir())[39]
    bad.chmod(0o644)
    data = bad.read_bytes()
    bad.write_bytes(data[:-3000])  # pixel data cut short; the header still reads
    pred = Classifier.load(checkpoint, device="cpu").predict(folder)
    assert not pred.ok and pred.prob_abnormal is None
    assert f"DICOM file {bad.name}" in pred.error and "pixel data" in pred.error, pred.error
    assert "object at 0x" not in pred.error and "applying transform" not in pred.error
