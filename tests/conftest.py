from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CTCLASSIFY_SHARED", REPO.parent / "shared"))
REAL_CT = SHARED / "data" / "real-ct"
REFERENCE = SHARED / "data" / "reference"


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Each test starts with the root logger as the previous one found it: a workflow applies
    configs/logging.conf (an INFO handler on the sys.stdout of its moment, which pytest closes
    after that test), and a later test's INFO lines would end in a logging traceback."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def require_shared(path: Path) -> Path:
    """Return ``path``; skip (outside CI) when the team's shared data is absent, fail in CI."""
    if path.exists():
        return path
    message = (
        f"{path} is missing: the large real-CT and reference files live in the team's ../shared "
        "folder, which a plain clone does not have"
    )
    if in_ci():
        pytest.fail(message + " (CI must have it)")
    pytest.skip(message)


def in_ci() -> bool:
    """CI=true (or 1, yes), as CI services set it; CI=false or an empty value is not CI."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_module(name: str):
    """Import ``name``; skip (outside CI) when it is not installed, fail in CI, where
    ``.ci/run`` installs every test dependency."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = f"{name} is not installed ({exc}); `pip install -e .[dev]` installs it"
        if in_ci():
            pytest.fail(message + " (CI must have it)")
        pytest.skip(message)


@pytest.fixture
def real_ct() -> Path:
    return require_shared(REAL_CT)


@pytest.fixture
def reference_dir() -> Path:
    return require_shared(REFERENCE)


