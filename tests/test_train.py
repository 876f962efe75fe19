from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import synth_dataset
from ignite.engine import Engine, Events

from app.train import main as train_main
from app.training.handlers import EarlyStopping
from app.training.run_info import RunInfo

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


def test_train_writes_run_is_deterministic_and_resumes(tiny_data, tmp_path):
    run, again = tmp_path / "R", tmp_path / "R2"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY]) == 0
    first = rows(run)
    assert [r["epoch"] for r in first] == ["1", "2"]
    for name in (
        "best_model.pt",
        "last_checkpoint_epoch=2.pt",
        "curves.png",
        "montage.png",
        "split.json",
        "config.json",
        "environment.json",
        "train.log",
        "metrics.json",
    ):
        assert (run / name).is_file(), name
    assert "Engine run finished" in (run / "train.log").read_text()
    checkpoint = torch.load(run / "last_checkpoint_epoch=2.pt", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "run_info"} <= set(checkpoint)
    assert checkpoint["run_info"]["spatial_size"] == [48, 48, 48]

    assert train_main(["--data", str(tiny_data), "--output", str(again), *TINY]) == 0
    assert [[r[k] for k in VAL] for r in rows(again)] == [[r[k] for k in VAL] for r in first]

    resumed = [a if a != "2" else "3" for a in TINY]
    assert train_main(["--output", str(run), "--resume", *resumed]) == 0
    after = rows(run)
    assert [r["epoch"] for r in after] == ["1", "2", "3"]
    assert after[:2] == first  # the first epochs are kept as they were
    assert sorted(p.name for p in run.glob("last_checkpoint_epoch=*.pt")) == [
        "last_checkpoint_epoch=3.pt"
    ]
    trainer = torch.load(run / "last_checkpoint_epoch=3.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] == 3 * trainer["epoch_length"]


def test_existing_run_folder_is_not_overwritten(tiny_data, tmp_path, capsys):
    run = tmp_path / "R"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "x"
    assert train_main(["--output", str(tmp_path / "none"), "--resume", *TINY]) == 2


def test_missing_data_says_what_to_run(tmp_path, capsys):
    code = train_main(
        ["--data", str(tmp_path / "MosMedData"), "--output", str(tmp_path / "R"), *TINY]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "python -m app.data download" in err and "--demo" in err


def scripted_trainer(scores: list[float], patience: int) -> tuple[Engine, EarlyStopping]:
    evaluator = Engine(lambda e, b: None)
    trainer = Engine(lambda e, b: None)
    stopper = EarlyStopping(patience=patience, evaluator=evaluator, metric_name="val_acc")

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        evaluator.state.metrics = {"val_acc": scores[engine.state.epoch - 1]}

    stopper.attach(trainer)
    return trainer, stopper


@pytest.mark.parametrize(
    ("scores", "patience", "stopped_at"),
    [
        pytest.param([0.5, 0.6, 0.6, 0.6, 0.6, 0.9, 0.9], 3, 5, id="stops-after-patience"),
        pytest.param([0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8], 3, 7, id="improvements-reset"),
        pytest.param([0.5] * 7, 1, 2, id="patience-1"),
    ],
)
def test_early_stopping_with_scripted_scores(scores, patience, stopped_at):
    trainer, _ = scripted_trainer(scores, patience)
    trainer.run([0], max_epochs=len(scores))
    assert trainer.state.epoch == stopped_at


def test_early_stopping_state_travels_with_the_trainer():
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    trainer, _ = scripted_trainer(scores, 3)
    trainer.run([0], max_epochs=3)  # counter 1 after epoch 3
    state = trainer.state_dict()
    assert state["early_stopping"] == {"counter": 1, "best_score": 0.6}
    resumed, _ = scripted_trainer(scores, 3)
    resumed.load_state_dict(state)
    resumed.run([0], max_epochs=6)
    assert resumed.state.epoch == 5  # stops where the uninterrupted run stops


def test_best_checkpoint_is_the_first_best_val_acc(tmp_path):
    """The configured best-model saver keeps the first best val accuracy (Keras save-best-only)."""
    from app.config import load_config
    from app.training.handlers import AtomicCheckpointSaver as CheckpointSaver

    handlers = load_config("train.yaml").get("validate#handlers")
    entry = next(
        h for h in handlers if h["_target_"] == "app.training.handlers.AtomicCheckpointSaver"
    )
    options = {
        k: v
        for k, v in entry.items()
        if k not in ("_target_", "_disabled_", "save_dir", "save_dict")
    }
    net = torch.nn.Linear(1, 1)
    scores = [0.5, 0.7, 0.6, 0.7, 0.65]
    evaluator = Engine(lambda e, b: None)
    evaluator.state.key_metric_name = "val_acc"

    @evaluator.on(Events.EPOCH_COMPLETED)
    def score(engine):
        engine.state.metrics = {"val_acc": scores[engine.state.epoch - 1]}
        torch.nn.init.constant_(net.weight, engine.state.epoch)

    save_dict = {"network": net, "run_info": RunInfo({"spatial_size": [48, 48, 48]})}
    CheckpointSaver(save_dir=str(tmp_path), save_dict=save_dict, **options).attach(evaluator)
    evaluator.run([0], max_epochs=len(scores))
    saved = torch.load(tmp_path / options["key_metric_filename"], weights_only=True)
    assert float(saved["network"]["weight"]) == 2.0  # epoch 2: first 0.7; epoch 4 only ties
    assert saved["checkpointer"]["_saved"][0][0] == pytest.approx(0.7)


@pytest.mark.slow
def test_two_process_gloo_training(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP, distributed sampler, reduced metrics, rank-0 files."""
    import os
    import socket
    import subprocess
    import sys

    def torchrun() -> list[str]:
        """torchrun with 2 processes and a new free port (a rendezvous may still hold its own)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
        ]

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


def test_checkpoints_are_never_left_half_written(tmp_path, monkeypatch):
    """A process that dies while saving leaves the previous checkpoint and no truncated file
    (MONAI's own CheckpointSaver writes straight into the final file)."""
    from app.training.handlers import AtomicCheckpointSaver

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"network": net, "run_info": RunInfo({"a": 1})},
        file_prefix="last",
        save_interval=1,
        epoch_level=True,
        n_saved=None,
    ).attach(engine)
    real_save, calls = torch.save, []

    def dies_while_saving(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise KeyboardInterrupt  # the process is gone mid-write

    monkeypatch.setattr(torch, "save", dies_while_saving)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint_epoch=1.pt"]
    assert set(torch.load(tmp_path / "last_checkpoint_epoch=1.pt", weights_only=True)) == {
        "network",
        "run_info",
    }


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing(tiny_data, tmp_path, capsys):
    run = tmp_path / "R"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert train_main(["--output", str(run), "--resume", *TINY]) == 0
    assert "already finished" in capsys.readouterr().out
    assert snapshot(run) == before  # metrics.csv, checkpoints, config: byte-identical
    # the same without repeating --epochs: the run's own setting is the target
    assert train_main(["--output", str(run), "--resume", "--no-progress"]) == 0
    assert snapshot(run) == before


def test_resume_of_an_early_stopped_run_changes_nothing(tiny_data, tmp_path, capsys):
    run = tmp_path / "R"
    options = [a if a != "2" else "6" for a in TINY]
    assert (
        train_main(["--data", str(tiny_data), "--output", str(run), *options, "--patience", "1"])
        == 0
    )
    epochs = len(rows(run))
    assert epochs < 6, "the scripted data should stop early at patience 1"
    before = snapshot(run)
    assert train_main(["--output", str(run), "--resume", *options, "--patience", "1"]) == 0
    assert "early stopping" in capsys.readouterr().out
    assert snapshot(run) == before


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


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"thesis.docx": "my work"}, id="foreign-files"),
        pytest.param({"overrides.json": "{}", "notes.txt": "keep"}, id="run-plus-foreign-file"),
    ],
)
def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_data, tmp_path, capsys, content):
    run = tmp_path / "R"
    run.mkdir()
    for name, text in content.items():
        (run / name).write_text(text)
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--overwrite"]) == 2
    assert "does not look like a run folder" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in run.iterdir()} == content


