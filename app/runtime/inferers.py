"""How the network is run: memory format and autocast, for training, the app and the bundle."""

from __future__ import annotations

from typing import Any

import torch

from . import PRECISIONS


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Native bfloat16 dot products on this CPU (AVX512-BF16: AMD Zen 4 and newer, Intel Cooper
    Lake and Sapphire Rapids; AMX-BF16). oneDNN emulates bfloat16 elsewhere, slower than float32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """What ``precision`` means on ``device``: ``fp32``, ``bf16`` or ``fp16`` (autocast dtypes).

    ``auto`` is bfloat16 where the hardware computes it natively (CPUs with AVX512-BF16 or AMX,
    CUDA GPUs with bfloat16: no gradient scaling needed), float16 on older GPUs (MONAI's ``amp``
    with a GradScaler), float32 elsewhere. ``fp16`` needs CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision != "auto":
        return precision
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


class MixedPrecisionInferer:
    """Run the network with channels-last memory and, optionally, bfloat16 autocast.

    oneDNN's 3D convolutions are faster on channels-last (NDHWC) tensors on the CPU
    (``docs/benchmarks.md`` has the figures). ``bf16`` adds bfloat16 autocast on any device (the
    default where the hardware has it: ``resolve_precision``); MONAI's engines autocast to
    float16 themselves (``amp``). Outputs are returned as float32, so losses, probabilities and
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
