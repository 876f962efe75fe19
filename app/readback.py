"""Files the app wrote, read back as outside data: a user may have edited, copied or been sent
them. Each reader takes an allow-list of keys with a check per key, refuses anything else with a
:class:`ReadBackError` naming the file and the key (the command lines exit 2), and returns new
plain values built from the checked ones. Nothing read here ever reaches MONAI's config parser
as an id path (``#``, ``::``), a reference (``@``), an expression (``$``), a macro (``%``) or a
``_target_``/``_requires_``/``_disabled_`` entry.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from app.config import TASKS
from app.errors import ConfigError
from app.model_settings import MAX_GRADES, find_config_syntax

#: larger files are not ones the app writes (a 1,110-scan split.json is about 150 KB)
MAX_JSON_BYTES = 16 * 1024**2
#: a config id a run folder may set: a plain top-level name, never an id path or syntax
_PLAIN_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: what overrides.json records beside the config ids (``app.training.workflow``)
RUN_MARKERS = ("__demo__", "__recipe__", "__task__")


class ReadBackError(ConfigError):
    """A file the app reads back is unusable or unsafe; the message names the file and key."""


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``, at most ``max_bytes``; :class:`ReadBackError` otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ReadBackError(f"{path} is {size:,} bytes, more than {max_bytes:,}: refused")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ReadBackError(f"{path} cannot be read ({str(exc)[:200]})") from None


def _syntax(value: Any, where: str) -> str | None:

    return find_config_syntax(value, where)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def check_overrides(
    saved: Any,
    path: str | Path,
    checks: Mapping[str, Callable[[Any], Any]],
    given: Mapping[str, Any],
    allowed_expressions: Mapping[str, Iterable[str]] | None = None,
    write_paths: Iterable[str] = (),
) -> dict[str, Any]:
    """A run folder's ``overrides.json`` as checked data.

    Args:
        saved: the file's JSON value.
        path: the file, named in messages.
        checks: the settings a run may record (``app.training.settings.SETTING_CHECKS``), each
            with the check of its range; nothing else is read from the file.
        given: this command line's overrides: a key or value that would be refused from the
            file is accepted when the same key and value are given again here.
        allowed_expressions: expressions the app writes itself (``--device``), by key.
        write_paths: settings naming a place the run writes to (``cache_dir``): from the file
            only when given again on the command line.

    Raises:
        ReadBackError: a key that is not a setting (an id path such as ``loss#_target_``,
            ``::``, syntax, an internal id such as ``is_not_rank0``, an unknown name), a value
            with config syntax anywhere, a value out of its setting's range, or a place to
            write to that this command line did not give again.
    """
    if not isinstance(saved, dict):
        raise ReadBackError(f"{path}: expected a JSON object, got {_kind(saved)}")
    allowed = {k: set(v) for k, v in (allowed_expressions or {}).items()}
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if key in given and given[key] == value:
            out[key] = value  # the user's own command line says so again
            continue
        if key in RUN_MARKERS:
            out[key] = _run_marker(key, value, path)
            continue
        if not isinstance(key, str) or not _PLAIN_ID.match(key) or key not in checks:
            shown = str(key) if len(str(key)) < 80 else str(key)[:77] + "..."
            raise ReadBackError(
                f"{path}: key {shown!r} is not a setting a run records (one of app.train's "
                "settings; never an id path with '#' or '::', a reference, an expression, "
                "'_target_' or a config internal): refused, nothing was run"
            )
        if isinstance(value, str) and value in allowed.get(key, ()):
            out[key] = value
            continue
        found = _syntax(value, key)
        if found:
            raise ReadBackError(
                f"{path}: key {found} holds config syntax ('$' expression, '@' reference, '%' "
                "macro or '_target_'), which is never evaluated from a file; give it again on "
                f"the command line (--set {key}=...) to use it"
            )
        if key in write_paths:
            raise ReadBackError(
                f"{path}: key {key!r} names a place to write to ({json.dumps(value)[:80]}), "
                f"which a file may not choose; give it again on the command line (--set "
                f"{key}=...) to use it"
            )
        try:
            out[key] = checks[key](value)
        except (ValueError, TypeError) as exc:
            raise ReadBackError(f"{path}: key {key!r} must be {exc}") from None
    return out


def _run_marker(key: str, value: Any, path: str | Path) -> Any:
    if key == "__demo__" and isinstance(value, bool):
        return value
    if key == "__recipe__" and (
        value is None or (isinstance(value, str) and _PLAIN_ID.match(value.replace("-", "_")))
    ):
        return value
    if key == "__task__" and value in TASKS:
        return value
    raise ReadBackError(f"{path}: key {key!r} holds {json.dumps(value)[:60]}: not a valid value")


def _check_fields(
    value: Any,
    path: str | Path,
    fields: Mapping[str, Callable[[Any], Any]],
    what: str,
    optional: Iterable[str] = (),
) -> dict[str, Any]:
    """``value`` as exactly ``fields`` (key -> check); keys in ``optional`` may be absent or
    null (files written before they existed) and read as ``None``."""
    if not isinstance(value, Mapping):
        raise ReadBackError(f"{path}: expected {what} (a JSON object), got {_kind(value)}")
    optional = set(optional)
    out: dict[str, Any] = {}
    for key, check in fields.items():
        if key in optional and value.get(key) is None:
            out[key] = None
            continue
        if key not in value:
            raise ReadBackError(f"{path}: key {key!r} is missing")
        try:
            out[key] = check(value[key])
        except (ValueError, TypeError) as exc:
            raise ReadBackError(f"{path}: key {key!r} must be {exc}") from None
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ReadBackError(f"{path}: key {str(unknown[0])[:80]!r} is not one this file holds")
    return out


def number(lo: float = -math.inf, hi: float = math.inf) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"a number, got {_kind(value)}")
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"a finite number in [{lo}, {hi}], got {value}")
        return float(value)

    return check


def count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
        raise ValueError(f"a whole number of at least 0, got {json.dumps(value)[:60]}")
    return int(value)


def _text(max_len: int = 200) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise ValueError(f"text of at most {max_len} characters")
        if value.lstrip().startswith(("$", "@", "%")):
            raise ValueError("text without config syntax ('$', '@', '%')")
        return value

    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


#: cv_calibration.json (``app.training.cross_validation.write_out_of_fold``)
CALIBRATION_FIELDS: dict[str, Callable[[Any], Any]] = {
    "threshold": number(0.0, 1.0),
    "threshold_method": _text(),
    "temperature": number(1e-6, 1e3),
    "threshold_calibrated": number(0.0, 1.0),
    "scans": count,
    "failed": count,
    "nll_before": number(0.0),
    "nll_after": number(0.0),
    "ece_before": number(0.0, 1.0),
    "ece_after": number(0.0, 1.0),
}


def read_calibration(path: str | Path) -> dict[str, Any]:
    """``cv_calibration.json``: threshold, temperature and their out-of-fold figures, checked
    (older files may lack the figures added since; the threshold and temperature are required)."""
    fields = {**CALIBRATION_FIELDS, "threshold_basis": _text(400)}
    required = ("threshold", "temperature", "threshold_calibrated")
    optional = [k for k in fields if k not in required]
    return _check_fields(read_json(path, 1 << 20), path, fields, "a calibration", optional)


def _mean_sd(value: Any) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping) or len(value) > 50:
        raise ValueError("a mapping of metric -> {mean, sd}")
    out = {}
    for name, stat in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"val_[a-z_]{1,40}", name):
            raise ValueError(f"metric names such as 'val_auc', got {str(name)[:60]!r}")
        if not isinstance(stat, Mapping) or set(stat) != {"mean", "sd"}:
            raise ValueError(f"{{mean, sd}} for {name}")
        out[name] = {"mean": number()(stat["mean"]), "sd": number(0.0)(stat["sd"])}
    return out


def _folds(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not 1 <= len(value) <= 100:
        raise ValueError("a list of 1 to 100 folds")
    out = []
    for row in value:
        if not isinstance(row, Mapping):
            raise ValueError("a list of fold records")
        checked: dict[str, Any] = {"fold": count(row.get("fold")), "epoch": count(row.get("epoch"))}
        for key, item in row.items():
            if key in ("fold", "epoch"):
                continue
            if not isinstance(key, str) or not re.fullmatch(r"val_[a-z_]{1,40}", key):
                raise ValueError(f"fold records of 'fold', 'epoch', 'val_*', got {str(key)[:60]!r}")
            checked[key] = _optional(number())(item)
        out.append(checked)
    return out


def _estimate(value: Any) -> dict[str, Any]:
    fields = {"value": number(), "low": number(), "high": number(), "method": _text()}
    if not isinstance(value, Mapping) or set(value) != set(fields):
        raise ValueError(f"an estimate of {', '.join(fields)}")
    return {k: check(value[k]) for k, check in fields.items()}


def _baseline(value: Any) -> dict[str, Any]:
    keys = ("baseline_auc", "model_auc", "difference")
    if not isinstance(value, Mapping) or set(value) != {"scans", *keys}:
        raise ValueError("a mapping of scans, baseline_auc, model_auc, difference")
    return {"scans": count(value["scans"]), **{k: _estimate(value[k]) for k in keys}}


def read_cv_summary(path: str | Path) -> dict[str, Any]:
    """``cv_summary.json``: per fold the kept epoch's validation metrics; their mean and sd;
    the density baseline's out-of-fold comparison (``None`` in older files)."""
    return _check_fields(
        read_json(path, 1 << 20),
        path,
        {"folds": _folds, "mean_sd": _mean_sd, "baseline": _baseline},
        "a summary",
        optional=["baseline"],
    )


