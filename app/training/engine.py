"""Engine building blocks the bundle configs name: batch preparation and run bookkeeping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
            :class:`transforms.augment.BatchAxialRotation`: augmentation on the GPU).
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.image_key = image_key
        self.label_key = label_key
        self.augment = augment

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = torch.as_tensor(batchdata[self.image_key])
        image = image.to(device=device, non_blocking=non_blocking)
        if self.augment is not None:
            image = self.augment(image)
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
