"""Checkpoints for benchmarks: the spec network with random weights, settings from the configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_spec_checkpoint(path: str | Path, **overrides: Any) -> Path:
    """Save a checkpoint as app.train writes it (network + run settings); ``overrides`` change
    config ids, e.g. ``spatial_size=[48, 48, 48]``."""
    from app.config import load_config
    from app.model_settings import MODEL_SETTINGS

    parser = load_config("inference.yaml", overrides=overrides)
    settings = {key: parser.get_parsed_content(key) for key in (*MODEL_SETTINGS, "threshold")}
    network = parser.get_parsed_content("network_def")
    torch.save({"network": network.state_dict(), "run_info": settings}, path)
    return Path(path)