def test_overwrite_replaces_a_run_and_refuses_a_file_or_link(tiny_data, tmp_path, capsys):
    run = tmp_path / "R"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--epochs", "1"]) == 0
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--overwrite"]) == 0
    assert [r["epoch"] for r in rows(run)] == ["1", "2"]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "overrides.json").write_text("{}")
    (tmp_path / "link").symlink_to(victim)
    assert (
        train_main(
            ["--data", str(tiny_data), "--output", str(tmp_path / "link"), *TINY, "--overwrite"]
        )
        == 2
    )
    assert (victim / "overrides.json").exists()
    (tmp_path / "file").write_text("x")
    assert train_main(["--data", str(tiny_data), "--output", str(tmp_path / "file"), *TINY]) == 2
    assert (tmp_path / "file").read_text() == "x"


def test_checkpoint_records_its_training_data(tiny_data, tmp_path):
    run = tmp_path / "R"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--epochs", "1"]) == 0
    info = torch.load(run / "best_model.pt", weights_only=True)["run_info"]["training_data"]
    split = json.loads((run / "split.json").read_text())
    labels = [d["label"] for d in split["training"]]
    assert info["generated"] is True and info["scans"] == len(labels)
    assert info["class_counts"] == [labels.count(0), labels.count(1)]
    assert info["shape_min"] == info["shape_max"] == [64, 64, 16]
    assert info["source"] == str(tiny_data)


