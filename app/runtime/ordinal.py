"""Severity grades from a severity network's cumulative probabilities.

A severity network (``nets.cnn3d.CNN3D`` with ``grades`` above 2) gives ``grades - 1``
cumulative logits per scan, column ``k`` the logit of P(grade > k); the first is P(abnormal)'s,
so a binary model's reader reads it alike. This module turns the cumulative probabilities into
a probability per grade and one grade per scan: the median of that distribution, the grade
that minimises the expected absolute grade error (and CORAL's own rule, the number of
boundaries passed with probability above 0.5, where the probabilities fall with ``k``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform


def grade_probabilities(cumulative: torch.Tensor) -> torch.Tensor:
    """P(grade = k) for each of ``grades`` from (..., grades - 1) cumulative probabilities
    P(grade > k). They are first made to fall with ``k`` (each at most the one before), so every
    grade's probability is at least 0 and they sum to 1."""
    falling = torch.cummin(cumulative, dim=-1).values
    ones = torch.ones_like(falling[..., :1])
    upper = torch.cat([ones, falling], dim=-1)
    lower = torch.cat([falling, torch.zeros_like(ones)], dim=-1)
    return upper - lower


def median_grade(probabilities: torch.Tensor) -> torch.Tensor:
    """The median grade of (..., grades) probabilities: the first grade whose cumulative
    probability reaches 0.5."""
    reached = torch.cumsum(probabilities, dim=-1) >= 0.5 - 1e-9
    return reached.float().argmax(dim=-1)


def grades_of(probabilities: Any) -> np.ndarray:
    """:func:`median_grade` of (scans, grades) probabilities (an array or nested lists), as
    integers."""
    return median_grade(torch.as_tensor(np.asarray(probabilities, float))).numpy().astype(int)


class SeverityViewd(MapTransform):
    """After the sigmoid of the postprocessing: a severity network's cumulative probabilities
    (``pred`` with more than one value per scan) become ``grade_probs`` (one per grade) and
    ``grade`` (the median grade, one-hot, as ignite's ``Accuracy`` reads it), and ``pred``
    keeps P(abnormal) alone, the binary view every other reader takes. A binary network's one
    probability passes untouched. Works on one scan (grades - 1,) or a batch (n, grades - 1).

    Args:
        keys: the key of the probabilities (``pred``).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            cumulative = torch.as_tensor(d[key])
            if cumulative.shape[-1] < 2:
                continue
            probs = grade_probabilities(cumulative)
            d["grade_probs"] = probs
            d["grade"] = torch.nn.functional.one_hot(median_grade(probs), probs.shape[-1]).to(
                probs.dtype
            )
            d[key] = cumulative[..., :1]
        return d
