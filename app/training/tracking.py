"""Experiment tracking with MLflow (``app.train --tracking mlflow``).

MONAI's own ``MLFlowHandler``s, added by ``ConfigWorkflow(tracking=...)`` as ``monai.bundle run
--tracking mlflow`` adds them (the trainer's and the validator's, rank 0 only), log the
parameters, the resolved config and each epoch's metrics; :func:`finish` adds what the run
folder holds once training ended: ``metrics.csv``, ``curves.png``, the model card, the kept
checkpoint. The store is ``MLFLOW_TRACKING_URI`` where set, else a SQLite database in the run
folder (``sqlite:///RUN/mlruns.db``: recent MLflow refuses the plain file store) with the
artifacts beside it (``RUN/mlartifacts``). A cross-validation folder keeps one store for its
folds: one MLflow run per fold under a parent run. The run's id is recorded in
``RUN/tracking.json``, so ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from app.errors import ConfigError
from app.run_folder import (
    BEST_MODEL,
    CONFIG_RECORD,
    CURVES,
    METRICS_CSV,
    TRACKING,
    TRACKING_ARTIFACTS,
    TRACKING_DB,
)
from app.runtime.files import atomic_write_text

__all__ = ["EXPERIMENT", "TRACKERS", "Tracking", "finish", "open_parent", "prepare"]

#: what ``--tracking`` accepts
TRACKERS = ("mlflow",)
#: the MLflow experiment every run goes to
EXPERIMENT = "ctclassify"
#: the tracking settings (MONAI's format) in the configs folder
MLFLOW_SETTINGS = "mlflow.json"


class Tracking(dict):  # type: ignore[type-arg]
    """What ``RUN/tracking.json`` records: ``uri``, ``run_name``, ``run_id`` (once known) and
    ``parent_run_id`` (a cross-validation fold)."""


def _sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{(folder / TRACKING_DB).resolve()}"


def store_uri(folder: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or the SQLite store in ``folder``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(folder)


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:  # an optional dependency
        raise ConfigError(
            "--tracking mlflow needs MLflow: pip install mlflow (or the extra: pip install "
            "'ctclassify[tracking]')"
        ) from exc
    return MlflowClient(tracking_uri=uri)


def _experiment(client: Any, uri: str) -> str:
    """The experiment's id, made with its artifacts beside a SQLite store (not in the current
    folder, MLflow's default)."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / TRACKING_ARTIFACTS).as_uri()
    return str(client.create_experiment(EXPERIMENT, artifact_location=location))


def read_tracking(output: Path) -> Tracking | None:
    """``RUN/tracking.json`` read back: a file the app wrote is data once read (edited, copied),
    so only text fields are kept."""
    path = output / TRACKING
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text()[:10_000])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): remove it to track a new run") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping: remove it to track a new run")
    keys = ("uri", "run_name", "run_id", "parent_run_id")
    return Tracking({k: str(data[k]) for k in keys if isinstance(data.get(k), str)})


def prepare(
    output: Path,
    resume: bool,
    config_dir: Path,
    uri: str | None = None,
    parent_run_id: str | None = None,
) -> tuple[dict[str, Any], Tracking]:
    """The ``tracking`` argument of MONAI's ``ConfigWorkflow`` for this run (``configs/mlflow.
    json``, what ``monai.bundle run --tracking configs/mlflow.json`` reads, with this run's
    store and name), and its record.

    A resumed run reuses its recorded store and run: the MLflow run is set running again, so
    MONAI's handlers (which skip finished runs) continue it.
    """
    record = read_tracking(output) if resume else None
    if record is not None:
        _check_store(output, record.get("uri", ""))
    if record is None:
        record = Tracking(uri=uri or store_uri(output), run_name=_run_name(output))
        if parent_run_id:
            record["parent_run_id"] = parent_run_id
    client = _client(record["uri"])
    _experiment(client, record["uri"])
    if record.get("run_id"):
        run = client.get_run(record["run_id"])
        if run.info.status != "RUNNING":
            client.update_run(record["run_id"], status="RUNNING")
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / TRACKING, json.dumps(dict(record), indent=1))
    settings = json.loads((config_dir / MLFLOW_SETTINGS).read_text())
    settings.pop("_comment", None)
    settings["configs"].update(
        tracking_uri=record["uri"], experiment_name=EXPERIMENT, run_name=record["run_name"]
    )
    return settings, record


