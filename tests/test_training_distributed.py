"""Distributed training (app/training/distributed.py): two processes over gloo."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, rows, torchrun


@pytest.mark.slow
def test_two_process_gloo_training(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP, distributed sampler, reduced metrics, rank-0 files."""
    import os
    import subprocess

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        *torchrun(),
        "-m",
        "app.train",
        "--data",
        str(tiny_data),
        "--output",
        str(run),
        *TINY,
        "--set",
        "filters=[4, 4, 8, 8]",
        "--set",
        "dense_units=8",
    ]  # TINY's --device cpu: gloo, also where CUDA exists
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in rows(run)] == ["1", "2"]
    # each rank caches only its share of the data: 12 training and 4 validation scans in all
    output = proc.stdout + proc.stderr
    assert "rank 0 of 2 holds 6 training and 2 validation scans" in output, output[-3000:]
    assert "rank 1 of 2 holds 6 training and 2 validation scans" in output
    # only rank 0 writes: one TensorBoard writer per engine, all from one process
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2 and len({p.name.split(".")[-2] for p in events}) == 1, events
    config = json.loads((run / "config.json").read_text())
    assert "DistributedDataParallel" in json.dumps(config["network"])
    checkpoint = torch.load(run / "last_checkpoint_epoch=2.pt", weights_only=True)
    # saved unwrapped (no DDP "module." prefix), so single-process inference loads it
    assert all(not k.startswith("module.") for k in checkpoint["network"])

    # config-native: monai.bundle run joins the process group from multi_gpu_train.yaml itself
    from app.config import config_files

    bundle_run = tmp_path / "bundle_ddp"
    files = (
        "[" + ",".join(repr(f) for f in config_files("train.yaml", "multi_gpu_train.yaml")) + "]"
    )
    cmd = [
        *torchrun(),
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        files,
        "--dataset_dir",
        str(tiny_data),
        "--output_dir",
        str(bundle_run),
        "--epochs",
        "1",
        "--spatial_size",
        "[48, 48, 48]",
        "--filters",
        "[4, 4, 8, 8]",
        "--dense_units",
        "8",
        "--progress",
        "false",
        "--device",
        "$torch.device('cpu')",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["epoch"] for r in rows(bundle_run)] == ["1"]
    assert len(list((bundle_run / "tensorboard").glob("events.out.tfevents.*"))) == 2
