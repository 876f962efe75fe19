"""The training datasets and caches (app/training/datasets.py): memory, device and disk
caches, the batched augmentation, and steps that read nothing back from the device."""

from __future__ import annotations

import torch
from conftest import TINY, VAL, rows
from ignite.engine import Events

from app.train import main as train_main


def test_device_cache_and_batched_augmentation_path(tiny_data, tmp_path):
    """The GPU path (deterministic prefix cached on the training device, rotation of whole batches
    on the device) exercised on the CPU: it trains, is deterministic, and its cache holds
    preprocessed volumes on the device."""
    from app.config import load_config

    gpu_path = [*TINY, "--cache", "device", "--set", "augment_on_device=true"]
    run, again = tmp_path / "G", tmp_path / "G2"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *gpu_path]) == 0
    assert train_main(["--data", str(tiny_data), "--output", str(again), *gpu_path]) == 0
    assert [r["epoch"] for r in rows(run)] == ["1", "2"]
    assert [[r[k] for k in VAL] for r in rows(again)] == [[r[k] for k in VAL] for r in rows(run)]

    parser = load_config(
        "train.yaml",
        overrides={
            "dataset_dir": str(tiny_data),
            "cache": "device",
            "augment_on_device": True,
            "device": "$torch.device('cpu')",
            "spatial_size": [48, 48, 48],
            "progress": False,
        },
    )
    dataset = parser.get_parsed_content("train#dataset")
    item = dataset[0]["image"]
    assert tuple(item.shape) == (1, 48, 48, 48) and item.device.type == "cpu"
    assert parser.get_parsed_content("train#dataloader").num_workers == 0
    prepare = parser.get_parsed_content("train#prepare_batch")
    assert prepare.augment[0] is parser.get_parsed_content("device_augment")
    assert prepare.augment[1] is parser.get_parsed_content("batch_augment")
    # the cached volume is the eval preprocessing (no rotation cached)
    plain = parser.get_parsed_content("preprocessing")(dict(dataset.data[0]))["image"]
    torch.testing.assert_close(torch.as_tensor(item), torch.as_tensor(plain))


def test_disk_cache_is_reused_by_a_second_run(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    options = [*TINY, "--epochs", "1", "--cache", "disk", "--set", f"cache_dir={cache}"]
    assert train_main(["--data", str(tiny_data), "--output", str(tmp_path / "A"), *options]) == 0
    first = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    assert len([p for p in first if p.endswith(".pt")]) == 16  # every scan cached once
    assert train_main(["--data", str(tiny_data), "--output", str(tmp_path / "B"), *options]) == 0
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == first


def test_cache_key_is_the_same_in_two_processes():
    import subprocess
    import sys

    code = (
        "from app.training.datasets import settings_key; from app.config import load_config; "
        "print(settings_key(load_config('train.yaml').get_parsed_content('train_preprocessing')))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(keys) == 1 and len(keys.pop()) == 12
    from app.config import load_config
    from app.training.datasets import settings_key

    other = load_config("train.yaml", overrides={"spatial_size": [64, 64, 32]})
    base = load_config("train.yaml")
    assert settings_key(other.get_parsed_content("preprocessing")) != settings_key(
        base.get_parsed_content("preprocessing")
    )


def test_device_cache_holds_labels_as_tensors_there(tiny_data):
    """cache: device caches the labels with the images on the device: a step copies nothing
    from host memory (checked on the CPU, where the device is the CPU)."""
    from monai.transforms import Compose, LoadImaged

    from app.data.datalist import discover
    from app.training.datasets import make_dataset

    items = discover(tiny_data)[:3]
    chain = Compose([LoadImaged("image", image_only=True)])
    data = make_dataset(
        items,
        chain,
        cache="device",
        device="cpu",
        keys=["image"],
        label_keys=["label"],
        progress=False,
    )
    for item, source in zip(data, items, strict=True):
        assert isinstance(item["label"], torch.Tensor) and int(item["label"]) == source["label"]
        assert item["label"].device.type == "cpu" and item["image"].device.type == "cpu"


#: ATen ops that make a CUDA host wait for the device: a value read back (``.item()``,
#: ``float(t)``, ``bool(t)``) or an output whose size depends on the data
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")


def test_training_steps_read_nothing_back_from_the_device(tiny_data):
    """The GPU path (cache: device, rotation on the device) run on the CPU with a dispatch mode
    that records every ATen op of steps 2-4: none reads a value back to the host (each would be
    a CUDA synchronisation per step); epoch-level handlers (validation, logs) are outside steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from app.config import load_config

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    parser = load_config(
        "train.yaml",
        overrides={
            "dataset_dir": str(tiny_data),
            "output_dir": str(tiny_data.parent / "sync-run"),
            "cache": "device",
            "augment_on_device": True,
            "flip_prob": 0.5,  # and every augmentation beyond the reference's
            "scale_range": 0.1,
            "contrast_range": 0.2,
            "intensity_shift": 0.05,
            "kernel_range": 0.5,
            "device": "$torch.device('cpu')",
            "spatial_size": [48, 48, 48],
            "filters": [4, 4, 4, 4],
            "epochs": 1,
            "progress": False,
            "is_not_rank0": True,  # no files or logs: the steps alone
        },
    )
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    recorder = Recorder()
    steps: list[list[str]] = []

    def start(engine):
        if engine.state.iteration > 1:  # the first step may build per-device tables
            recorder.ops = []
            recorder.__enter__()

    def stop(engine):
        if engine.state.iteration > 1:
            recorder.__exit__(None, None, None)
            steps.append(recorder.ops)

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)  # after the metrics
    trainer.run()
    assert len(steps) >= 2 and all("convolution" in " ".join(ops) for ops in steps)
    syncing = [op for ops in steps for op in ops if op.split(".")[0] in SYNCING_OPS]
    assert syncing == [], f"ops that read back from the device every step: {sorted(set(syncing))}"
