"""The run's record a checkpoint carries (``train.yaml``'s ``run_info``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
