"""What a resume may and may not do: the run folder it continues (``prepare_run_dir``), its
settings read back as data (``read_saved_overrides``), the split and the settings its
checkpoints record (``check_recorded_split``, ``check_recorded_settings``), and whether it has
anything left to do (``finished_reason``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.config import CONFIG_DIR, load_config
from app.errors import ConfigError
from app.readback import SPLIT_RECORD, ReadBackError, check_overrides, read_json, read_split
from app.run_folder import SPLIT, latest_checkpoint, remove_own_folder


def prepare_run_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run folder unless asked to resume or overwrite it."""

    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")
    exists = output.exists() and any(output.iterdir())
    if resume:
        if latest_checkpoint(output) is None:
            raise ConfigError(
                f"--resume: {output} holds no last_checkpoint_epoch=*.pt to resume from"
            )
    elif exists:
        if not overwrite:
            raise ConfigError(
                f"run folder {output} exists; add --resume to continue it, --overwrite to replace "
                "it, or choose another --output"
            )
        remove_own_folder(output, "run")


def check_recorded_settings(
    output: Path, names: list[str], settings: dict[str, Any], config_dir: Path
) -> None:
    """Refuse a resume whose settings would change one its last checkpoint records
    (``run_info``: the network, preprocessing, threshold, class names, seed, batch size,
    learning rate): the checkpoints it writes would describe another model than the weights
    they hold, and ``best_model.pt`` yet another.

    Raises:
        ConfigError: naming each setting that differs, recorded and now.
    """
    import torch

    last = latest_checkpoint(output)
    if last is None:
        return
    try:
        recorded = torch.load(last, map_location="cpu", weights_only=True).get("run_info") or {}
    except Exception:  # the resume itself reports an unusable checkpoint
        return
    parser = load_config(*names, overrides=settings, config_dir=config_dir)
    wanted = parser.get("run_info#settings") or {}
    differs = []
    for key, ref in wanted.items():
        if ref != f"@{key}" or key not in recorded or key == "dataset_dir":
            continue  # derived records (training data, init weights); data: the split's check
        now = parser.get_parsed_content(key)
        if json.dumps(now, sort_keys=True, default=str) != json.dumps(
            recorded[key], sort_keys=True, default=str
        ) and not _same_number(now, recorded[key]):
            differs.append(f"{key} {json.dumps(recorded[key])[:60]} (recorded) vs "
                           f"{json.dumps(now, default=str)[:60]} (now)")  # fmt: skip
    if differs:
        raise ConfigError(
            f"--resume: {output}'s checkpoints record settings these would change "
            f"({'; '.join(differs)}): resume with the recorded settings, or start a new run"
        )