def _items(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError("a list of {image, label} entries")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or set(item) != {"image", "label"}:
            raise ValueError(f"{{image, label}} entries; entry {i + 1} is not")
        image, label = item["image"], item["label"]
        if not isinstance(image, str) or not image or len(image) > 4096 or "\0" in image:
            raise ValueError(f"entries whose image is a path; entry {i + 1}'s is not")
        if isinstance(label, bool) or label not in range(MAX_GRADES):
            raise ValueError(
                f"entries whose label is 0 or 1 (a severity run's: a grade from 0 to "
                f"{MAX_GRADES - 1}); entry {i + 1}'s is not"
            )
        out.append({"image": image, "label": int(label)})
    return out


def _record(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or set(value) != set(SPLIT_RECORD):
        raise ValueError(f"a mapping of {', '.join(SPLIT_RECORD)}")
    return {k: check(value[k]) for k, check in SPLIT_RECORD.items()}


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**63:
        raise ValueError(f"a whole number, got {json.dumps(value)[:60]}")
    return int(value)


#: how a run's split was made (recorded in split.json; a resume must make the same)
SPLIT_RECORD: dict[str, Callable[[Any], Any]] = {
    "seed": _int,
    "folds": count,
    "fold": count,
    "train_fraction": number(0.0, 1.0),
    "dataset_dir": _text(4096),
}


def read_split(path: str | Path) -> dict[str, Any]:
    """A run's ``split.json``: the ``training`` and ``validation`` entries, ``record`` (how
    the split was made) and ``base`` (the working folder the training ran in; ``None`` in files
    written before they were recorded). Relative image paths, and the record's
    ``dataset_dir``, come back resolved against ``base``: the files they named when recorded,
    wherever the split is read from."""

    split = _check_fields(
        read_json(path),
        path,
        {"training": _items, "validation": _items, "record": _record, "base": _absolute},
        "a split",
        optional=["record", "base"],
    )
    base = split["base"]
    if base is not None:
        for part in ("training", "validation"):
            for item in split[part]:
                item["image"] = os.path.join(base, item["image"])
        if split["record"] is not None:
            record = split["record"]
            record["dataset_dir"] = os.path.join(base, record["dataset_dir"])
    return split


def _absolute(value: Any) -> str:

    text = _text(4096)(value)
    if "\0" in text or not os.path.isabs(text):
        raise ValueError(f"an absolute folder, got {text[:80]!r}")
    return text


def read_finished(path: str | Path) -> dict[str, Any]:
    """A run's ``finished.json``: the epoch its training ended at, and why."""
    return _check_fields(
        read_json(path, 1 << 16), path, {"epoch": count, "reason": _text(400)}, "a record"
    )
