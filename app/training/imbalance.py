"""Imbalanced cohorts: weighting the loss by class, or drawing the classes equally often.

MosMedData's real proportions give a normal-vs-abnormal split of 254 against 856. Two settings
(``configs/train.yaml``), each recorded in the checkpoint:

- ``class_weighting: pos_weight``: ``BCEWithLogitsLoss(pos_weight = normal / abnormal)`` over
  the training split: each class weighs the same in the loss (``none``: the reference's).
- ``sampler: weighted``: MONAI's ``DistributedWeightedRandomSampler`` draws each training scan
  with probability inverse to its class's size, as many draws an epoch as there are scans, so
  each class is seen about equally often (``shuffle``: the reference's).

The operating point is then chosen on the validation split as it is (``app.training.
operating_point``): under the imbalance, not after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import ConfigError

__all__ = ["CLASS_WEIGHTINGS", "SAMPLERS", "class_counts", "make_loss", "make_sampler"]

#: how the loss weighs the classes
CLASS_WEIGHTINGS = ("none", "pos_weight")
#: how each epoch's scans are drawn
SAMPLERS = ("shuffle", "weighted")


def class_counts(items: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(normal, abnormal) scans of a datalist (``label`` 0 normal; any grade above, abnormal)."""
    labels = [int(item["label"]) for item in items]
    return labels.count(0), len(labels) - labels.count(0)


def make_loss(
    class_weighting: str,
    items: Sequence[dict[str, Any]],
    device: Any = "cpu",
    grades: int = 2,
    ordinal_head: str = "softmax",
) -> Any:
    """The training loss: ``BCEWithLogitsLoss``, with ``pos_weight = normal / abnormal`` of
    ``items`` for ``class_weighting`` ``pos_weight``. With ``grades`` above 2, the severity
    head's :class:`app.training.severity.OrdinalLoss`, ``pos_weight`` then weighing each grade
    by the inverse of its share of ``items`` (every grade present weighs the same in all).

    Raises:
        ConfigError: an unknown weighting, or ``pos_weight`` on a split lacking a class.
    """
    import torch

    if class_weighting not in CLASS_WEIGHTINGS:
        raise ConfigError(f"class_weighting must be one of {', '.join(CLASS_WEIGHTINGS)}")
    if grades > 2:
        from app.training.severity import OrdinalLoss

        if class_weighting == "none":
            return OrdinalLoss(ordinal_head)
        labels = [int(item["label"]) for item in items]
        present = sum(1 for k in range(grades) if labels.count(k))
        weights = [len(labels) / (present * labels.count(k)) if labels.count(k) else 0.0
                   for k in range(grades)]  # fmt: skip
        return OrdinalLoss(ordinal_head, weights)
    if class_weighting == "none":
        return torch.nn.BCEWithLogitsLoss()
    normal, abnormal = class_counts(items)
    if not (normal and abnormal):
        raise ConfigError(
            f"class_weighting pos_weight needs both classes in the training split "
            f"({normal} normal, {abnormal} abnormal)"
        )
    weight = torch.tensor([normal / abnormal], dtype=torch.float32, device=device)
    return torch.nn.BCEWithLogitsLoss(pos_weight=weight)


def make_sampler(sampler: str, dataset: Any, items: Sequence[dict[str, Any]], seed: int) -> Any:
    """``None`` for ``shuffle`` (the data loader shuffles); for ``weighted`` MONAI's
    ``DistributedWeightedRandomSampler`` over ``dataset`` (this process's share under torchrun:
    ``items`` are its items), each scan weighted by the inverse of its class's size (a severity
    grade's, for a severity run), seeded.

    Raises:
        ConfigError: an unknown sampler, or ``weighted`` on a share lacking a class.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}")
    if sampler == "shuffle":
        return None
    import torch
    from monai.data import DistributedWeightedRandomSampler

    normal, abnormal = class_counts(items)
    if not (normal and abnormal):
        raise ConfigError(
            f"sampler weighted needs both classes in the training split ({normal} normal, "
            f"{abnormal} abnormal)"
        )
    labels = [int(item["label"]) for item in items]
    weights = [1.0 / labels.count(label) for label in labels]  # binary: normal or abnormal
    generator = torch.Generator().manual_seed(int(seed))
    # one process's share (torchrun partitions the list before): no replicas of its own
    return DistributedWeightedRandomSampler(
        dataset, weights, generator=generator, num_replicas=1, rank=0, shuffle=False
    )
