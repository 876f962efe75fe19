"""Load the reference Keras network's weights (``reference_3dcnn_*.npz``) into :class:`CNN3D`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .cnn3d import CNN3D


def keras_to_state_dict(arrays: Mapping[str, np.ndarray], net: CNN3D) -> dict[str, torch.Tensor]:
    """Map Keras-layout arrays (``conv{i}/kernel``, ``bn{i}/gamma``, ``dense{i}/kernel``...) to
    ``net``'s state dict: conv kernels (kx, ky, kz, cin, cout) -> (cout, cin, kx, ky, kz), dense
    kernels (in, out) -> (out, in)."""
    state: dict[str, torch.Tensor] = {}
    for i, _ in enumerate(net.features):
        prefix = f"features.{i}"
        state[f"{prefix}.conv.weight"] = torch.from_numpy(
            np.ascontiguousarray(np.transpose(arrays[f"conv{i}/kernel"], (4, 3, 0, 1, 2)))
        )
        state[f"{prefix}.conv.bias"] = torch.from_numpy(np.asarray(arrays[f"conv{i}/bias"]))
        state[f"{prefix}.bn.weight"] = torch.from_numpy(np.asarray(arrays[f"bn{i}/gamma"]))
        state[f"{prefix}.bn.bias"] = torch.from_numpy(np.asarray(arrays[f"bn{i}/beta"]))
        state[f"{prefix}.bn.running_mean"] = torch.from_numpy(
            np.asarray(arrays[f"bn{i}/moving_mean"])
        )
        state[f"{prefix}.bn.running_var"] = torch.from_numpy(
            np.asarray(arrays[f"bn{i}/moving_variance"])
        )
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    for i, layer in enumerate((net.head[2], net.head[5])):
        name = "head.2" if i == 0 else "head.5"
        assert isinstance(layer, torch.nn.Linear)
        state[f"{name}.weight"] = torch.from_numpy(
            np.ascontiguousarray(arrays[f"dense{i}/kernel"].T)
        )
        state[f"{name}.bias"] = torch.from_numpy(np.asarray(arrays[f"dense{i}/bias"]))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_keras_weights(net: CNN3D, path: str | Path) -> CNN3D:
    """Load the Keras-layout weights in ``path`` (an ``.npz`` without pickles) into ``net``."""
    with np.load(path, allow_pickle=False) as arrays:
        net.load_state_dict(keras_to_state_dict(arrays, net), strict=True)
    return net
