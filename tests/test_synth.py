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
    command = ["synth", str(out), "--per-class", "2", "--shape", "48", "48", "8", "--seed", "3"]
    assert data_main([*command, "--no-progress"]) == 0
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
    assert data_main([*command, "--no-progress"]) == 0  # the same command again: kept
    assert (out / "CT-0" / "synth_0_0000.nii.gz").read_bytes() == before
    assert data_main(["synth", str(out), "--per-class", "0"]) == 2


def test_a_kill_mid_write_leaves_no_file_a_finder_takes_for_a_scan(tmp_path, monkeypatch):
    from app.data import synth
    from app.data.datalist import discover
    from app.runtime.scans import find_inputs

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


def test_confounders_defeat_the_density_histogram_and_leave_default_scans_as_they_were():
    """--confounders (dependent density, expiration, vessels, blur in both classes) makes the
    density baseline fall well below its score on the same seeds without them; at 0 every scan
    is bit for bit the earlier generator's."""
    from sklearn.metrics import roc_auc_score

    from app.data.synth import generate_scan, scan_seed
    from app.evaluation.baseline import DensityBaseline, density_features

    assert np.array_equal(
        generate_scan(1, 5, shape=(48, 48, 16)).volume,
        generate_scan(1, 5, shape=(48, 48, 16), confounders=0.0).volume,
    )

    def features(seed, confounders):
        rows, labels = [], []
        for i in range(20):
            for label in (0, 1):
                scan = generate_scan(label, scan_seed(seed, i), shape=(64, 64, 24),
                                     difficulty=0.7, confounders=confounders)  # fmt: skip
                rows.append(density_features(scan.volume.astype(np.float32)))
                labels.append(label)
        return np.array(rows), np.array(labels)

    scores = {}
    for confounders in (0.0, 1.0):
        baseline = DensityBaseline.fit_features(*features(0, confounders))
        x, y = features(1, confounders)
        scores[confounders] = roc_auc_score(y, baseline.predict_features(x))
    print(scores)
    assert scores[0.0] > 0.85 and scores[1.0] < scores[0.0] - 0.1


def test_shift_changes_the_findings_and_noise_not_the_anatomy(capsys):
    """--shift (the held-out domain): at 0 the scans are the default ones; at 1 the same anatomy
    (the lung masks are identical), more noise in normal lung, fainter lesions (their mean HU
    closer to the lung's), of another shape (the lesion masks differ); out of [0, 1] refused."""
    from app.data.cli import main as data_main
    from app.data.synth import generate_scan

    shape = (64, 64, 20)
    assert np.array_equal(
        generate_scan(1, 4, shape=shape).volume, generate_scan(1, 4, shape=shape, shift=0.0).volume
    )
    for seed in (4, 7):
        plain, shifted = (generate_scan(1, seed, shape=shape, shift=s) for s in (0.0, 1.0))
        assert np.array_equal(plain.lung_mask, shifted.lung_mask)
        assert not np.array_equal(plain.lesion_mask, shifted.lesion_mask)
        lung = plain.lung_mask & ~plain.lesion_mask & ~shifted.lesion_mask
        contrast = [
            float(s.volume[s.lesion_mask].mean() - s.volume[lung].mean()) for s in (plain, shifted)
        ]
        assert 0 < contrast[1] < contrast[0]
    normal = [generate_scan(0, 3, shape=shape, shift=s) for s in (0.0, 1.0)]
    air = normal[0].volume < -980  # outside the body: noise about -1000 HU
    noise = [float(s.volume[air & (s.volume > -1024)].std()) for s in normal]
    assert noise[1] > 1.5 * noise[0]
    for bad in ("-0.1", "1.5"):
        assert data_main(["synth", "/nonexistent/x", "--shift", bad]) == 2
        assert "--shift must be in [0, 1]" in capsys.readouterr().err


def _without_and_with(option: str, seed: int, shape: tuple[int, int, int]):
    """(scan at ``option`` 0, the same scan at 1) of each class, after checking that 0 gives the
    default scan and that the option leaves the lungs and lesions where they were."""
    from app.data.synth import generate_scan

    default = generate_scan(1, seed, shape=shape).volume
    assert np.array_equal(default, generate_scan(1, seed, shape=shape, **{option: 0.0}).volume)
    for label in (0, 1):
        plain, changed = (
            generate_scan(label, seed, shape=shape, **{option: v}) for v in (0.0, 1.0)
        )
        assert np.array_equal(plain.lung_mask, changed.lung_mask)
        assert np.array_equal(plain.lesion_mask, changed.lesion_mask)
        yield plain, changed


