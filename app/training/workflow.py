"""The training workflow: build MONAI's Ignite engines from the bundle configs and run them.

``python -m app.train`` (``app/train.py``) is its command line; :func:`train` its Python entry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite
import monai
import numpy
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, ConfigWorkflow

from app.config import CONFIG_DIR, METADATA, SEVERITY_CONFIG, TASKS, config_files, load_config
from app.data.datalist import find_items
from app.errors import EXIT_INTERRUPTED, ConfigError, CTClassifyError, DataError
from app.inference.checkpoints import CheckpointError, load_checkpoint
from app.inference.model_card import ModelCard
from app.model_settings import SettingsError, validate_settings
from app.run_folder import (
    BEST_MODEL,
    CONFIG_RECORD,
    ENVIRONMENT,
    FINISHED,
    METRICS_CSV,
    OVERRIDES,
    TRAIN_LOG,
    kept_row,
    last_checkpoints,
    latest_checkpoint,
    mark_finished,
    read_metrics,
    validation_figures,
)
from app.runtime.files import atomic_write_text
from app.training.distributed import (
    init_process_group,
    launched_distributed,
    leave_process_group,
    rank,
)
from app.training.recipes import (
    DEMO_CONFIG,
    DEMO_RECIPE,
    RECIPES_DIR,
    demo_dataset,
    recipe_file,
)
from app.training.resume_guard import (
    check_recorded_settings,
    check_recorded_split,
    finished_reason,
    prepare_run_dir,
    read_saved_overrides,
)
from app.training.settings import check_combination, check_settings


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder and one metrics row per epoch."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    best_checkpoint: Path | None
    #: set when ``resume`` found the run already finished (nothing was run or written): why
    already_finished: str | None = None

    @property
    def best_val_acc(self) -> float | None:
        values = [r["val_acc"] for r in self.metrics if r.get("val_acc") is not None]
        return max(values) if values else None

    def summary_lines(self) -> list[str]:
        """What the end of a run prints: the kept model and its validation figures (optimistic,
        and said so), its threshold line, the run folder."""
        if self.already_finished:
            return [
                f"{self.run_dir} is already finished: {self.already_finished}. Nothing changed."
            ]
        lines = []
        kept = kept_row(self.metrics)
        if kept is not None:
            lines.append(
                f"kept model: {self.best_checkpoint} (epoch {kept['epoch']}: validation "
                f"{validation_figures(kept)}; the epoch was chosen on this validation split, so "
                "these figures are optimistic: measure the model on new scans with python -m "
                "app.evaluate)"
            )
        point = _operating_point_line(self.run_dir)
        if point:
            lines.append(point)
        lines.append(
            f"run folder: {self.run_dir} ({len(self.metrics)} epochs; metrics.csv, curves.png)"
        )
        return lines


def _operating_point_line(run: Path) -> str | None:
    """The kept model's threshold line, as app.infer's model card prints it."""
    try:
        settings = validate_settings(load_checkpoint(run / BEST_MODEL)[1], str(run / BEST_MODEL))
    except (CheckpointError, SettingsError, OSError):
        return None
    if "operating_point" not in settings:
        return None
    return ModelCard(settings, run / BEST_MODEL, settings["threshold"], []).threshold_line()


def _environment(device: str) -> dict[str, Any]:

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "pytorch-ignite": ignite.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    return handler


def train(
    data: str | Path | None = None,
    output: str | Path | None = None,
    *,
    demo: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
    config_dir: str | Path = CONFIG_DIR,
    recipe: str | None = None,
    operating_point: bool = True,
    tracking: str | None = None,
    tracking_parent: str | None = None,
    task: str | None = None,
) -> TrainResult:
    """Train from the bundle configs; the Python entry behind ``python -m app.train``.

    Args:
        data: class-folder root or datalist (default: the config's ``dataset_dir``).
        output: run folder (default ``runs/run-<date>-<time>``).
        demo: train on the generated demo data with the small-data recipe
            (``configs/recipes/small-data.yaml``, then ``configs/demo.yaml``).
        resume: continue the run in ``output`` from its last checkpoint; the run's own settings
            are reused, ``overrides`` (e.g. a larger ``epochs``) apply on top.
        overwrite: replace an existing ``output``.
        overrides: config id -> value, e.g. ``{"epochs": 5, "spatial_size": [48, 48, 48]}``.
        config_dir: folder of the bundle configs.
        recipe: a named recipe, ``configs/recipes/NAME.yaml``, read after train.yaml (a resumed
            run keeps its own).
        operating_point: choose the kept model's temperature and threshold on its validation
            split and record them in its checkpoint (``app.training.operating_point``; a
            cross-validation fold leaves it to the folder's out-of-fold choice).
        tracking: ``"mlflow"``: log the run to MLflow (``app.training.tracking``); a tracked
            run resumed stays tracked, in the same MLflow run.
        tracking_parent: the MLflow run id a cross-validation fold goes under.
        task: ``binary`` (the default) or ``severity`` (``configs/severity.yaml`` after the recipe).

    Example:
        >>> result = train("data/synth", "runs/try", overrides={"epochs": 2})  # doctest: +SKIP
        >>> result.metrics[-1]["val_auc"]  # doctest: +SKIP
    """

    config_dir = Path(config_dir)
    overrides = check_settings(overrides or {}, "app.train")  # before anything is made
    if "progress" not in overrides and not sys.stderr.isatty():
        overrides["progress"] = False  # a log or a notebook gets no redrawn bars (as app.train)
    output = _output_folder(output)
    common: dict[str, Any] = {"demo": demo, "resume": resume, "config_dir": config_dir}
    _prepare(output, overwrite=overwrite, overrides=overrides, task=task, **common)
    names, settings = _run_settings(
        output, data, overrides=overrides, recipe=recipe, task=task, **common
    )
    _check_combination(names, settings, config_dir)
    if resume:
        check_recorded_split(output, names, settings, config_dir)
        check_recorded_settings(output, names, settings, config_dir)
        done = finished_reason(output, settings, names, config_dir)
        if done:
            if rank() == 0 and not (output / FINISHED).exists():
                mark_finished(output, _checkpoint_epoch(output) or 0, done)
            return _result(output, already_finished=done)
    _check_data(settings, names, config_dir)
    _record_settings(output, settings, names)
    if rank() == 0:
        (output / FINISHED).unlink(missing_ok=True)
    tracked = _tracking(output, tracking, tracking_parent, resume, config_dir)
    _run_workflow(output, names, settings, resume=resume, config_dir=config_dir, tracked=tracked)
    if rank() == 0:
        _after_training(output, operating_point, tracked is not None)
    return _result(output)


def _after_training(output: Path, operating_point: bool, tracked: bool) -> None:
    """Rank 0, once training ended: the operating point, the finished mark, the tracking's
    artifacts."""
    if operating_point and (output / BEST_MODEL).is_file():
        from app.training.operating_point import record_operating_point

        record_operating_point(output)
    mark_finished(output, _checkpoint_epoch(output) or 0, "training ended")
    if tracked:
        _finish_tracking(output)


def _tracking(
    output: Path, tracking: str | None, parent: str | None, resume: bool, config_dir: Path
) -> dict[str, Any] | None:
    """MONAI's tracking settings for this run (None: not tracked); a resumed tracked run stays
    tracked. Only rank 0 logs (MONAI's handlers are disabled on the others)."""
    from app.run_folder import TRACKING
    from app.training import tracking as mlflow_tracking

    if tracking not in (None, "", *mlflow_tracking.TRACKERS):
        raise ConfigError(f"--tracking must be one of {', '.join(mlflow_tracking.TRACKERS)}")
    if not tracking and not (resume and (output / TRACKING).is_file()):
        return None
    uri = None
    if parent:
        record = mlflow_tracking.read_tracking(output.parent)
        uri = None if record is None else record.get("uri")
    settings, _ = mlflow_tracking.prepare(output, resume, config_dir, uri, parent)
    return settings


def _finish_tracking(output: Path) -> None:
    from app.inference.classifier import Classifier
    from app.training import tracking as mlflow_tracking

    if not (output / BEST_MODEL).is_file():
        mlflow_tracking.finish(output)
        return
    clf = Classifier.load(output, device="cpu")
    mlflow_tracking.finish(output, clf.card_json(), params=clf.settings)


def _checkpoint_epoch(output: Path) -> int | None:
    """The epoch of the run's newest resumable checkpoint."""

    found = last_checkpoints(output)
    return max(found)[0] if found else None


def _check_combination(names: list[str], settings: dict[str, Any], config_dir: Path) -> None:
    """The run's settings that depend on each other (:func:`app.training.settings.check_combination`)."""

    parser = load_config(*names, overrides=settings, config_dir=config_dir)
    check_combination(
        {
            k: parser.get_parsed_content(k)
            for k in ("filters", "spatial_size", "folds", "fold", "grades", "class_names")
        }
    )


def _output_folder(output: str | Path | None) -> Path:

    if output is None and launched_distributed():
        raise ConfigError("multi-process training needs --output (every rank must use the same)")
    return Path(output) if output else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")


def _prepare(
    output: Path,
    *,
    resume: bool,
    overwrite: bool,
    demo: bool,
    overrides: dict[str, Any],
    config_dir: Path,
    task: str | None = None,
) -> None:
    """Join the process group (under torchrun), check the run folder and make the demo data
    (``task`` severity: the graded demo data), on rank 0 while the other ranks wait."""

    if launched_distributed():
        init_process_group(config_dir, overrides.get("device"))
    if rank() == 0:
        prepare_run_dir(output, resume, overwrite)
        if demo:
            progress = bool(overrides.get("progress", True))
            demo_dataset(config_dir, progress=progress, severity=task == "severity")
    if launched_distributed():
        torch.distributed.barrier()


def _run_settings(
    output: Path,
    data: str | Path | None,
    *,
    demo: bool,
    resume: bool,
    overrides: dict[str, Any],
    config_dir: Path,
    recipe: str | None = None,
    task: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """The config files to read and the overrides on top: a resumed run's own, then the data,
    then this call's ``overrides``."""

    settings: dict[str, Any] = {}
    if resume and (output / OVERRIDES).exists():
        settings.update(read_saved_overrides(output / OVERRIDES, overrides, config_dir))
    demo = demo or bool(settings.pop("__demo__", False))
    recipe = recipe or settings.pop("__recipe__", None) or (DEMO_RECIPE if demo else None)
    task = task or settings.pop("__task__", None) or TASKS[0]
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}"[:200])
    names = ["train.yaml"]
    if recipe:
        names.append(recipe_file(str(recipe), config_dir))
    if demo:
        names.append(DEMO_CONFIG)
    if task == "severity":
        names.append(SEVERITY_CONFIG)
    if launched_distributed():
        names.append("multi_gpu_train.yaml")
    if demo:
        settings["dataset_dir"] = str(demo_dataset(config_dir, severity=task == "severity"))
    if data is not None:
        settings["dataset_dir"] = str(data)
    settings.update(overrides)
    settings["output_dir"] = str(output)
    if "dataset_dir" not in settings:  # the configs' default place (data/MosMedData)
        settings["dataset_dir"] = load_config(*names, config_dir=config_dir).get("dataset_dir")
    return names, settings


def _check_data(settings: dict[str, Any], names: list[str], config_dir: Path) -> None:
    """Refuse missing data, a missing GPU or a malformed dataset before the run folder exists."""

    dataset_dir = Path(str(settings["dataset_dir"]))
    if not dataset_dir.exists():
        root = dataset_dir.parent if dataset_dir.name == "MosMedData" else Path("data")
        raise DataError(
            f"no training data at {dataset_dir}: download MosMedData with "
            f"`python -m app.data download --root {root}`, pass --data DIR, "
            "or try `python -m app.train --demo`"
        )
    if "cuda" in str(settings.get("device", "")) and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    class_names = None
    if SEVERITY_CONFIG in names:
        class_names = settings.get("class_names") or load_config(*names, config_dir=config_dir).get(
            "class_names"
        )
    items = find_items(dataset_dir, class_names=class_names)
    grades = {int(str(item["label"])) for item in items}
    if class_names is not None and len(grades) < 2:
        raise DataError(
            f"a severity run needs scans of at least two grades; {dataset_dir} holds "
            f"{', '.join(str(class_names[g]) for g in sorted(grades))} only (class folders "
            f"{', '.join(map(str, class_names))}, or a datalist with grades 0-{len(class_names) - 1})"
        )


def _record_settings(output: Path, settings: dict[str, Any], names: list[str]) -> None:
    """``overrides.json``: what ``--resume`` rebuilds the run from (rank 0 writes it)."""

    output.mkdir(parents=True, exist_ok=True)
    if rank() == 0:
        recipe = next((n for n in names if n.startswith(RECIPES_DIR + "/")), None)
        saved = {
            **{k: v for k, v in settings.items() if k != "output_dir"},  # --output says it
            "__demo__": DEMO_CONFIG in names,
            "__recipe__": None if recipe is None else Path(recipe).stem,
            "__task__": "severity" if SEVERITY_CONFIG in names else TASKS[0],
        }
        atomic_write_text(output / OVERRIDES, json.dumps(saved, indent=1))


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with ``prefix`` (a warning that is understood)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _run_workflow(
    output: Path,
    names: list[str],
    settings: dict[str, Any],
    *,
    resume: bool,
    config_dir: Path,
    tracked: dict[str, Any] | None = None,
) -> None:
    """Build the training workflow from the configs and run it to its end (or a signal)."""

    lead = rank() == 0
    log_handler = _log_to_file(output / TRAIN_LOG) if lead else logging.NullHandler()
    quiet = _DropMessages("Not all config files are in")  # a recipe lives in configs/recipes/,
    logging.getLogger("monai.bundle.workflows").addFilter(quiet)  # and the files are all named
    try:
        workflow = ConfigWorkflow(
            config_file=config_files(*names, config_dir=config_dir),
            meta_file=str(config_dir / METADATA),
            logging_file=str(config_dir / "logging.conf"),
            workflow_type="train",
            tracking=tracked,
            **settings,
            resume=resume,
        )
        # after the workflow applied logging.conf, which replaces the root logger's handlers
        logging.getLogger().addHandler(log_handler)
        workflow.initialize()
        if lead:
            _record_run(output, workflow.parser)
        trainer = workflow.parser.get_parsed_content("train#trainer")
        _log_start(output, workflow.parser, resume)
        try:
            with _stop_on_signals(trainer, output):
                workflow.run()
        except Interrupted:
            workflow.finalize()  # every rank stopped after the same iteration: meet, tear down
            raise
        except BaseException:
            leave_process_group()  # no barrier: the other ranks may never reach it
            raise
        workflow.finalize()
    except RuntimeError as exc:  # MONAI's config parser wraps what a component raised
        cause = _user_error(exc)
        if cause is None:
            raise
        raise cause from exc
    finally:
        logging.getLogger().removeHandler(log_handler)
        logging.getLogger("monai.bundle.workflows").removeFilter(quiet)
        log_handler.close()


def _record_run(output: Path, parser: ConfigParser) -> None:
    """The resolved config and the environment, beside the run's results."""

    parser.export_config_file(parser.get(), str(output / CONFIG_RECORD), indent=1)
    atomic_write_text(
        output / ENVIRONMENT,
        json.dumps(_environment(str(parser.get_parsed_content("device"))), indent=1),
    )


def _log_start(output: Path, parser: ConfigParser, resume: bool) -> None:

    log = logging.getLogger("app.train")
    if launched_distributed():
        log.info(
            "rank %d of %d holds %d training and %d validation scans",
            rank(),
            torch.distributed.get_world_size(),
            len(parser.get_parsed_content("train#dataset")),
            len(parser.get_parsed_content("validate#dataset")),
        )
    if resume:  # train.yaml's ResumeFromCheckpoint loads it when the trainer starts
        log.info(
            "resuming %s from %s (to epoch %s)",
            output,
            latest_checkpoint(output),
            parser.get_parsed_content("epochs"),
        )


def _result(output: Path, already_finished: str | None = None) -> TrainResult:

    best = output / BEST_MODEL
    return TrainResult(
        output,
        read_metrics(output / METRICS_CSV),
        best if best.exists() else None,
        already_finished=already_finished,
    )


def _user_error(exc: BaseException) -> CTClassifyError | None:
    """The first of our own errors in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, CTClassifyError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class Interrupted(CTClassifyError):
    """Training stopped on SIGINT/SIGTERM; the newest checkpoint is kept for ``--resume``."""

    exit_status = EXIT_INTERRUPTED


@contextlib.contextmanager
def _stop_on_signals(trainer: Engine, output: Path) -> Iterator[None]:
    """SIGINT/SIGTERM end the run after the current iteration instead of killing it mid-write.

    The newest checkpoint holds the last epoch written (every epoch on a CPU; within the write
    budget on a fast GPU); ``--resume`` continues from there.
    """

    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if received:  # a second signal: stop now
            raise KeyboardInterrupt
        received.append(signum)
        logging.getLogger("app.train").warning(
            "received %s: stopping after the current iteration", signal.Signals(signum).name
        )
        trainer.terminate()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        newest = latest_checkpoint(output)
        kept = f"{newest.name} is kept" if newest else "no epoch was saved"
        raise Interrupted(
            f"stopped by {signal.Signals(received[0]).name}; {kept}: continue with --resume"
        )