def _same_number(a: Any, b: Any) -> bool:
    """Equal as numbers or lists of numbers (1 and 1.0; [1, 2] and (1, 2))."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_number(x, y) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    return (
        isinstance(a, numbers) and isinstance(b, numbers)
        and not isinstance(a, bool) and not isinstance(b, bool) and float(a) == float(b)
    )  # fmt: skip


def check_recorded_split(
    output: Path, names: list[str], settings: dict[str, Any], config_dir: Path
) -> None:
    """Refuse to resume ``output`` on another split than the one it trained on: its
    ``split.json`` records the seed, folds, fold, train fraction and data; the split these
    settings make now must be the recorded one, scan for scan.

    Raises:
        ConfigError: the recorded split is missing or unreadable, or differs (the message names
            what differs: seed, folds, fold, train fraction, data folder, scans added/removed).
    """

    path = output / SPLIT
    if not path.is_file():
        raise ReadBackError(
            f"--resume: {path} is missing: the split the run trained on is unknown, so a resume "
            "could validate on scans it trained on; start a new run"
        )
    recorded = read_split(path)
    parser = load_config(*names, overrides=settings, config_dir=config_dir)
    now = {key: parser.get_parsed_content(key) for key in SPLIT_RECORD}
    now["dataset_dir"] = str(now["dataset_dir"])
    differs = []
    if recorded["record"] is not None:
        for key, value in recorded["record"].items():
            if key == "dataset_dir":
                if Path(value).resolve() != Path(now[key]).resolve():
                    differs.append(f"data {value} (recorded) vs {now[key]} (now)")
            elif value != now[key]:
                differs.append(f"{key} {value} (recorded) vs {now[key]} (now)")
    if not differs:
        split = parser.get_parsed_content("split")

        def pairs(items: list[Any]) -> set[tuple[str, int]]:
            return {(str(Path(str(i["image"])).resolve()), int(i["label"])) for i in items}

        before = pairs(recorded["training"]) | pairs(recorded["validation"])
        after = pairs(split["training"]) | pairs(split["validation"])
        if before != after:
            differs.append(
                f"the data changed: {len(after - before)} scans added, {len(before - after)} "
                "removed or relabelled"
            )
        elif pairs(split["validation"]) != pairs(recorded["validation"]):
            differs.append("the validation scans differ from the recorded ones")
    if differs:
        raise ConfigError(
            f"--resume: {output} trained on the split recorded in {path}; these settings make "
            f"another ({'; '.join(differs)}), which would validate on scans it trained on: "
            "resume with the recorded settings, or start a new run"
        )


#: the config expressions ``--device`` writes into overrides.json itself
DEVICE_EXPRESSIONS = {f"$torch.device('{d}')" for d in ("cpu", "cuda")}


def read_saved_overrides(
    path: Path, given: dict[str, Any], config_dir: Path = CONFIG_DIR
) -> dict[str, Any]:
    """A run folder's ``overrides.json`` for ``--resume``, read as data.

    The file comes from a folder, which may come from someone else: every key must be one of
    app.train's settings (``app.training.settings.SETTING_CHECKS``: never an id path such as
    ``loss#_target_`` nor a config internal such as ``is_not_rank0``), every value inside its
    range and free of config syntax, unless it is an expression ``--device`` writes, or the
    same key and value are given again on this command line (``given``); a place to write to
    (``cache_dir``) only when given again.
    """
    from app.training.settings import SETTING_CHECKS, WRITE_PATHS

    saved = read_json(path, 1 << 20)
    if isinstance(saved, dict):
        saved.pop("output_dir", None)  # older files recorded it; --output says where the run is
    return check_overrides(
        saved,
        path,
        {**SETTING_CHECKS, "device": _device_value},
        given,
        {"device": DEVICE_EXPRESSIONS},
        WRITE_PATHS,
    )


def _device_value(value: Any) -> str:
    raise ValueError(f"one of {', '.join(sorted(DEVICE_EXPRESSIONS))}, got {value!r}"[:200])


def finished_reason(
    output: Path, settings: dict[str, Any], names: list[str], config_dir: Path
) -> str | None:
    """Why the run in ``output`` has nothing left to do with these settings, or ``None``.

    Finished: its last checkpoint reached the requested ``epochs``, or early stopping ended it
    and ``patience`` was not raised since. Read from the checkpoint's trainer state alone.
    """
    import torch

    from app.training.handlers.early_stopping import STATE_KEY

    last = latest_checkpoint(output)
    if last is None:
        return None
    wanted: dict[str, Any] = {k: settings[k] for k in ("epochs", "patience") if k in settings}
    parser = load_config(*names, overrides=wanted, config_dir=config_dir)
    epochs = int(parser.get_parsed_content("epochs"))
    patience = int(parser.get_parsed_content("patience"))
    try:
        trainer = torch.load(last, map_location="cpu", weights_only=True)["trainer"]
        # ignite stores the iteration (or the epoch) of the trainer
        epoch = int(
            trainer["epoch"]
            if "epoch" in trainer
            else int(trainer["iteration"]) // max(int(trainer["epoch_length"]), 1)
        )
    except (KeyError, TypeError, ValueError, RuntimeError, OSError):
        return None  # the resume itself reports an unusable checkpoint
    if epoch >= epochs:
        return f"it reached epoch {epoch} of {epochs}; raise --epochs to train on"
    stopper = trainer.get(STATE_KEY) or {}
    if int(stopper.get("counter", 0)) >= patience:
        return (
            f"early stopping ended it at epoch {epoch} ({stopper.get('counter')} epochs without a "
            f"better validation accuracy, patience {patience}); raise --patience to train on"
        )
    return None
