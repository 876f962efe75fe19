"""The settings a checkpoint or bundle carries, validated as data before anything is built.

Checkpoints (``run_info``), exported bundles (``run_settings``) and run folders come from
outside: their settings are never handed to MONAI's config parser as they are, because the
parser evaluates ``$`` expressions, resolves ``@`` references, reads ``%`` macros and
instantiates ``_target_`` dicts. :func:`validate_settings` refuses any such value anywhere in
the tree, then checks every known field's type, length and range, and returns new plain values
(ints, floats, strings, lists) built from the checked ones; unknown fields are dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app.config import TRAINING_SCANS
from app.errors import EXIT_REFUSED, CTClassifyError

#: settings a checkpoint must carry to rebuild its model and preprocessing
MODEL_SETTINGS = (
    "spatial_size",
    "hu_window",
    "axcodes",
    "in_channels",
    "filters",
    "dense_units",
    "dropout",
    "bn_eps",
    "bn_momentum",
    "norm",
    "pooling",
    "lung_crop",
    "lung_only",
    "lung_flatten_mm",
    "density_bins",
    "grades",
    "ordinal_head",
)

#: model settings that checkpoints written before the setting existed lack: their value then
#: (the network those checkpoints hold)
MODEL_DEFAULTS: dict[str, Any] = {
    "norm": "batch",
    "pooling": "avg",
    "lung_crop": False,
    "lung_only": False,
    "lung_flatten_mm": 0.0,
    "density_bins": 0,
    "grades": 2,
    "ordinal_head": "softmax",
}

#: prefixes MONAI's config parser acts on: expression, reference, macro
CONFIG_SYNTAX = ("$", "@", "%")
#: what makes a key an id path into nested entries for MONAI's parser
ID_PATH = ("#", "::")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")
_AXES = ({"L", "R"}, {"A", "P"}, {"S", "I"})
_MAX_DEPTH = 8
_MAX_ITEMS = 10_000


class SettingsError(CTClassifyError):
    """A checkpoint's or bundle's settings are unsafe or invalid; the message names the field."""

    exit_status = EXIT_REFUSED


def find_config_syntax(
    value: Any, where: str = "settings", depth: int = 0, budget: list[int] | None = None
) -> str | None:
    """The path of the first value MONAI's parser would act on (``$``/``@``/``%`` strings,
    ``_target_`` keys, keys that are id paths with ``#`` or ``::``), or of a structure too deep or too large to be settings; ``None`` if clean.

    At most ``_MAX_ITEMS`` values are visited in all, so YAML aliases that repeat one list many
    times over ("billion laughs") cost no more than a flat list.
    """
    budget = [_MAX_ITEMS] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        return f"{where} (more than {_MAX_ITEMS:,} values in all)"
    if depth > _MAX_DEPTH:
        return f"{where} (nested deeper than {_MAX_DEPTH} levels)"
    if isinstance(value, str):
        return where if value.lstrip().startswith(CONFIG_SYNTAX) else None
    if isinstance(value, Mapping):
        if len(value) > _MAX_ITEMS:
            return f"{where} ({len(value)} entries)"
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} (key {key!r} is not a string)"
            if (
                key.startswith("_")
                and key.endswith("_")
                or key.startswith(CONFIG_SYNTAX)
                or any(part in key for part in ID_PATH)
            ):
                return f"{where}.{key}"
            found = find_config_syntax(item, f"{where}.{key}", depth + 1, budget)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        if len(value) > _MAX_ITEMS:
            return f"{where} ({len(value)} items)"
        for i, item in enumerate(value):
            found = find_config_syntax(item, f"{where}[{i}]", depth + 1, budget)
            if found:
                return found
    return None


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"an integer in [{lo}, {hi}], got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"an integer in [{lo}, {hi}], got {value}")
        return int(value)

    return check


def _float(lo: float, hi: float, open_low: bool = False, open_high: bool = False) -> Any:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"a number in [{lo}, {hi}], got {value!r}")
        value = float(value)
        if (
            not math.isfinite(value)
            or value < lo
            or value > hi
            or (open_low and value == lo)
            or (open_high and value == hi)
        ):
            bounds = f"{'(' if open_low else '['}{lo}, {hi}{')' if open_high else ']'}"
            raise ValueError(f"a number in {bounds}, got {value}")
        return value

    return check


def _list(item: Callable[[Any], Any], min_len: int, max_len: int) -> Callable[[Any], list[Any]]:
    def check(value: Any) -> list[Any]:
        if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
            count = f"{min_len}" if min_len == max_len else f"{min_len} to {max_len}"
            raise ValueError(f"a list of {count} values, got {value!r}"[:200])
        return [item(v) for v in value]

    return check


def _hu_window(value: Any) -> list[float]:
    low, high = _list(_float(-10_000, 40_000), 2, 2)(value)
    if high <= low:
        raise ValueError(f"[low, high] with low < high, got {value!r}")
    return [low, high]


def _axcodes(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 3:
        raise ValueError(f"three orientation letters such as 'LAS', got {value!r}"[:200])
    letters = value.upper()
    axes = [next((i for i, pair in enumerate(_AXES) if c in pair), -1) for c in letters]
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"one of L/R, one of A/P and one of S/I, got {value!r}")
    return letters


def _norm(value: Any) -> str:
    from nets.cnn3d import NORMS

    if value not in NORMS:
        raise ValueError(f"one of {', '.join(NORMS)}, got {value!r}"[:200])
    return str(value)


def _pooling(value: Any) -> str:
    from nets.cnn3d import POOLINGS

    if value not in POOLINGS:
        raise ValueError(f"one of {', '.join(POOLINGS)}, got {value!r}"[:200])
    return str(value)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"a short name of letters, digits, space, '_.+-', got {value!r}"[:200])
    return value


#: the most severity grades a model may have
MAX_GRADES = 16


def _class_names(value: Any) -> list[str]:
    names = _list(_name, 2, MAX_GRADES)(value)
    if len(set(names)) != len(names):
        raise ValueError(f"different names, got {value!r}")
    return names


def _ordinal_head(value: Any) -> str:
    from nets.cnn3d import ORDINAL_HEADS

    return _one_of(*ORDINAL_HEADS)(value)


def _one_of(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"one of {', '.join(options)}, got {value!r}"[:200])
        return str(value)

    return check


def _path_text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 4096 or any(ord(c) < 32 for c in value):
        raise ValueError(f"a path of at most 4,096 printable characters, got {value!r}"[:200])
    return value


def _spacing(value: Any) -> list[float]:
    return _list(_float(0.0, 1000.0, open_low=True), 3, 3)(value)


def _shape(value: Any) -> list[int]:
    return _list(_int(1, 1_000_000), 3, 3)(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"true or false, got {value!r}")
    return value


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"a SHA-256 in 64 hexadecimal digits, got {value!r}"[:200])
    return value


def shareable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without the absolute paths of the machine that trained the model (they
    often hold patient or study names): the data named by its folder name alone, beside the
    content digest ``training_data.digest`` where it was recorded."""
    out = dict(settings)
    if "dataset_dir" in out:
        out["dataset_dir"] = Path(str(out["dataset_dir"])).name
    if isinstance(out.get("training_data"), Mapping):
        data = dict(out["training_data"])
        if "source" in data:
            data["source"] = Path(str(data["source"])).name
        data.pop("scan_sha256", None)  # a bundle keeps them in their own file (TRAINING_SCANS)
        out["training_data"] = data
    return out