def _check_store(output: Path, uri: str) -> None:
    """A store recorded in ``RUN/tracking.json`` is only followed when it is the run's own (its
    folder's or its cross-validation folder's SQLite file) or ``MLFLOW_TRACKING_URI``: an edited
    or received run folder cannot send a resumed run's parameters and metrics elsewhere."""
    own = {_sqlite_uri(output), _sqlite_uri(output.parent), os.environ.get("MLFLOW_TRACKING_URI")}
    if uri not in own:
        raise ConfigError(
            f"{output / TRACKING} names the MLflow store {uri[:120]!r}, neither this run's nor "
            "MLFLOW_TRACKING_URI: set MLFLOW_TRACKING_URI to it to continue there, or remove the "
            "file to track a new run"
        )


def _run_name(output: Path) -> str:
    """The MLflow run's name: the run folder's, and its parent's for a fold (unique enough in a
    shared store; the id in tracking.json is what a resume follows)."""
    resolved = output.resolve()
    return f"{resolved.parent.name}/{resolved.name}" if resolved.parent.name else resolved.name


def finish(
    output: Path, card: dict[str, Any] | None = None, params: dict[str, Any] | None = None
) -> str:
    """After training (rank 0): the run's id found and recorded, ``params`` (the run's
    settings) logged where the run has none of that name yet, the run folder's files logged as
    artifacts (the resolved config, the model card as ``model_card.json``), the fold put under
    its parent; the run ended. Returns the run id."""
    record = read_tracking(output)
    if record is None:
        raise ConfigError(f"{output} has no {TRACKING}: it was not tracked")
    client = _client(record["uri"])
    experiment = _experiment(client, record["uri"])
    run_id = record.get("run_id") or _find_run(client, experiment, record["run_name"])
    record["run_id"] = run_id
    atomic_write_text(output / TRACKING, json.dumps(dict(record), indent=1))
    if record.get("parent_run_id"):
        client.set_tag(run_id, "mlflow.parentRunId", record["parent_run_id"])
    if params:
        logged = client.get_run(run_id).data.params
        for key, value in sorted(params.items())[:200]:
            if key not in logged and isinstance(value, (str, int, float, bool, list)):
                client.log_param(run_id, key, str(value)[:500])
    for name in (METRICS_CSV, CURVES, BEST_MODEL, CONFIG_RECORD):
        if (output / name).is_file():
            client.log_artifact(run_id, str(output / name))
    if card is not None:
        client.log_dict(run_id, card, "model_card.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _find_run(client: Any, experiment: str, run_name: str) -> str:
    runs = client.search_runs(
        [experiment], filter_string=f"attributes.run_name = '{_quoted(run_name)}'"
    )
    if not runs:
        raise ConfigError(f"MLflow holds no run named {run_name!r}: was the run tracked?")
    return str(runs[0].info.run_id)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def open_parent(folder: Path, uri: str | None = None) -> Tracking:
    """A cross-validation folder's parent run (made once, recorded in ``FOLDER/tracking.json``,
    reopened by a rerun), in the folder's own store unless ``uri`` says otherwise."""
    record = read_tracking(folder)
    if record is None or not record.get("run_id"):
        record = Tracking(uri=uri or store_uri(folder), run_name=_run_name(folder))
        client = _client(record["uri"])
        run = client.create_run(_experiment(client, record["uri"]), run_name=record["run_name"])
        record["run_id"] = str(run.info.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / TRACKING, json.dumps(dict(record), indent=1))
    return record


def close_parent(folder: Path, files: list[Path]) -> None:
    """The parent run: the folder's summary files logged, the run ended."""
    record = read_tracking(folder)
    if record is None or not record.get("run_id"):
        return
    client = _client(record["uri"])
    for path in files:
        if path.is_file():
            client.log_artifact(record["run_id"], str(path))
    client.set_terminated(record["run_id"], "FINISHED")
