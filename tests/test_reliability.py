"""Faults and hostile inputs: kills at random moments, full disks, broken headers, link loops."""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ct_volume, nifti, synth_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.inference.classifier import Classifier
from app.inference.reading import ScanPreparer
from app.run_folder import latest_checkpoint
from app.runtime.files import atomic_write_text
from app.runtime.scanqc import Limits
from app.runtime.scans import find_inputs

SMALL = [
    "--spatial-size",
    "48",
    "48",
    "48",
    "--seed",
    "5",
    "--device",
    "cpu",
    "--no-progress",
    "--set",
    "filters=[4, 4, 8, 8]",
    "--set",
    "dense_units=8",
    "--batch-size",
    "4",
]


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    """Fewer, thinner scans than conftest's ``tiny_data``: the kill loops run many epochs."""
    return synth_dataset(tmp_path_factory.mktemp("data") / "d", 6, (48, 48, 12))


def train_command(data: Path, run: Path, *options: str) -> list[str]:
    """``python -m app.train`` on ``data`` into ``run`` with the small settings above."""
    return [
        sys.executable,
        "-m",
        "app.train",
        "--data",
        str(data),
        "--output",
        str(run),
        *options,
        *SMALL,
    ]


def epochs_in(run: Path) -> list[str]:
    with (run / "metrics.csv").open() as f:
        return [r["epoch"] for r in csv.DictReader(f)]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(kill_data, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(0)
    base = train_command(kill_data, run, "--epochs", "60", "--patience", "100")
    kills = 0
    while kills < 10:
        mode = "--resume" if latest_checkpoint(run) is not None else "--overwrite"
        proc = subprocess.Popen([*base, mode], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        if proc.poll() is not None:  # finished before the kill: start the kill loop over
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    mode = "--resume" if latest_checkpoint(run) is not None else "--overwrite"
    done = subprocess.run([*base, mode], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert epochs_in(run) == [str(e) for e in range(1, 61)]
    assert kills == 10
    for name in ("metrics.json", "best_model.pt", "curves.png"):  # never left truncated
        assert (run / name).stat().st_size > 0
    torch.load(run / "best_model.pt", weights_only=True)


@pytest.mark.slow
def test_sigterm_stops_after_saving(kill_data, tmp_path):
    run = tmp_path / "run"
    base = train_command(kill_data, run, "--epochs", "200")
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err
    last = latest_checkpoint(run)
    assert last is not None
    done_epochs = epochs_in(run)
    assert int(last.stem.rsplit("=", 1)[1]) == int(done_epochs[-1])  # checkpoint and metrics agree


@pytest.mark.slow
def test_sigkill_during_inference_then_rerun(tmp_path, checkpoint):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(30):
        vol = np.full((40, 40, 16), -1000, np.int16)
        vol[5:35, 5:35] = np.random.default_rng(i).integers(-900, 100, size=(30, 30, 16))
        nib.save(
            nib.Nifti1Image(vol, np.diag([-1.0, 1.0, 3.0, 1.0])), str(folder / f"s{i:02d}.nii.gz")
        )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "app.infer",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_path = out / "predictions.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not csv_path.exists() or csv_path.read_text().count("\n") < 6
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = csv_path.read_text().count("\n") - 1
    assert 0 < partial < 30
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.iterdir())
    assert all(r["prob_abnormal"] for r in rows)


def test_disk_full_keeps_previous_outputs(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "good")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_disk_full_during_inference_is_a_clear_error(tmp_path, checkpoint, monkeypatch, capsys):
    from app.infer import main as infer_main

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        nifti(folder / f"s{i}.nii.gz", ct_volume((40, 40, 16), seed=i))
    out = tmp_path / "out"
    assert (
        infer_main(
            [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
        )
        == 0
    )
    before = (out / "predictions.csv").read_text()
    (folder / "s9.nii.gz").write_bytes((folder / "s0.nii.gz").read_bytes())
    from app.runtime.writer import PredictionCSV

    def full(self, line):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PredictionCSV, "_write", full)
    code = infer_main(
        [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
    )
    monkeypatch.undo()
    assert code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == before


def test_symlink_loops_and_broken_links_are_reported(tmp_path, checkpoint):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.nii.gz").symlink_to(folder / "b.nii.gz")
    (folder / "b.nii.gz").symlink_to(folder / "a.nii.gz")
    (folder / "gone.nii").symlink_to(tmp_path / "missing.nii")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # a directory loop
    found = find_inputs(folder)
    assert sorted(Path(s.key).name for s in found) == ["a.nii.gz", "b.nii.gz", "gone.nii"]
    preds = list(Classifier.load(checkpoint, device="cpu").predict_many(found))
    assert all(p.error and "symbolic link" in p.error for p in preds)


@pytest.fixture(scope="module")
def preparer() -> ScanPreparer:
    from app.config import load_config

    chain = load_config(
        "inference.yaml", overrides={"spatial_size": [48, 48, 48]}
    ).get_parsed_content("preprocessing")
    return ScanPreparer(chain, Limits(max_voxels=5_000_000, max_bytes=50_000_000))


DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]


@settings(
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    shape=st.lists(st.integers(0, 70), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    pixdim=st.lists(
        st.one_of(st.floats(-5, 20), st.just(float("nan")), st.just(0.0)), min_size=3, max_size=3
    ),
    slope=st.one_of(st.floats(-5, 5), st.just(float("nan")), st.just(float("inf"))),
    inter=st.floats(-2000, 2000),
    vox_offset=st.sampled_from([None, 0, 100, 352, 10_000]),
    codes=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    corrupt=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    gz=st.booleans(),
)
def test_hostile_nifti_headers_never_crash(
    tmp_path, preparer, shape, dtype, pixdim, slope, inter, vox_offset, codes, corrupt, gz
):
    from app.runtime.scans import ScanInput

    data_shape = [max(s, 1) for s in shape]
    if int(np.prod(data_shape)) > 300_000:
        data_shape = data_shape[:3]
        data_shape = [min(s, 60) for s in data_shape]
    array = np.random.default_rng(0).integers(-1000, 400, size=data_shape).astype(dtype)
    img = nib.Nifti1Image(array, np.eye(4))
    hdr = img.header
    with contextlib.suppress(Exception):  # some claimed shapes do not fit a NIfTI-1 header
        hdr.set_data_shape(shape if all(s > 0 for s in shape) else data_shape)
    with np.errstate(all="ignore"):
        hdr["pixdim"][1:4] = pixdim
        hdr["scl_slope"] = slope
        hdr["scl_inter"] = inter
    if vox_offset is not None:
        hdr["vox_offset"] = vox_offset
    hdr["qform_code"], hdr["sform_code"] = codes
    raw = bytearray(hdr.binaryblock + b"\x00" * 4 + array.tobytes())
    for pos, value in corrupt:
        if pos < len(raw):
            raw[pos] = value
    path = tmp_path / ("h.nii.gz" if gz else "h.nii")
    if gz:
        import gzip

        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    result = preparer(ScanInput(str(path), "nifti"))  # must return, never raise
    if result["error"] is None:
        assert tuple(result["image"].shape) == (1, 48, 48, 48)
        assert torch.isfinite(result["image"]).all()
    else:
        assert "\n" not in result["error"] and len(result["error"]) < 400
    # a file that nibabel reads as one classifiable 3D scan must be classified, not refused
    problem = classifiable_by_nibabel(path, preparer.limits)
    if problem is None:
        assert result["error"] is None, f"valid file refused: {result['error']}"


def classifiable_by_nibabel(path: Path, limits: Limits) -> str | None:
    """Why nibabel (the reference reader) finds no classifiable scan in ``path``; ``None`` if
    it does: readable, 3D (or 4D of one volume), at least 2 voxels per axis, within the size
    limits, finite positive spacing, an invertible finite affine, finite values, CT in HU
    (something at or below -500)."""
    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) < 3 or int(np.prod(shape[3:])) != 1 or min(shape[:3]) < 2:
            return f"shape {shape}"
        voxels = int(np.prod(shape))
        if voxels > limits.max_voxels or voxels * img.get_data_dtype().itemsize > limits.max_bytes:
            return "too large"
        zooms = img.header.get_zooms()[:3]
        if not all(np.isfinite(z) and z > 0 for z in zooms):
            return f"spacing {zooms}"
        affine = img.affine
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            return "degenerate affine"
        with np.errstate(all="ignore"):
            data = np.asanyarray(img.dataobj)
        if not np.isfinite(data).all():
            return "non-finite values"
        if float(data.min()) > -500:  # README: not CT in Hounsfield units (no air, no lung)
            return "not HU"
    except Exception as exc:  # nibabel refuses it too
        return f"nibabel: {type(exc).__name__}"
    return None


def test_unreadable_scan_is_reported(tmp_path, checkpoint, monkeypatch):
    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "locked.nii.gz", ct_volume())
    nifti(folder / "open.nii.gz", ct_volume(seed=1))
    real_access = os.access
    # the tests run as root, who can read anything: make one file look unreadable
    monkeypatch.setattr(
        os, "access", lambda p, mode: not str(p).endswith("locked.nii.gz") and real_access(p, mode)
    )
    preds = {
        Path(p.path).name: p
        for p in Classifier.load(checkpoint, device="cpu").predict_many(find_inputs(folder))
    }
    assert preds["locked.nii.gz"].error == "permission denied"
    assert preds["open.nii.gz"].ok
