"""transforms.dicom: a DICOM series read by slice position, as DICOM defines it (issue 30). The
reference is MONAI's PydicomReader on a well-formed real series and the same scan as NIfTI; the
variants are what real series do: no InstanceNumber, numbers out of order, duplicates, two
series in one folder, a localizer mixed in, a gantry tilt, missing slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from transforms.dicom import DicomSeriesError, DicomSeriesReader, read_series


def _load(source):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    chain = Compose(
        [
            LoadImaged("image", reader=DicomSeriesReader(), image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS", labels=None),
        ]
    )
    return chain({"image": source})["image"]


def _copy(real_ct, tmp_path: Path, name: str = "series") -> Path:
    folder = tmp_path / name
    shutil.copytree(real_ct / "cip_ct-64_dicom", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def _edit(folder: Path, change) -> None:
    import pydicom

    for i, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        change(i, ds)
        ds.save_as(path)


def test_the_reader_equals_monais_pydicom_reader_and_the_nifti(real_ct):
    """A well-formed real series (79 slices, LPS): the same voxels and affine as MONAI's
    PydicomReader (swap_ij), and, reoriented, the same volume as its NIfTI copy."""
    import nibabel as nib
    from monai.data import PydicomReader

    ours = DicomSeriesReader()
    volume, meta = ours.get_data(ours.read(str(real_ct / "cip_ct-64_dicom")))
    monai = PydicomReader(swap_ij=True)
    theirs, their_meta = monai.get_data(monai.read(str(real_ct / "cip_ct-64_dicom")))
    np.testing.assert_array_equal(volume, np.asarray(theirs, dtype=np.float32))
    np.testing.assert_allclose(meta["affine"], their_meta["affine"], atol=1e-4)
    nifti = nib.as_closest_canonical(nib.load(real_ct / "cip_ct-64_chest.nii.gz"))
    loaded = _load(str(real_ct / "cip_ct-64_dicom"))
    np.testing.assert_array_equal(loaded[0].numpy(), np.asarray(nifti.dataobj, np.float32))
    np.testing.assert_allclose(loaded.affine.numpy(), nifti.affine, atol=1e-3)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(lambda i, ds: delattr(ds, "InstanceNumber"), id="no-InstanceNumber"),
        pytest.param(lambda i, ds: setattr(ds, "InstanceNumber", 500 - 3 * i), id="reversed"),
        pytest.param(lambda i, ds: setattr(ds, "InstanceNumber", (i * 37) % 79 + 1), id="shuffled"),
        pytest.param(lambda i, ds: setattr(ds, "InstanceNumber", 1), id="all-equal"),
    ],
)
def test_slices_are_ordered_by_position_not_instance_number(real_ct, tmp_path, variant):
    folder = _copy(real_ct, tmp_path)
    _edit(folder, variant)
    expected = _load(str(real_ct / "cip_ct-64_dicom"))
    torch.testing.assert_close(_load(str(folder)), expected)


def test_file_names_in_any_order(real_ct, tmp_path):
    folder = _copy(real_ct, tmp_path)
    files = sorted(folder.iterdir())
    for i, f in enumerate(files):  # names no longer follow the slices
        f.rename(folder / f"x{(i * 31) % len(files):03d}_{i}.dcm")
    torch.testing.assert_close(_load(str(folder)), _load(str(real_ct / "cip_ct-64_dicom")))


def test_two_slices_at_one_position_are_refused_naming_both(real_ct, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    folder = _copy(real_ct, tmp_path)
    source = sorted(folder.iterdir())[10]
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "copy_of_slice.dcm")
    with pytest.raises(DicomSeriesError, match="two slices at one position") as err:
        read_series(str(folder))
    assert "copy_of_slice.dcm" in str(err.value) and source.name in str(err.value)


def test_two_series_in_one_folder_are_two_scans(real_ct, tmp_path, checkpoint):
    from pydicom.uid import generate_uid

    from app.inference.classifier import Classifier
    from app.runtime.scans import find_inputs

    folder = _copy(real_ct, tmp_path)
    other = generate_uid()
    files = sorted(folder.iterdir())
    for f in files[40:]:  # the upper half becomes another series
        _edit_one(f, lambda ds: setattr(ds, "SeriesInstanceUID", other))
    inputs = find_inputs(folder)
    assert len(inputs) == 2 and {len(s.files) for s in inputs} == {40, 39}
    assert {len(read_series(s.key).headers) for s in inputs} == {40, 39}
    clf = Classifier.load(checkpoint, device="cpu")
    for scan in inputs:  # each series read alone, from the user's own files
        prepared = clf.preparer(scan)
        assert prepared["error"] is None, prepared["error"]


def _edit_one(path: Path, change) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def test_a_localizer_in_the_series_is_left_out_and_said(real_ct, tmp_path, checkpoint):
    """A scout image with the series' UID (ImageType LOCALIZER, or only a coronal
    orientation): left out with a warning, the volume is the series'."""
    import pydicom
    from pydicom.uid import generate_uid

    from app.runtime.scanqc import check_dicom_series

    folder = _copy(real_ct, tmp_path)
    for name, typed in (("scout_typed.dcm", True), ("scout_coronal.dcm", False)):
        ds = pydicom.dcmread(sorted(folder.iterdir())[5])
        ds.SOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
        if typed:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(folder / name)
    files = [str(p) for p in sorted(folder.iterdir())]
    warnings = check_dicom_series(files)
    assert any("localizer image(s) left out (scout_typed.dcm)" in w for w in warnings), warnings
    assert any("another orientation left out" in w and "scout_coronal.dcm" in w for w in warnings)
    torch.testing.assert_close(_load(str(folder)), _load(str(real_ct / "cip_ct-64_dicom")))
    from app.inference.classifier import Classifier

    pred = Classifier.load(checkpoint, device="cpu").predict(folder)
    assert pred.ok and any("localizer" in w for w in pred.warnings), pred


