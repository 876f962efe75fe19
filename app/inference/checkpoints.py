"""Checkpoints: where a model's file is, reading it without unpickling objects, and the
network its settings describe (one model, or a cross-validation folder's folds as one)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from app.config import METADATA, load_config
from app.errors import EXIT_REFUSED, ConfigError, CTClassifyError
from app.model_settings import MODEL_SETTINGS, SettingsError, validate_settings
from app.readback import ReadBackError, read_calibration, read_cv_summary
from app.run_folder import (
    BEST_MODEL,
    CV_CALIBRATION,
    CV_SUMMARY,
    METRICS_CSV,
    fold_dirs,
    fold_number,
    kept_row,
    latest_checkpoint,
    read_metrics,
)
from nets.ensemble import MeanProbabilityEnsemble


class CheckpointError(CTClassifyError):
    """The checkpoint cannot be used (missing, unsafe, or without the settings of its model)."""

    exit_status = EXIT_REFUSED


def resolve_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """A checkpoint file from a file, a run folder (its best model) or ``None`` (newest run)."""
    if path is None:
        candidates = sorted(Path(runs_dir).glob(f"*/{BEST_MODEL}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(
                f"no trained model under {runs_dir}/: train one (`python -m app.train --demo`) or "
                "pass --checkpoint RUN_DIR|FILE"
            )
        return candidates[-1]
    path = Path(path)
    if path.is_dir():
        for name in (BEST_MODEL, "models/model.pt"):
            if (path / name).is_file():
                return path / name
        last = latest_checkpoint(path)
        if last is None:
            raise CheckpointError(
                f"{path} holds no best_model.pt, models/model.pt or last checkpoint"
            )
        return last
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(network state dict, run settings) from a checkpoint, without unpickling any object."""

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc})") from exc
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither the zip file torch.save writes "
            f"nor a pickle (it starts with {head!r}): damaged, or another kind of file"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # bytes the unpickler cannot parse, no object
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint: its content cannot be parsed "
                "(damaged or cut short)"
            ) from exc
        raise CheckpointError(
            f"{path} was refused: it holds Python objects that loading would execute, not only "
            f"weights ({str(exc).splitlines()[0][:200]})"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint dictionary")
    state = data.get("network", data.get("model"))
    settings = data.get("run_info")
    source = str(path)
    if settings is None and (path.parent.parent / "configs" / METADATA).is_file():
        import yaml

        from app.model_settings import read_bundle_settings

        source = str(path.parent.parent / "configs" / "inference.yaml")
        try:
            settings = read_bundle_settings(path.parent.parent)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CheckpointError(f"{source} cannot be read ({str(exc)[:200]})") from exc
        state = data if state is None else state
    if settings is None:
        raise CheckpointError(
            f"{path} does not carry the settings its model was trained with ('run_info'); "
            "use a checkpoint written by app.train or an exported bundle"
        )
    try:
        settings = validate_settings(settings, source)
    except SettingsError as exc:
        raise CheckpointError(str(exc)) from exc
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no network weights (expected a 'network' entry)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: the network entry holds values that are not tensors")
    broken = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if broken:
        raise CheckpointError(
            f"{path}: weights {', '.join(broken[:3])} hold NaN or infinite values (a diverged or "
            "damaged model): refused"
        )
    return state, settings


def validation_of(checkpoint: Path) -> dict[str, Any] | None:
    """The validation metrics of a run folder's checkpoint, from the ``metrics.csv`` beside it:
    the first best validation accuracy for ``best_model.pt`` (the epoch it was saved at), that
    epoch's row for ``last_checkpoint_epoch=N.pt``."""
    try:
        rows = [r for r in read_metrics(checkpoint.parent / METRICS_CSV) if r.get("val_acc")]
    except (OSError, ValueError, KeyError):
        return None
    row: Mapping[str, Any] | None
    if checkpoint.name == BEST_MODEL:
        row = kept_row(rows)
    else:
        epoch = checkpoint.stem.rsplit("=", 1)[-1]
        row = next((r for r in rows if str(r["epoch"]) == epoch), None)
    if row is None:
        return None
    keys = ("val_acc", "val_auc", "val_sensitivity", "val_specificity", "val_loss")
    return {"epoch": int(row["epoch"]), **{k: row[k] for k in keys if row.get(k) is not None}}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    return device


def load_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(network with its weights, settings) of a checkpoint file (:func:`resolve_checkpoint`);
    the settings gain the run folder's validation metrics when the checkpoint lacks them."""
    state, settings = load_checkpoint(path)
    if "validation" not in settings:
        found = validation_of(path)
        if found:
            settings["validation"] = found
    network = build_network(settings)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the network its settings describe ({exc})"
        ) from exc
    return network, settings