#: the most scans whose hashes a model may record (``training_data.scan_sha256``)
MAX_HASHED_SCANS = 1_000_000


def _scan_hashes(value: Any) -> dict[str, str]:
    """The SHA-256 of each training and validation scan's content, each part one string of
    64-digit hexadecimal hashes run together (:func:`app.data.datalist.scan_sha256`)."""
    if not isinstance(value, Mapping) or set(value) != {"training", "validation"}:
        raise ValueError("a mapping of 'training' and 'validation'")
    out = {}
    for part in ("training", "validation"):
        text = value[part]
        if (
            not isinstance(text, str)
            or len(text) % 64
            or len(text) > 64 * MAX_HASHED_SCANS
            or not re.fullmatch(r"[0-9a-f]*", text)
        ):
            raise ValueError(
                f"{part}: 64-digit lowercase hexadecimal SHA-256 hashes run together, at most "
                f"{MAX_HASHED_SCANS:,}"
            )
        out[part] = text
    return out


def split_hashes(text: str) -> set[str]:
    """The hashes of one part of ``training_data.scan_sha256``."""
    return {text[i : i + 64] for i in range(0, len(text), 64)}


#: checks of the ``training_data`` record (what the model was trained on)
TRAINING_DATA_FIELDS: dict[str, Callable[[Any], Any]] = {
    "scans": _int(0, 10_000_000),
    "class_counts": _list(_int(0, 10_000_000), 2, MAX_GRADES),
    "generated": _bool,
    "source": _path_text,
    "digest": _sha256,
    "scan_sha256": _scan_hashes,
    "spacing_min": _spacing,
    "spacing_max": _spacing,
    "shape_min": _shape,
    "shape_max": _shape,
}