def test_resume_never_evaluates_text_from_the_run_folder(tiny_data, tmp_path, capsys):
    run = tmp_path / "R"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--epochs", "1"]) == 0
    marker = tmp_path / "pwned"
    saved = json.loads((run / "overrides.json").read_text())
    saved["dropout"] = f"$__import__('pathlib').Path({str(marker)!r}).touch() or 0.3"
    (run / "overrides.json").write_text(json.dumps(saved))
    before = snapshot(run)
    assert train_main(["--output", str(run), "--resume", *TINY]) == 2
    assert "never evaluated from a file" in capsys.readouterr().err
    assert not marker.exists() and snapshot(run) == before


def test_metrics_csv_columns_are_the_configs_metric_names(tiny_data, tmp_path):
    """Metric names are written once, in train.yaml: metrics.csv takes its columns from there."""
    from app.cli import config_values

    config = config_values("common.yaml", "train.yaml")
    names = [
        *config["train"]["key_metric"],
        *config["train"]["additional_metrics"],
        *config["validate"]["key_metric"],
        *config["validate"]["additional_metrics"],
    ]
    run = tmp_path / "R"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--epochs", "1"]) == 0
    with (run / "metrics.csv").open() as f:
        header = next(csv.reader(f))
    assert header == ["epoch", *names, "lr", "seconds"]


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
    from ignite.engine import Events
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


def test_write_budget_spends_its_share_and_writers_agree():
    """Fast epochs (0.5 s) with writes as slow as an epoch: the records are written every few
    epochs, within 10% of the time, both writers in the same epochs, the final epoch always."""
    from app.training.handlers import WriteBudget

    now = [0.0]
    budget = WriteBudget(0.1, clock=lambda: now[0])
    written, writing = [], 0.0
    for epoch in range(1, 101):
        now[0] += 0.5  # the epoch
        final = epoch == 100
        for _writer in ("records", "checkpoint"):
            if budget.due(epoch, final=final):
                with budget.timed():
                    now[0] += 0.25
                    writing += 0.25
                if _writer == "records":
                    written.append(epoch)
        assert budget.due(epoch) == (written[-1] == epoch)  # asked again: the same answer
    assert written[0] == 1 and written[-1] == 100
    assert 5 <= len(written) <= 15, written
    assert writing / now[0] <= 0.1
    every = WriteBudget(1.0, clock=lambda: now[0])
    assert all(every.due(e) for e in range(1, 20))
    with pytest.raises(ValueError, match="above 0"):
        WriteBudget(0)


def test_fast_epochs_are_written_within_the_budget(tiny_data, tmp_path, monkeypatch):
    """With a budget far below what writing costs, only the first and the final epoch are
    written, and the files still hold every epoch; checkpoint and metrics agree."""
    from app.run_folder import latest_checkpoint
    from app.training.handlers import RunRecorder

    writes: list[int] = []
    original = RunRecorder.write

    def counting(self):
        writes.append(self.rows[-1]["epoch"])
        original(self)

    monkeypatch.setattr(RunRecorder, "write", counting)
    run = tmp_path / "run"
    args = [*TINY, "--epochs", "4", "--set", "write_budget=0.0001"]
    assert train_main(["--data", str(tiny_data), "--output", str(run), *args]) == 0
    assert writes == [1, 4]
    assert [r["epoch"] for r in rows(run)] == ["1", "2", "3", "4"]
    assert latest_checkpoint(run).name == "last_checkpoint_epoch=4.pt"


def test_end_of_run_summary_leads_with_the_kept_model(tiny_data, tmp_path, capsys):
    """The last lines name the model best_model.pt holds (the first best validation accuracy)
    with its epoch and validation figures, not the last epoch's."""
    run = tmp_path / "run"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--epochs", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = rows(run)
    best = max(table, key=lambda r: (float(r["val_acc"]), -int(r["epoch"])))
    assert out[-2].startswith(f"kept model: {run / 'best_model.pt'} (epoch {best['epoch']}:")
    assert f"accuracy {float(best['val_acc']):.3f}" in out[-2]
    assert out[-1].startswith(f"run folder: {run} (3 epochs")


