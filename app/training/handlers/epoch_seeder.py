"""Reseed every random number generator at the start of each epoch, from (seed, epoch)."""

from __future__ import annotations

import random
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events


class EpochSeeder:
    """Make each epoch's shuffling and augmentation a function of (``seed``, epoch) alone.

    The same seed gives the same run, and a run resumed at epoch N draws what an uninterrupted
    one would have drawn for epoch N + 1 onwards (the generators need not be checkpointed).

    Args:
        seed: the run's seed.
        transform: a MONAI ``Randomizable``/``Compose`` (or a list of them) whose random state is
            set too.
    """

    def __init__(self, seed: int, transform: Any = None) -> None:
        self.seed = int(seed)
        self.transform = transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:

        # ranks draw different augmentations; the DistributedSampler shuffles by epoch itself
        epoch_seed = (self.seed * 1_000_003 + engine.state.epoch * 7919 + idist.get_rank()) % (
            2**32
        )
        # not monai's set_determinism: it would also switch off cudnn.benchmark on GPUs
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        transforms = (
            self.transform if isinstance(self.transform, list | tuple) else [self.transform]
        )
        for transform in transforms:
            if transform is not None and hasattr(transform, "set_random_state"):
                transform.set_random_state(seed=epoch_seed)
