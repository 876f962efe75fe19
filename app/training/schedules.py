"""The learning-rate schedules ``train.yaml`` builds (``lr_scheduler``)."""

from __future__ import annotations

import torch

#: learning-rate schedules ``make_lr_scheduler`` builds
LR_SCHEDULES = ("step", "cosine")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    step_size: int,
    gamma: float,
    total_steps: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped every iteration.

    Args:
        optimizer: the optimizer whose learning rate it sets.
        schedule: ``step``, Keras' staircase exponential decay (``gamma`` every ``step_size``
            iterations: the reference's), or ``cosine``, cosine annealing from the optimizer's
            rate to 0 over ``total_steps`` iterations (the run's epochs times its batches).
        step_size: iterations between decays (``step``).
        gamma: factor of each decay (``step``).
        total_steps: iterations of the whole run (``cosine``).
    """
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
