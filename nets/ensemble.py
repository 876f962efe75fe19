"""Several trained networks as one: the mean of their temperature-scaled probabilities."""

from collections.abc import Sequence

import torch
from torch import nn


class MeanProbabilityEnsemble(nn.Module):
    """The mean of ``sigmoid(member(x) / temperature)`` over the members, returned as a logit
    (so ``sigmoid`` of the output is the ensemble's probability, as for one :class:`CNN3D`).

    Cross-validation (``app.train --folds K``) gives K fold models and the temperature fitted on
    their out-of-fold logits; this runs them as one network.

    Args:
        members: networks of the same input and one logit per scan.
        temperature: divides each member's logit before the sigmoid (1: no scaling).
    """

    def __init__(self, members: Sequence[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if not temperature > 0:
            raise ValueError(f"temperature must be above 0, got {temperature}")
        self.members = nn.ModuleList(members)
        self.temperature = float(temperature)

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(members, batch, 1) temperature-scaled probabilities."""
        probs: list[torch.Tensor] = []
        for member in self.members:  # a loop: TorchScript unrolls it
            probs.append(torch.sigmoid(member(x).float() / self.temperature))
        return torch.stack(probs)

    def combine(self, member_probs: torch.Tensor) -> torch.Tensor:
        """The ensemble's logit from :meth:`member_probabilities`' output."""
        p = member_probs.mean(0).clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)  # the logit, in ops every exporter knows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_probabilities(x))
