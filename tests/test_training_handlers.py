"""The training handlers (app/training/handlers): early stopping, checkpoints, the run
recorder and its write budget, with bare Ignite engines and scripted scores or tiny runs."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TINY, rows
from ignite.engine import Engine, Events

from app.train import main as train_main
from app.training.handlers import EarlyStopping
from app.training.run_info import RunInfo


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
