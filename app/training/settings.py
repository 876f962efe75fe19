"""The training settings a user may give, each with its range, checked before anything is built.

``app.train``'s options and ``--set ID=VALUE``, ``train(overrides=...)`` and a run folder's
``overrides.json`` (read back on ``--resume`` and by cross-validation folds) all pass through
:func:`check_settings`: a value out of range is one line naming the setting and where it came
from (exit status 2), never a traceback from deep inside MONAI or PyTorch. What a run folder's
file may hold at all is :data:`SETTING_CHECKS`'s ids (``app.readback.check_overrides``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from app.errors import ConfigError
from app.model_settings import FIELDS, _bool, _float, _int, _list, _path_text
from app.model_settings import _one_of as _choice
from app.runtime import PRECISIONS
from app.training.datasets import CACHE_MODES
from app.training.schedules import LR_SCHEDULES
from nets.cnn3d import min_spatial_size


def _text(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isidentifier():
        raise ValueError(f"a short name (letters, digits, '_'), got {value!r}"[:200])
    return value


def _angles(value: Any) -> list[float]:
    return _list(_float(-180.0, 180.0), 1, 64)(value)


def _checks() -> dict[str, Callable[[Any], Any]]:
    model = {k: FIELDS[k] for k in (
        "spatial_size", "hu_window", "axcodes", "in_channels", "filters", "dense_units",
        "dropout", "bn_eps", "bn_momentum", "norm", "pooling", "lung_crop", "lung_only",
        "lung_flatten_mm", "density_bins", "threshold", "temperature", "class_names", "seed",
        "learning_rate", "class_weighting", "sampler", "grades", "ordinal_head",
    )}  # fmt: skip
    return {
        **model,
        "batch_size": _int(1, 4096),
        "num_workers": _int(0, 256),
        "precision": _choice(*PRECISIONS),
        "reuse_freed_memory": _bool,
        "epochs": _int(1, 1_000_000),
        "patience": _int(1, 1_000_000),
        "lr_decay_rate": _float(0.0, 1.0, open_low=True),
        "lr_decay_steps": _int(1, 10**12),
        "lr_schedule": _choice(*LR_SCHEDULES),
        "val_interval": _int(1, 1_000_000),
        "train_fraction": _float(0.0, 1.0, open_low=True, open_high=True),
        "rotation_angles_deg": _angles,
        "flip_prob": _float(0.0, 1.0),
        "scale_range": _float(0.0, 1.0, open_high=True),
        "contrast_range": _float(0.0, 1.0, open_high=True),
        "intensity_shift": _float(0.0, 1.0),
        "kernel_range": _float(0.0, 2.0),
        "cache": _choice(*CACHE_MODES),
        "cache_dir": _path_text,
        "progress": _bool,
        "write_budget": _float(0.0, 1.0, open_low=True),
        "compile": _bool,
        "init_weights": _path_text,
        "cudnn_deterministic": _bool,
        "folds": _int(0, 100),
        "fold": _int(0, 99),
        "dataset_dir": _path_text,
        "image_key": _text,
        "label_key": _text,
    }


#: every setting a user may give app.train (an option, --set, overrides.json), with its check
SETTING_CHECKS: dict[str, Callable[[Any], Any]] = _checks()
#: settings the app sets itself (from --resume and --output), never from --set or a file
APP_CONTROLLED = ("resume", "output_dir")
#: settings that name a place to write to: from overrides.json only when given again
WRITE_PATHS = ("cache_dir",)


def check_settings(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``settings`` with every known setting's value checked against its range; ids that are
    not settings pass as they are (``--set`` of a config internal is the user's own choice).

    Raises:
        ConfigError: a value out of range, or an app-controlled id, naming it and ``source``.
    """
    out = dict(settings)
    for key in APP_CONTROLLED:
        if key in out:
            raise ConfigError(
                f"{source}: {key!r} is set by the app itself (--resume, --output), not as a "
                "setting: refused"
            )
    for key, value in settings.items():
        check = SETTING_CHECKS.get(key)
        if check is None:
            continue
        try:
            out[key] = check(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: setting {key!r} must be {exc}") from None
    return out


def check_combination(values: Mapping[str, Any]) -> None:
    """The settings that depend on each other, on the run's values (configs, recipe, file and
    command line merged): ``spatial_size`` against the network's depth (``filters``), ``fold``
    against ``folds``.

    Raises:
        ConfigError: naming the settings.
    """

    blocks = len(values["filters"])
    smallest = min_spatial_size(blocks)
    if min(values["spatial_size"]) < smallest:
        raise ConfigError(
            f"setting 'spatial_size' must be at least {smallest} voxels on every axis for a "
            f"network of {blocks} blocks (filters {values['filters']}), got "
            f"{values['spatial_size']}"
        )
    grades, names = values.get("grades", 2), values.get("class_names") or []
    if len(names) != grades:
        raise ConfigError(
            f"setting 'class_names' must name each of the {grades} grades, got {list(names)}"
        )
    folds, fold = values.get("folds") or 0, values.get("fold") or 0
    if folds and grades > 2:
        raise ConfigError(
            "cross-validation (folds) is for binary runs; a severity run takes one split"
        )
    if folds == 1:
        raise ConfigError("setting 'folds' must be 0 (no cross-validation) or at least 2")
    if folds and fold >= folds:
        raise ConfigError(f"setting 'fold' must be below folds ({folds}), got {fold}")
