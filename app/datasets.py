"""Datasets with the deterministic preprocessing cached in memory, on disk, or not at all."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, ToDeviced

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


def _settings_key(transform: Compose) -> str:
    """A short hash of the deterministic transforms' settings: new settings, new cache folder."""
    parts = []
    for t in transform.transforms:
        if getattr(t, "R", None) is not None:  # random transforms are not cached
            break
        fields = {k: repr(v) for k, v in sorted(vars(t).items()) if not k.startswith("_")}
        parts.append([type(t).__name__, fields])
    return hashlib.sha1(json.dumps(parts, default=repr).encode()).hexdigest()[:12]


def make_dataset(
    data: Sequence[dict[str, Any]],
    transform: Compose,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    keys: Sequence[str] = ("image",),
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
    """
    if cache == "device":
        steps = list(transform.transforms)
        first_random = next(
            (i for i, t in enumerate(steps) if getattr(t, "R", None) is not None), len(steps)
        )
        steps.insert(first_random, ToDeviced(keys=list(keys), device=device))
        return CacheDataset(
            data, Compose(steps), num_workers=num_workers or None, progress=progress
        )
    if cache == "memory":
        return CacheDataset(data, transform, num_workers=num_workers or None, progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError("cache 'disk' needs a cache_dir")
        folder = Path(cache_dir) / _settings_key(transform)
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=folder, hash_func=_item_hash)
    if cache == "none":
        return Dataset(data, transform)
    raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