def load_cv_ensemble(folder: Path) -> tuple[MeanProbabilityEnsemble, dict[str, Any]]:
    """A cross-validation folder (``app.train --folds K``) as one network, the mean of the fold
    models' temperature-scaled probabilities, with settings whose threshold is the one chosen
    out of fold (on the same scale) and whose ``ensemble`` records members and temperature."""

    try:
        calibration = read_calibration(folder / CV_CALIBRATION)
    except ReadBackError as exc:
        raise CheckpointError(str(exc)) from None
    temperature = float(calibration["temperature"])
    chosen = float(calibration["threshold_calibrated"])
    folds = fold_dirs(folder)
    if not folds or [fold_number(p) for p in folds] != list(range(len(folds))):
        raise CheckpointError(f"{folder} holds no fold-0 ... fold-K folders")
    members, settings = [], None
    for run in folds:
        state, fold_settings = load_checkpoint(run / BEST_MODEL)
        if settings is None:
            settings = fold_settings
        elif any(fold_settings[k] != settings[k] for k in MODEL_SETTINGS):
            raise CheckpointError(f"{run}: its model settings differ from fold-0's")
        net = build_network(fold_settings)
        try:
            net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        except RuntimeError as exc:
            raise CheckpointError(f"{run / BEST_MODEL}: weights do not fit ({exc})") from exc
        members.append(net)
    assert settings is not None
    # the ensemble's own temperature and threshold, chosen out of fold, replace a fold's
    for own in ("temperature", "operating_point"):
        settings.pop(own, None)
    summary = cv_means(folder)
    if summary:
        settings["validation"] = summary
    settings["threshold"] = chosen
    settings["ensemble"] = {"members": len(members), "temperature": temperature}
    if calibration.get("threshold_method"):
        settings["ensemble"]["threshold_method"] = calibration["threshold_method"]
    return MeanProbabilityEnsemble(members, temperature), settings


def build_network(settings: dict[str, Any]) -> torch.nn.Module:
    """The network its settings describe: inference.yaml's ``network_def`` with the model's
    settings, or, with ``ensemble``, that many of them averaged (an exported CV ensemble)."""

    overrides = {k: settings[k] for k in MODEL_SETTINGS}

    def one() -> torch.nn.Module:
        return load_config("inference.yaml", overrides=overrides).get_parsed_content("network_def")

    ensemble = settings.get("ensemble")
    if not ensemble:
        return one()
    members = [one() for _ in range(int(ensemble["members"]))]
    return MeanProbabilityEnsemble(members, float(ensemble["temperature"]))


def cv_means(folder: Path) -> dict[str, Any] | None:
    """The folds' mean validation metrics from ``cv_summary.json`` (no epoch: several)."""

    if not (folder / CV_SUMMARY).is_file():
        return None
    try:
        stats = read_cv_summary(folder / CV_SUMMARY)["mean_sd"]
    except ReadBackError as exc:
        raise CheckpointError(str(exc)) from None
    return {k: v["mean"] for k, v in stats.items()}
