"""Severity grading in training: the ordinal losses and the metrics' views of a batch.

A severity network gives ``grades - 1`` cumulative logits per scan (``nets.cnn3d.
CumulativeLogits``), column ``k`` the logit of P(grade > k). Two losses, one per head:

- ``coral``: the mean over the boundaries of the binary cross-entropy of P(grade > k) against
  [grade > k] (Cao, Mirjalili and Raschka, "Rank consistent ordinal regression", 2020): a
  grade one off costs one boundary, a grade three off three.
- ``softmax``: the cross-entropy of the grade's own probability (P(grade > k - 1) - P(grade > k)):
  every wrong grade costs alike, the order is not used.

The labels come as :class:`app.training.batches.PrepareBinaryBatch` gives them, float (B, 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from app.runtime.ordinal import grade_probabilities

__all__ = [
    "OrdinalLoss",
    "binary_label_output",
    "binary_output",
    "grade_index_output",
    "grade_output",
]


class OrdinalLoss(torch.nn.Module):
    """The loss of a severity network's cumulative logits against integer grades.

    Args:
        head: ``coral`` or ``softmax`` (see the module).
        class_weights: optional weight per grade (each scan's loss times its grade's weight,
            then the weighted mean).
    """

    def __init__(self, head: str = "softmax", class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.head = head
        self.class_weights = None if class_weights is None else torch.tensor(class_weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        grades = labels.reshape(-1).long()
        logits = logits.float()
        if self.head == "coral":
            boundaries = torch.arange(logits.shape[1], device=logits.device)
            targets = (grades[:, None] > boundaries[None, :]).float()
            per_scan = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, targets, reduction="none"
            ).mean(dim=1)
        else:
            probs = grade_probabilities(torch.sigmoid(logits))
            own = probs.gather(1, grades[:, None])[:, 0]
            per_scan = -torch.log(own.clamp_min(1e-7))
        if self.class_weights is None:
            return per_scan.mean()
        weights = self.class_weights.to(per_scan.device)[grades]
        return (per_scan * weights).sum() / weights.sum()


def _pick(output: Any, key: str) -> torch.Tensor:
    """``key`` of an engine's output: a dict (``decollate: false``) or a list of dicts."""
    if isinstance(output, Mapping):
        return torch.as_tensor(output[key])
    return torch.stack([torch.as_tensor(item[key]) for item in output])


def grade_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(the median grade one-hot, the grade) for ignite's ``Accuracy``: exact grades."""
    return _pick(output, "grade"), _pick(output, "label").reshape(-1).long()


def grade_index_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(the median grade, the grade) as floats, for ``MeanAbsoluteError``."""
    grade = _pick(output, "grade").argmax(dim=-1).float()
    return grade, _pick(output, "label").reshape(-1).float()


def binary_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(abnormal), [grade > 0]): the binary view, for ROC-AUC."""
    return _pick(output, "prob").reshape(-1), (_pick(output, "label").reshape(-1) > 0).long()


def binary_label_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(abnormal at the threshold, [grade > 0]) as (B, 1), for the confusion matrix's
    sensitivity and specificity."""
    pred = _pick(output, "pred").reshape(-1, 1)
    return pred, (_pick(output, "label").reshape(-1, 1) > 0).to(pred.dtype)
