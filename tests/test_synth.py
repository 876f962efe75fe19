from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app.data.cli import main as data_main
from app.data.synth import generate_scan


def test_scans_are_deterministic_and_mosmed_like():
    a = generate_scan(1, seed=5, shape=(64, 64, 16))
    b = generate_scan(1, seed=5, shape=(64, 64, 16))
    np.testing.assert_array_equal(a.volume, b.volume)
    assert a.volume.dtype == np.int16 and a.volume.shape == (64, 64, 16)
    assert nib.aff2axcodes(a.affine) == ("L", "A", "S")
    assert not np.array_equal(generate_scan(1, seed=6, shape=(64, 64, 16)).volume, a.volume)


def test_default_geometry_is_mosmed():
    scan = generate_scan(0, seed=1)
    nx, ny, nz = scan.volume.shape
    assert (nx, ny) == (512, 512) and 30 <= nz <= 70
    zooms = np.abs(np.diag(scan.affine)[:3])
    assert 0.6 <= zooms[0] <= 0.9 and zooms[2] == 8.0
    lungs = scan.volume[scan.lung_mask]
    assert -950 < np.median(lungs) < -750  # aerated lung
    assert (scan.volume < -950).mean() > 0.1  # air around the body
    assert scan.volume.max() > 500  # bone


def test_abnormal_scans_have_opacities_in_the_lungs_and_normal_ones_do_not():
    def opacity(label, seed):
        scan = generate_scan(label, seed=seed, shape=(96, 96, 24), difficulty=0.0)
        lung = scan.volume[scan.lung_mask]
        return float(((lung > -600) & (lung < -200)).mean())

    normal = [opacity(0, s) for s in range(4)]
    abnormal = [opacity(1, s) for s in range(4)]
    assert min(abnormal) > max(normal)


def test_synth_cli_writes_class_folders(tmp_path):
    out = tmp_path / "d"
    assert (
        data_main(
            [
                "synth",
                str(out),
                "--per-class",
                "2",
                "--shape",
                "48",
                "48",
                "8",
                "--seed",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert files == [
        "CT-0/synth_0_0000.nii.gz",
        "CT-0/synth_0_0001.nii.gz",
        "CT-23/synth_1_0000.nii.gz",
        "CT-23/synth_1_0001.nii.gz",
    ]
    img = nib.load(str(out / "CT-23" / "synth_1_0001.nii.gz"))
    assert img.get_data_dtype() == np.int16 and img.shape == (48, 48, 8)
    assert int(img.header["qform_code"]) == 1 and nib.aff2axcodes(img.affine) == ("L", "A", "S")
    before = (out / "CT-0" / "synth_0_0000.nii.gz").read_bytes()
    assert (
        data_main(
            [
                "synth",
                str(out),
                "--per-class",
                "2",
                "--shape",
                "48",
                "48",
                "8",
                "--seed",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "CT-0" / "synth_0_0000.nii.gz").read_bytes() == before
    assert data_main(["synth", str(out), "--per-class", "0"]) == 2


def test_a_kill_mid_write_leaves_no_file_a_finder_takes_for_a_scan(tmp_path, monkeypatch):
    from app.bundle.portable.scans import find_inputs
    from app.data import synth
    from app.data.datalist import discover

    calls = {"n": 0}
    real_replace = Path.replace

    def dying_replace(self, target):  # the process dies after writing, before the rename
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        synth.write_dataset(tmp_path, 3, (48, 48, 12), progress=False)
    monkeypatch.undo()
    partial = list(tmp_path.rglob(f"*{synth.PARTIAL_SUFFIX}"))
    assert len(partial) == 1 and partial[0].name.startswith(".")
    (tmp_path / "CT-0" / "synth_0_0009.tmp.nii.gz").write_bytes(b"left by an older version")
    assert len(discover(tmp_path)) == 2  # the two complete scans only
    assert sorted(Path(s.key).name for s in find_inputs(tmp_path)) == [
        "synth_0_0000.nii.gz",
        "synth_1_0000.nii.gz",
    ]
    items = synth.write_dataset(tmp_path, 3, (48, 48, 12), progress=False)  # completes, cleans up
    assert len(items) == 6 and not list(tmp_path.rglob("*.partial"))
    assert not list(tmp_path.rglob("*.tmp.nii.gz"))
    assert all(synth.is_generated(nib.load(str(d["image"])).header) for d in items)