def test_a_gantry_tilt_shears_the_affine_and_is_said(real_ct, tmp_path):
    """Slices stepping 15 degrees off their normal (ImagePositionPatient moving along y as z
    rises): read, the affine's slice axis is the step, a warning names the tilt."""
    from app.runtime.scanqc import check_dicom_series

    folder = _copy(real_ct, tmp_path)
    tan = np.tan(np.radians(15.0))

    def tilt(i, ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + tan * (z - 0.0), z]

    _edit(folder, tilt)
    series = read_series(str(folder))
    assert series.tilt_degrees() == pytest.approx(15.0, abs=0.1)
    volume, meta = DicomSeriesReader().get_data(series)
    step = meta["affine"][:3, 2]
    assert abs(np.degrees(np.arctan2(abs(step[1]), abs(step[2]))) - 15.0) < 0.1
    warnings = check_dicom_series([str(p) for p in sorted(folder.iterdir())])
    assert any("gantry tilt of 15.0 degrees" in w for w in warnings), warnings


def test_missing_slices_are_refused(real_ct, tmp_path):
    from app.runtime.scanqc import ScanError, check_dicom_series

    folder = _copy(real_ct, tmp_path)
    for f in sorted(folder.iterdir())[30:33]:
        f.unlink()
    with pytest.raises(ScanError, match="missing slices or a gap"):
        check_dicom_series([str(p) for p in sorted(folder.iterdir())])


def test_a_real_two_slice_series_without_instance_numbers_is_classified_with_a_warning(
    real_ct, tmp_path, checkpoint
):
    """The issue's series: 2 real chest slices, no InstanceNumber. It was refused ("the input
    does not have valid slices", MONAI naming a temporary copy); now it is read in position
    order, classified, and warned about as the README says of fewer than 16 slices."""
    from app.inference.classifier import Classifier

    folder = tmp_path / "two"
    folder.mkdir()
    for f in sorted((real_ct / "dcmqi_ct-3slice_dicom").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
        (folder / f.name).chmod(0o644)
    _edit(folder, lambda i, ds: delattr(ds, "InstanceNumber"))
    pred = Classifier.load(checkpoint, device="cpu").predict(folder)
    assert pred.ok, pred.error
    assert any("very few slices (2)" in w for w in pred.warnings), pred.warnings
    assert read_series(str(folder)).positions[0] < read_series(str(folder)).positions[1]


def test_the_density_baseline_reads_series_as_the_model_does(real_ct, tmp_path):
    """The baseline's features of a series without InstanceNumber equal those of its NIfTI
    copy (MONAI's stock DICOM reader skips such files and reads nothing)."""
    from app.evaluation.baseline import scan_features

    folder = _copy(real_ct, tmp_path)
    _edit(folder, lambda i, ds: delattr(ds, "InstanceNumber"))
    features = scan_features([str(folder), str(real_ct / "cip_ct-64_chest.nii.gz")])
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features[0], features[1], rtol=1e-5, atol=1e-6)
