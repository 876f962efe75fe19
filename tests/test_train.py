from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, VAL, rows

from app.train import main as train_main


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

    resumed = list(TINY)
    resumed[resumed.index("--epochs") + 1] = "3"  # more epochs; every recorded setting kept
    assert train_main(["--output", str(run), "--resume", *resumed]) == 0
    # another batch size would make checkpoints that describe another run: refused (issue 31)
    batch = resumed.index("--batch-size") + 1
    assert (
        train_main(["--output", str(run), "--resume", *resumed[:batch], "3", *resumed[batch + 1 :]])
        == 2
    )
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


def test_end_of_run_summary_leads_with_the_kept_model(tiny_data, tmp_path, capsys):
    """The last lines name the model best_model.pt holds (the first best validation accuracy)
    with its epoch and validation figures, not the last epoch's."""
    run = tmp_path / "run"
    assert train_main(["--data", str(tiny_data), "--output", str(run), *TINY, "--epochs", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = rows(run)
    best = max(table, key=lambda r: (float(r["val_acc"]), -int(r["epoch"])))
    assert out[-3].startswith(f"kept model: {run / 'best_model.pt'} (epoch {best['epoch']}:")
    assert f"accuracy {float(best['val_acc']):.3f}" in out[-3]
    assert out[-2].startswith("threshold 0.5 (none: the validation split holds")  # too few
    assert out[-1].startswith(f"run folder: {run} (3 epochs")


def test_recipe_is_read_after_train_yaml_and_kept_on_resume(
    tiny_data, tmp_path, capfd, caplog, montage_titles
):
    """--recipe small-data trains with configs/recipes/small-data.yaml on top (the demo's
    recipe); a resume keeps it; a recipe name from the run folder is data: an unknown one is
    refused, never read as a path."""
    from app.training.recipes import recipe_file, recipes

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
