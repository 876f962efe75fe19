"""How the network is run: memory format and autocast, for training, the app and the bundle."""

from __future__ import annotations

from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16")


class MixedPrecisionInferer:
    """Run the network with channels-last memory and, optionally, bfloat16 autocast.

    oneDNN's 3D convolutions are faster on channels-last (NDHWC) tensors on the CPU
    (``docs/benchmarks.md`` has the figures), in full float32. MONAI's engines autocast to
    float16 on CUDA themselves (``amp``); ``bf16`` adds bfloat16 autocast on any device (fast on
    CPUs with AVX512-BF16). Outputs are returned as float32, so losses, probabilities and
    metrics stay in full precision.

    Args:
        bf16: use bfloat16 autocast.
        channels_last: pass 5D inputs in channels-last memory on the CPU (match the network's
            memory format).
    """

    def __init__(self, bf16: bool = False, channels_last: bool = True) -> None:
        self.bf16 = bool(bf16)
        self.channels_last = bool(channels_last)

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any
    ) -> Any:
        if self.channels_last and inputs.dim() == 5 and inputs.device.type == "cpu":
            inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
        if not self.bf16:
            return network(inputs, *args, **kwargs)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
            out = network(inputs, *args, **kwargs)
        return out.float()
