"""Multi-process training helpers (``torchrun ... -m app.train``), built on ``ignite.distributed``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist

from app.config import load_config


def launched_distributed() -> bool:
    """True under ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank: from the process group when there is one, else from the launcher."""

    if dist.is_available() and dist.is_initialized():
        return int(idist.get_rank())
    return int(os.environ.get("RANK", "0"))


def join_process_group(backend: str, device: Any) -> None:
    """Join the process group (once; later calls do nothing), this process's GPU selected
    first: NCCL's first collective call needs it. The one place that initialises the group:
    ``app.train`` calls it before it touches the run folder, ``multi_gpu_train.yaml``'s
    ``initialize`` for ``monai.bundle run``."""

    if dist.is_initialized():
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def init_process_group(config_dir: Path, device: str | None = None) -> None:
    """Join the process group before any file work, with the backend and device
    multi_gpu_train.yaml chooses (``device``: a ``--device`` override)."""

    parser = load_config(
        "train.yaml",
        "multi_gpu_train.yaml",
        overrides={"device": device} if device else None,
        config_dir=config_dir,
    )
    join_process_group(parser.get_parsed_content("backend"), parser.get_parsed_content("device"))


def leave_process_group() -> None:

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
