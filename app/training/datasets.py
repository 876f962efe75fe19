"""Datasets with the deterministic preprocessing cached in memory, on disk, or not at all."""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, EnsureTyped, ToDeviced

from app.errors import ConfigError

CACHE_MODES = ("memory", "device", "disk", "none")


def _item_hash(item: Any) -> bytes:
    """Key a cached scan by its path, size and modification time, so an edited file is redone."""
    image = str(item["image"]) if isinstance(item, dict) else str(item)
    try:
        st = os.stat(image)
        stamp = f"{image}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        stamp = image
    return hashlib.sha1(stamp.encode()).hexdigest().encode()


def _stable_value(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-ready plain data that is the same in every process: no ``repr()`` of
    objects (it holds memory addresses), only their type names and plain attributes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _stable_value(value.value, depth)
    if isinstance(value, (list, tuple)):
        return [_stable_value(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _stable_value(v, depth + 1) for k, v in sorted(value.items(), key=str)}
    if isinstance(value, np.ndarray) and value.size <= 64:
        return _stable_value(value.tolist(), depth)
    if isinstance(value, (np.generic, np.dtype, torch.dtype, torch.device)):
        return str(value)
    kind = type(value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, type) or callable(value) and not hasattr(value, "__dict__"):
        return getattr(value, "__qualname__", name)
    if depth >= 4 or not hasattr(value, "__dict__"):
        return name
    fields = {
        k: _stable_value(v, depth + 1)
        for k, v in sorted(vars(value).items())
        if not k.startswith("__") and k not in ("R", "_rand_state", "filenames")  # run-time state
    }
    return {"type": name, **fields}


def settings_key(transform: Compose) -> str:
    """A short hash of the deterministic transforms' settings: new settings, new cache folder.

    Stable across processes and runs (built from plain settings, never from ``repr()``), so a
    second run with the same data and settings reuses the disk cache of the first.
    """
    parts = []
    for t in transform.transforms:
        if getattr(t, "R", None) is not None:  # random transforms are not cached
            break
        parts.append(_stable_value(t))
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def make_dataset(
    data: Sequence[dict[str, Any]],
    transform: Compose,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
) -> Dataset:
    """Wrap ``data`` with ``transform``, caching the deterministic prefix as ``cache`` says.

    Args:
        data: MONAI datalist (``image``, ``label``).
        transform: the full chain; everything before its first random transform is cached.
        cache: ``memory`` (``CacheDataset``), ``device`` (``CacheDataset`` whose cached volumes
            live on ``device``: GPU memory when training on a GPU, so an epoch never copies scans
            to it; the data loader must then run in the main process), ``disk``
            (``PersistentDataset`` under ``cache_dir/<settings hash>``) or ``none``.
        cache_dir: folder of the disk cache.
        num_workers: threads that fill the memory cache.
        progress: show a progress bar while filling the memory cache.
        device: where ``cache: device`` keeps the cached volumes.
        keys: the volumes ``cache: device`` moves there.
        label_keys: labels ``cache: device`` caches there as tensors too, so a training step
            never copies a label from pageable host memory (a synchronisation per step).
    """
    if cache == "device":
        steps = list(transform.transforms)
        first_random = next(
            (i for i, t in enumerate(steps) if getattr(t, "R", None) is not None), len(steps)
        )
        to_device: list[Any] = [ToDeviced(keys=[*keys, *label_keys], device=device)]
        if label_keys:
            to_device.insert(
                0, EnsureTyped(keys=list(label_keys), data_type="tensor", track_meta=False)
            )
        steps[first_random:first_random] = to_device
        return CacheDataset(
            data, Compose(steps), num_workers=num_workers or None, progress=progress
        )
    if cache == "memory":
        return CacheDataset(data, transform, num_workers=num_workers or None, progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError("cache 'disk' needs a cache_dir")
        folder = Path(cache_dir) / settings_key(transform)
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=folder, hash_func=_item_hash)
    if cache == "none":
        return Dataset(data, transform)
    raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