def test_recipe_is_read_after_train_yaml_and_kept_on_resume(
    tiny_data, tmp_path, capfd, caplog, montage_titles
):
    """--recipe small-data trains with configs/recipes/small-data.yaml on top (the demo's
    recipe); a resume keeps it; a recipe name from the run folder is data: an unknown one is
    refused, never read as a path."""
    from app.training.workflow import recipe_file, recipes

    assert "small-data" in recipes() and recipe_file("small-data") == "recipes/small-data.yaml"
    run = tmp_path / "run"
    small = ["--epochs", "1", "--device", "cpu", "--no-progress", "--set", "filters=[4, 4, 4, 4]"]
    small += ["--init", ""]  # the recipe's pretrained weights fit its own widths only
    args = ["--data", str(tiny_data), "--output", str(run), "--recipe", "small-data", *small]
    assert train_main(args) == 0
    first = json.loads((run / "split.json").read_text())["training"][0]
    name, label = Path(first["image"]).name, ["normal", "abnormal"][int(first["label"])]
    assert montage_titles == [f"one preprocessed training scan: {name}, {label}"], montage_titles
    printed = "".join(capfd.readouterr()) + (run / "train.log").read_text() + caplog.text
    assert "Not all config files" not in printed  # MONAI's warning for recipes/: understood
    saved = json.loads((run / "overrides.json").read_text())
    assert saved["__recipe__"] == "small-data"
    info = torch.load(run / "best_model.pt", weights_only=True)["run_info"]
    assert info["spatial_size"] == [64, 64, 48] and info["dense_units"] == 256  # the recipe's
    assert (
        train_main(
            ["--output", str(run), "--resume", "--epochs", "2", "--device", "cpu", "--no-progress"]
        )
        == 0
    )
    info = torch.load(run / "best_model.pt", weights_only=True)["run_info"]
    assert info["spatial_size"] == [64, 64, 48]
    saved["__recipe__"] = "../../etc/passwd"
    (run / "overrides.json").write_text(json.dumps(saved))
    assert (
        train_main(
            ["--output", str(run), "--resume", "--epochs", "3", "--device", "cpu", "--no-progress"]
        )
        == 2
    )
    with pytest.raises(SystemExit):  # argparse: not one of the recipes
        train_main(["--data", str(tiny_data), "--output", str(tmp_path / "x"), "--recipe", "huge"])


def test_learning_rate_schedules():
    """step: the reference's staircase decay, as StepLR; cosine: from the rate to 0 over the
    run's steps; anything else is refused."""
    from app.training.schedules import make_lr_scheduler

    def rates(schedule, steps, **kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make_lr_scheduler(opt, schedule, step_size=3, gamma=0.5, total_steps=steps, **kw)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, opt.param_groups[0]["lr"]

    step, _ = rates("step", 7)
    assert step == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    cosine, last = rates("cosine", 10)
    assert cosine[0] == pytest.approx(0.1) and last == pytest.approx(0.0, abs=1e-12)
    assert cosine[5] == pytest.approx(0.05)  # half way: half the rate
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        rates("linear", 3)


def test_train_config_builds_the_recipe_options(tiny_data):
    """The recipe's knobs reach the objects: cosine over epochs x batches, the batch
    augmentation in prepare_batch and reseeded each epoch, GroupNorm in the network and in the
    checkpoint's settings."""
    from app.config import load_config
    from app.training.handlers.epoch_seeder import EpochSeeder

    parser = load_config(
        "train.yaml",
        overrides={
            "dataset_dir": str(tiny_data),
            "output_dir": str(tiny_data.parent / "knobs"),
            "device": "$torch.device('cpu')",
            "spatial_size": [48, 48, 48],
            "filters": [4, 4, 8, 8],
            "epochs": 5,
            "batch_size": 2,
            "lr_schedule": "cosine",
            "flip_prob": 0.5,
            "contrast_range": 0.2,
            "norm": "group",
        },
    )
    scheduler = parser.get_parsed_content("lr_scheduler")
    batches = len(parser.get_parsed_content("train#dataloader"))
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler.T_max == 5 * batches
    augment = parser.get_parsed_content("batch_augment")
    assert augment.flip_prob == 0.5 and augment.contrast == 0.2 and augment.scale == 0.0
    assert augment in parser.get_parsed_content("train#prepare_batch").augment
    seeder = next(
        h for h in parser.get_parsed_content("train#handlers") if isinstance(h, EpochSeeder)
    )
    assert augment in seeder.transform
    network = parser.get_parsed_content("network_def")
    assert isinstance(network.features[0].bn, torch.nn.GroupNorm)
    assert parser.get_parsed_content("run_info").settings["norm"] == "group"
