"""Engine building blocks the bundle configs name: batch preparation and run bookkeeping."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch


class PrepareBinaryBatch(PrepareBatch):
    """(image, label) on ``device`` for MONAI's engines; the label becomes float (B, 1), as
    ``BCEWithLogitsLoss`` wants it next to one logit per scan.

    Args:
        image_key: batch key of the images.
        label_key: batch key of the labels (absent at inference: ``None`` is returned).
        augment: applied to the image batch once it is on ``device`` (e.g.
            :class:`transforms.augment.BatchAxialRotation`: augmentation on the GPU), or a list
            of them applied in turn (``None`` entries skipped).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        augment: Callable[[torch.Tensor], torch.Tensor]
        | Sequence[Callable[[torch.Tensor], torch.Tensor] | None]
        | None = None,
    ) -> None:
        self.image_key = image_key
        self.label_key = label_key
        steps = augment if isinstance(augment, Sequence) else [augment]
        self.augment = [step for step in steps if step is not None]

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = torch.as_tensor(batchdata[self.image_key])
        image = image.to(device=device, non_blocking=non_blocking)
        for step in self.augment:
            image = step(image)
        label = batchdata.get(self.label_key)
        if label is None:
            return image, None
        label = torch.as_tensor(label).to(device=device, non_blocking=non_blocking)
        return image, label.float().view(-1, 1)


class RunInfo:
    """What a checkpoint needs to explain itself: the resolved settings of its run.

    Saved with the network so that inference rebuilds the model (spatial size, filters, HU window,
    threshold...) from the checkpoint, never from guesses. JSON-like values only, so checkpoints
    load with ``torch.load(..., weights_only=True)``.

    Args:
        settings: setting name -> value (numbers, strings, lists, dicts).
    """

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings: dict[str, Any] = dict(settings or {})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.settings = dict(state)


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
