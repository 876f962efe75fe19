"""Multi-process training helpers (``torchrun ... -m app.train``), built on ``ignite.distributed``."""

from __future__ import annotations

import os

import ignite.distributed as idist


def launched_distributed() -> bool:
    """True under ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank: from the process group when there is one, else from the launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(idist.get_rank())
    return int(os.environ.get("RANK", "0"))
