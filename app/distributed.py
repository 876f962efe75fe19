"""Multi-process training helpers (``torchrun ... -m app.train``), built on ``ignite.distributed``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist

#: handler types that write files or logs: only rank 0 keeps them
RANK_ZERO_ONLY = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "ProgressBar",
    "RunRecorder",
    "TrainerCheckpointSaver",
    "CheckpointSaver",
    "AtomicCheckpointSaver",
)


def launched_distributed() -> bool:
    """True under ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank: from the process group when there is one, else from the launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(idist.get_rank())
    return int(os.environ.get("RANK", "0"))


def rank_zero_filter(handlers: Sequence[Any]) -> list[Any]:
    """``handlers`` without the file-writing ones on ranks other than 0 (chosen by type name)."""
    if rank() == 0:
        return list(handlers)
    return [h for h in handlers if type(h).__name__ not in RANK_ZERO_ONLY]