#: run settings of the tiny random-weight checkpoints the inference tests use
TINY_SETTINGS = {
    "spatial_size": [48, 48, 48],
    "hu_window": [-1000, 400],
    "axcodes": "LAS",
    "in_channels": 1,
    "filters": [4, 4, 8, 8],
    "dense_units": 8,
    "dropout": 0.3,
    "bn_eps": 1e-3,
    "bn_momentum": 0.01,
    "threshold": 0.5,
    "class_names": ["normal", "abnormal"],
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as app.train writes it: seeded random weights of a narrow CNN3D + settings."""
    from nets.cnn3d import CNN3D

    torch.manual_seed(0)
    net = CNN3D(filters=TINY_SETTINGS["filters"], dense_units=TINY_SETTINGS["dense_units"])
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pt"
    torch.save({"network": net.state_dict(), "run_info": TINY_SETTINGS}, path)
    return path


def ct_volume(shape=(40, 40, 20), seed=0) -> np.ndarray:
    """A small int16 HU volume: air around a block of tissue-to-lung values."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[5:35, 8:32, :] = rng.integers(-900, 100, size=(30, 24, shape[2]))
    return vol


def nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    """Write ``array`` as NIfTI (LAS, 3 mm slices unless ``affine`` says otherwise)."""
    nib.save(
        nib.Nifti1Image(array, np.diag([-1.0, 1.0, 3.0, 1.0]) if affine is None else affine),
        str(path),
    )
    return path


def synth_dataset(root: Path, per_class: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """Write a generated dataset through the CLI (``python -m app.data synth``) and return it."""
    from app.data.cli import main as data_main

    args = ["synth", str(root), "--per-class", str(per_class), "--shape", *map(str, shape)]
    assert data_main([*args, "--seed", str(seed), "--no-progress", "--workers", "1"]) == 0
    return root


def write_raw_nifti(
    path: Path,
    raw: np.ndarray,
    affine: np.ndarray,
    *,
    version: int = 1,
    endian: str = "<",
    slope: float | None = None,
    inter: float = 0.0,
    xform: str = "both",
) -> Path:
    """Write ``raw`` exactly as stored values, byte by byte: nibabel's own writer rescales and
    picks the byte order itself, which hides the encodings a reader meets in the wild.

    Args:
        version: NIfTI-1 or NIfTI-2 header.
        endian: ``<`` or ``>``, the byte order of the header and the voxels.
        slope, inter: ``scl_slope``/``scl_inter`` (``None``: no scaling).
        xform: ``qform`` (qform code 1 only), ``sform`` (sform code 1 only) or ``both``.
    """
    import gzip

    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    hdr = header_class(endianness=endian)
    hdr.set_data_dtype(raw.dtype.newbyteorder("="))
    hdr.set_data_shape(raw.shape)
    hdr.set_xyzt_units("mm", "sec")
    if xform in ("qform", "both"):
        hdr.set_qform(affine, code=1)
    if xform in ("sform", "both"):
        hdr.set_sform(affine, code=1)
    if xform == "qform":
        hdr.set_sform(None, code=0)
    if xform == "sform":
        hdr.set_qform(None, code=0)
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        hdr.set_zooms((*zooms, *([1.0] * (raw.ndim - 3))))
    if slope is not None:
        hdr.set_slope_inter(slope, inter)
    offset = int(hdr.get_data_offset()) or (352 if version == 1 else 544)
    hdr.set_data_offset(offset)
    body = hdr.binaryblock + b"\0" * (offset - len(hdr.binaryblock))
    body += raw.astype(raw.dtype.newbyteorder(endian)).tobytes(order="F")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(body)
    return path


def config_value(key: str):
    """A setting as the configs define it (plain YAML: common.yaml, then train.yaml)."""
    from app.cli import config_values

    return config_values("common.yaml", "train.yaml")[key]


def eval_chain(**overrides):
    """The evaluation preset with the configs' settings, ``overrides`` on top (e.g. a size)."""
    from transforms.presets import eval_transforms

    settings = {key: config_value(key) for key in ("spatial_size", "hu_window", "axcodes")}
    return eval_transforms(keys=["image"], **{**settings, **overrides})


def train_chain(**overrides):
    """The training preset with the configs' settings, ``overrides`` on top."""
    from transforms.presets import train_transforms

    settings = {key: config_value(key) for key in ("spatial_size", "hu_window", "axcodes")}
    settings["angles_deg"] = config_value("rotation_angles_deg")
    return train_transforms(keys=["image"], **{**settings, **overrides})


@pytest.fixture
def montage_titles(monkeypatch) -> list[str]:
    """The title of every montage ``app.plots.plot_montage`` draws during the test (drawn too)."""
    import app.plots

    titles: list[str] = []
    original = app.plots.plot_montage

    def recording(volume, path, *args, **kwargs):
        titles.append(kwargs.get("title") or "")
        return original(volume, path, *args, **kwargs)

    import app.inference.folder
    import app.training.handlers.run_recorder

    # every module that draws montages, by the name it imported
    for module in (app.plots, app.inference.folder, app.training.handlers.run_recorder):
        if getattr(module, "plot_montage", None) is original:
            monkeypatch.setattr(module, "plot_montage", recording)
    return titles


#: a fast app.train run on ``tiny_data``
TINY = [
    "--epochs",
    "2",
    "--spatial-size",
    "48",
    "48",
    "48",
    "--batch-size",
    "2",
    "--seed",
    "11",
    "--device",
    "cpu",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("data") / "d", 8, (64, 64, 16), seed=3)


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


VAL = ("val_loss", "val_acc", "val_auc", "val_sensitivity", "val_specificity")


def bundle_run_args(scans: Path, output: Path, *extra: str) -> list[str]:
    """``python -m monai.bundle run`` of an exported bundle, as its docs/README.md gives it (run
    inside the bundle folder): one spelling for every test that runs a bundle."""
    return [
        "run",
        "--config_file",
        "configs/inference.yaml",
        "--meta_file",
        "configs/metadata.json",
        "--bundle_root",
        ".",
        "--dataset_dir",
        str(scans),
        "--output_dir",
        str(output),
        *extra,
    ]


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on the loopback interface."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(processes: int = 2) -> list[str]:
    """torchrun with ``processes`` local processes and a new free port (a rendezvous may still
    hold its own)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}"]  # fmt: skip


def stop_server(process: Any) -> None:
    """Stop a server a test started: SIGTERM, then SIGKILL after 15 s."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@pytest.fixture(scope="session")
def generated_model(tmp_path_factory) -> Path:
    """A model trained by app.train on generated scans (as the demo's is), 1 epoch."""
    from app.train import main as train_main

    root = tmp_path_factory.mktemp("gen")
    data = synth_dataset(root / "data", 4, (64, 64, 16), seed=2)
    run = root / "run"
    options = ["--epochs", "1", "--spatial-size", "48", "48", "48", "--device", "cpu"]
    options += ["--set", "filters=[4, 4, 8, 8]", "--set", "dense_units=8", "--no-progress"]
    assert train_main(["--data", str(data), "--output", str(run), *options]) == 0
    return run