def _init_weights(value: Any) -> dict[str, str]:
    """What a run started from (``app.train --init``): a file name and its SHA-256."""
    if not isinstance(value, Mapping) or set(value) != {"name", "sha256"}:
        raise ValueError(f"a mapping of name and sha256, got {value!r}"[:200])
    name = _path_text(value["name"])
    if "/" in name or "\\" in name or len(name) > 255:
        raise ValueError(f"a file name without folders, got {name!r}"[:200])
    return {"name": name, "sha256": _sha256(value["sha256"])}


def _training_data(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"a mapping, got {type(value).__name__}")
    out = {}
    for key, check in TRAINING_DATA_FIELDS.items():
        if key in value and value[key] is not None:
            try:
                out[key] = check(value[key])
            except ValueError as exc:
                raise ValueError(f"field {key!r}: {exc}") from None
    return out


def _validation(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"a mapping, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "epoch":
            out[key] = _int(0, 1_000_000)(item)
        elif isinstance(key, str) and key.startswith("val_") and item is not None:
            out[key] = _float(0.0, 1e6)(item)
    return out


def _ensemble(value: Any) -> dict[str, Any]:
    """A cross-validation ensemble: how many fold models, and the temperature."""
    if not isinstance(value, Mapping) or not (
        {"members", "temperature"} <= set(value) <= {"members", "temperature", "threshold_method"}
    ):
        raise ValueError("a mapping of 'members', 'temperature' (and 'threshold_method')")
    out = {
        "members": _int(1, 100)(value["members"]),
        "temperature": _float(0.0, 1000.0, open_low=True)(value["temperature"]),
    }
    method = value.get("threshold_method")
    if method is not None:
        if not isinstance(method, str) or not re.fullmatch(r"[A-Za-z0-9 '.>=_-]{1,80}", method):
            raise ValueError(f'a threshold method such as "Youden\'s J", got {method!r}'[:200])
        out["threshold_method"] = method
    return out


def _interval(value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"[value, low, high], got {value!r}"[:200])
    return [_float(0.0, 1.0)(v) for v in value]


def _operating_point(value: Any) -> dict[str, Any]:
    """How a single model's threshold and temperature were chosen (``app.training.operating_point``):
    by which method, on how many validation scans, and, when chosen, what they gave there (every
    field the console prints is required: a record cut short is refused, not half printed)."""
    counts = ("scans", "normal", "abnormal")
    chosen_only = ("sensitivity", "specificity")
    if not isinstance(value, Mapping) or not isinstance(value.get("chosen"), bool):
        raise ValueError("a mapping with 'chosen' true or false")
    required = {"chosen", "method", *counts, *(chosen_only if value["chosen"] else ())}
    if set(value) != required:
        raise ValueError(f"a mapping of exactly {', '.join(sorted(required))}")
    method = value["method"]
    if not isinstance(method, str) or len(method) > 300 or not method.isprintable():
        raise ValueError(f"a method in at most 300 printable characters, got {method!r}"[:200])
    out: dict[str, Any] = {"chosen": value["chosen"], "method": method}
    for key in counts:
        out[key] = _int(0, 10_000_000)(value[key])
    for key in chosen_only:
        if key in value:
            out[key] = _interval(value[key])
    return out


#: every field a checkpoint's settings may carry, with its check
FIELDS: dict[str, Callable[[Any], Any]] = {
    "spatial_size": _list(_int(1, 2048), 3, 3),
    "hu_window": _hu_window,
    "axcodes": _axcodes,
    "in_channels": _int(1, 64),
    "filters": _list(_int(1, 4096), 1, 8),
    "dense_units": _int(1, 65_536),
    "dropout": _float(0.0, 1.0, open_high=True),
    "bn_eps": _float(0.0, 1.0, open_low=True),
    "bn_momentum": _float(0.0, 1.0),
    "norm": _norm,
    "pooling": _pooling,
    "lung_crop": _bool,
    "lung_only": _bool,
    "lung_flatten_mm": _float(0.0, 1000.0),
    "density_bins": _int(0, 256),
    "grades": _int(2, MAX_GRADES),
    "ordinal_head": _ordinal_head,
    "threshold": _float(0.0, 1.0),
    "temperature": _float(0.0, 1000.0, open_low=True),
    "operating_point": _operating_point,
    "class_names": _class_names,
    "seed": _int(-(2**63), 2**63 - 1),
    "batch_size": _int(1, 1_000_000),
    "learning_rate": _float(0.0, 10.0, open_low=True),
    "class_weighting": _one_of("none", "pos_weight"),
    "sampler": _one_of("shuffle", "weighted"),
    "dataset_dir": _path_text,
    "training_data": _training_data,
    "init_weights": _init_weights,
    "validation": _validation,
    "ensemble": _ensemble,
}


def validate_settings(
    settings: Any, source: str, required: tuple[str, ...] = MODEL_SETTINGS
) -> dict[str, Any]:
    """Checked plain copies of ``settings`` read from ``source`` (a file named in messages).

    Raises:
        SettingsError: a value MONAI's parser would act on (anywhere, however nested), a field
            of the wrong type, length or range, or a required field missing.
    """
    if not isinstance(settings, Mapping):
        raise SettingsError(f"{source}: settings must be a mapping, got {type(settings).__name__}")
    found = find_config_syntax(settings)
    if found:
        raise SettingsError(
            f"{source}: field {found} holds config syntax ('$' expression, '@' reference, '%' "
            "macro or '_target_'); settings are data and are never evaluated: refused"
        )
    settings = {**{k: v for k, v in MODEL_DEFAULTS.items() if k in required}, **settings}
    missing = [k for k in required if k not in settings]
    if missing:
        raise SettingsError(f"{source}: run settings lack {', '.join(missing)}")
    out: dict[str, Any] = {}
    for key, check in FIELDS.items():
        if key not in settings or (settings[key] is None and key not in required):
            continue
        try:
            out[key] = check(settings[key])
        except ValueError as exc:
            raise SettingsError(f"{source}: field {key!r} must be {exc}") from None
    grades = out.get("grades", 2)
    if "class_names" in out and len(out["class_names"]) != grades:
        raise SettingsError(
            f"{source}: field 'class_names' must name each of its {grades} grades, got "
            f"{len(out['class_names'])} names"
        )
    if "spatial_size" in out and "filters" in out:
        from nets.cnn3d import min_spatial_size

        smallest = min_spatial_size(len(out["filters"]))
        if min(out["spatial_size"]) < smallest:
            raise SettingsError(
                f"{source}: field 'spatial_size' must be at least {smallest} voxels on every "
                f"axis for its network of {len(out['filters'])} blocks, got {out['spatial_size']}"
            )
    return out


def read_bundle_settings(bundle_root: str | Path, max_bytes: int = 1 << 20) -> Any:
    """The ``run_settings`` written into an exported bundle's ``configs/inference.yaml``.

    Read as plain YAML (a bundle's ``$`` expressions are code and are never evaluated here) and
    returned as read: the caller validates them (``app.model_settings.validate_settings``).
    """
    import yaml

    path = Path(bundle_root) / "configs" / "inference.yaml"
    if path.stat().st_size > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes:,} bytes: not a bundle config")
    config = yaml.safe_load(path.read_text())
    settings = config.get("run_settings") if isinstance(config, dict) else None
    hashes = Path(bundle_root) / "configs" / TRAINING_SCANS
    data = settings.get("training_data") if isinstance(settings, dict) else None
    if isinstance(data, dict) and (hashes.is_file() or hashes.is_symlink()):
        data["scan_sha256"] = read_scan_hashes(hashes)
    return settings


def read_scan_hashes(path: Path) -> Any:
    """The ``scan_sha256`` record in a bundle's ``configs/training_scans.json`` (checked by
    :func:`validate_settings` with the rest); a link is refused."""

    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link: links are never followed")
    if path.stat().st_size > 70 * MAX_HASHED_SCANS:
        raise ValueError(f"{path} is larger than a record of {MAX_HASHED_SCANS:,} scans")
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict) or set(value) != {"scan_sha256"}:
        raise ValueError(f"{path}: expected an object with one key, 'scan_sha256'")
    return value["scan_sha256"]
