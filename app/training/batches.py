"""The batch preparation ``train.yaml`` names for MONAI's engines: (image, label) on the device,
the label as BCEWithLogitsLoss wants it."""

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