def test_hila_add_dense_vessels_inside_both_lungs_of_both_classes(capsys):
    """--hila: at 0 the default scans; at 1 the same lungs and lesions, plus blood-dense
    branches inside the lungs, on their medial side, in normal and abnormal scans alike."""
    from app.data.cli import main as data_main

    shape = (96, 96, 32)
    for plain, hila in _without_and_with("hila", seed=2, shape=shape):
        added = (hila.volume > -200) & (plain.volume < -200) & plain.lung_mask
        assert added.sum() > 50
        assert not (added & ~plain.lung_mask).any()
        x = np.nonzero(added)[0]
        centre = (shape[0] - 1) / 2  # body centre: the vessels lie towards it from each lung
        lung_x = np.nonzero(plain.lung_mask)[0]
        assert np.abs(x - centre).mean() < np.abs(lung_x - centre).mean()
    assert data_main(["synth", "/nonexistent/x", "--hila", "2"]) == 2
    assert "--hila must be in [0, 1]" in capsys.readouterr().err


def test_parallel_generation_writes_the_same_files_as_one_process(tmp_path, monkeypatch):
    """`--workers` (the demo uses every core): the same bytes, masks too, as one process; a
    second run with some files missing completes them; more workers than cores are capped."""
    import os

    from app.data import synth

    kwargs = {"shape": (40, 40, 10), "seed": 5, "progress": False, "masks": True}
    one = synth.write_dataset(tmp_path / "one", 3, workers=1, **kwargs)
    two = synth.write_dataset(tmp_path / "two", 3, workers=2, **kwargs)
    names = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.nii.gz"))
    assert len(names) == 12 and [Path(d["image"]).name for d in one] == [
        Path(d["image"]).name for d in two
    ]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    (tmp_path / "two" / "CT-23" / "synth_1_0002.nii.gz").unlink()
    (tmp_path / "two" / "masks" / "synth_0_0001.nii.gz").unlink()
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # capped: one process, in this one
    synth.write_dataset(tmp_path / "two", 3, workers=64, **kwargs)
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_synth_cli_refuses_a_worker_count_below_one(tmp_path, capsys):
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(SystemExit) as exc:
            data_main(["synth", str(tmp_path / "d"), "--workers", bad])
        assert exc.value.code == 2
        assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("progress", [False, True])
def test_demo_data_generation_respects_no_progress(tmp_path, monkeypatch, capfd, progress):
    """`app.train --demo --no-progress` printed the data generation's progress bar anyway."""
    from app.training.recipes import DEMO_CONFIG, demo_dataset

    configs = tmp_path / "configs"
    (configs / DEMO_CONFIG).parent.mkdir(parents=True)
    (configs / DEMO_CONFIG).write_text(
        "demo_data: {per_class: 1, shape: [32, 32, 8], seed: 3, difficulty: 0.3}\n"
    )
    monkeypatch.setenv("CTCLASSIFY_CACHE", str(tmp_path / "cache"))
    root = demo_dataset(configs, progress=progress)
    assert len(list(root.rglob("*.nii.gz"))) == 2
    err = capfd.readouterr().err
    assert ("synth " in err) == progress, err


def test_trees_add_vessel_trees_with_partial_volume_in_both_classes(capsys):
    """--trees: at 0 the default scans; at 1 the same lungs and lesions, plus tubes of soft-tissue
    density inside the lungs only, with partial-volume rims (values between lung and vessel)."""
    from app.data.cli import main as data_main

    for plain, trees in _without_and_with("trees", seed=4, shape=(96, 96, 32)):
        changed = trees.volume != plain.volume
        assert changed.sum() > 200 and not (changed & ~plain.lung_mask).any()
        core = changed & (trees.volume > -100)
        rim = changed & (trees.volume > -750) & (trees.volume < -400)  # partial volume
        assert core.sum() > 20 and rim.sum() > 5, (core.sum(), rim.sum())
    assert data_main(["synth", "/nonexistent/x", "--trees", "1.5"]) == 2
    assert "--trees must be in [0, 1]" in capsys.readouterr().err
