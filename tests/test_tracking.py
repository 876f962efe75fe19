"""Experiment tracking (issue 34): ``app.train --tracking mlflow`` read back with MLflow's own
client from the SQLite store in the run folder: parameters, per-epoch metrics equal to
metrics.csv, the artifacts; a resumed run continues the same MLflow run; cross-validation puts
one run per fold under a parent run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import synth_dataset

pytest.importorskip("mlflow", reason="MLflow is the tracking extra (pip install mlflow)")

TINY = ["--spatial-size", "48", "48", "48", "--set", "filters=[4, 4, 8, 8]", "--set",
        "dense_units=8", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("trk") / "data", 6, (48, 48, 16), seed=5)


def _client(folder: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlruns.db').resolve()}")


def _runs(folder: Path):
    client = _client(folder)
    experiment = client.get_experiment_by_name("ctclassify")
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id])


def _metrics_csv(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_tracked_run_reads_back_as_the_run_folder_and_a_resume_continues_it(
    data, tmp_path, monkeypatch
):
    from app.train import main as train_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = ["--data", str(data), "--output", str(run), *TINY, "--tracking", "mlflow"]
    assert train_main([*args, "--epochs", "1"]) == 0
    client, runs = _runs(run)
    assert len(runs) == 1
    first = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(first)}
    assert {"metrics.csv", "curves.png", "best_model.pt", "model_card.json", "config.json"} <= (
        artifacts
    )
    params = client.get_run(first).data.params  # the run's settings, beside MONAI's own
    assert params["filters"] == "[4, 4, 8, 8]" and params["spatial_size"] == "[48, 48, 48]"
    card = client.download_artifacts(first, "model_card.json", str(tmp_path))
    assert '"sha256"' in Path(card).read_text()
    # the resume: the same MLflow run, its epochs continued
    assert train_main(["--data", str(data), "--output", str(run), *TINY, "--epochs", "2",
                       "--resume"]) == 0  # fmt: skip
    client, runs = _runs(run)
    assert [r.info.run_id for r in runs] == [first]
    rows = _metrics_csv(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for name in ("val_acc", "val_auc", "train_loss"):
        history = {m.step: m.value for m in client.get_metric_history(first, name)}
        for row in rows:
            assert history[int(row["epoch"])] == pytest.approx(float(row[name]), abs=1e-6), name
    assert runs[0].data.params  # the parameters MONAI's handler logs (epochs, optimizer...)


def test_cross_validation_is_one_run_per_fold_under_a_parent(data, tmp_path, monkeypatch):
    from app.train import main as train_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "cv"
    args = ["--data", str(data), "--output", str(out), "--folds", "2", "--epochs", "1", *TINY,
            "--tracking", "mlflow"]  # fmt: skip
    assert train_main(args) == 0
    client, runs = _runs(out)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert "cv_summary.json" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert not (out / "fold-0" / "mlruns.db").exists()  # the folder's one store


def test_an_unknown_tracker_is_refused(data, tmp_path, capsys):
    from app.training.workflow import train

    with pytest.raises(Exception, match="--tracking must be one of"):
        train(data, tmp_path / "r", tracking="wandb", overrides={"epochs": 1})


def test_the_repository_bundle_tracks_with_monai_bundle_run(data, tmp_path, monkeypatch):
    """``python -m monai.bundle run ... --tracking configs/mlflow.json`` on the repository's
    configs (the bundle's own way, the settings app.train uses): MONAI's handlers log the
    epochs to OUTPUT/mlruns.db, read back here."""
    import os
    import subprocess
    import sys

    from app.config import CONFIG_DIR

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    files = f"['{CONFIG_DIR / 'common.yaml'}','{CONFIG_DIR / 'train.yaml'}']"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files,
            "--meta_file", str(CONFIG_DIR / "metadata.json"),
            "--tracking", str(CONFIG_DIR / "mlflow.json"),
            "--dataset_dir", str(data), "--output_dir", str(out), "--epochs", "1",
            "--spatial_size", "[48, 48, 48]", "--filters", "[4, 4, 8, 8]", "--dense_units", "8",
            "--device", "$torch.device('cpu')", "--progress", "False"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(CONFIG_DIR.parent)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val_acc")
    assert [m.step for m in history] == [1]
    with (out / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert history[0].value == pytest.approx(float(row["val_acc"]), abs=1e-6)


def test_a_run_folder_cannot_send_a_resume_to_another_store(data, tmp_path, monkeypatch):
    """tracking.json is read back: one edited to name a remote store makes --resume refuse (one
    line, exit 2) before any traffic, unless MLFLOW_TRACKING_URI says that store."""
    import json

    from app.train import main as train_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    args = ["--data", str(data), "--output", str(run), *TINY]
    assert train_main([*args, "--epochs", "1", "--tracking", "mlflow"]) == 0
    record = json.loads((run / "tracking.json").read_text())
    record["uri"] = "http://127.0.0.1:9"  # elsewhere (on loopback: this test sends nothing out)
    (run / "tracking.json").write_text(json.dumps(record))
    assert train_main([*args, "--epochs", "2", "--resume"]) == 2
