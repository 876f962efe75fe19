"""One way of running the spec network, timed in a process of its own (for benchmarks/run.py).

    python -m benchmarks.variants default --steps 5 --calls 8    # prints one JSON line

Variants:
    plain    a plain fp32 PyTorch port (conv -> ReLU -> pool -> BN, contiguous memory, glibc's
             default allocator): what a user porting the Keras example would write.
    default  ``nets.cnn3d.CNN3D`` exactly as ``app.train`` and ``app.infer`` run it on this
             machine by default: the configs' precision (``resolve_precision``: bfloat16 autocast
             on CPUs with AVX512-BF16), channels-last memory, the first block's slab path, and
             ``reuse_freed_memory``.
    fp32     the same with ``--precision fp32``.

Each variant runs in a fresh process because the allocator setting is process-wide. Training:
one Adam step at batch 2 on 128x128x64 (BCE loss), median of ``--steps`` after one warm-up.
Inference: model-only forward at batch 1 under ``inference_mode``, median of ``--calls`` after
two warm-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent

VARIANTS = ("plain", "default", "fp32")


def plain_port() -> nn.Module:
    """A naive fp32 PyTorch port of the spec network, layer order as in Keras."""
    layers: list[nn.Module] = []
    channels = [1, 64, 64, 128, 256]
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [
            nn.Conv3d(c_in, c_out, 3),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01),
        ]
    layers += [
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(512, 1),
    ]
    return nn.Sequential(*layers)


def setup(variant: str) -> dict:
    """The network builder, precision and memory format of a variant (applies its allocator)."""
    if variant == "plain":
        return {"build": plain_port, "bf16": False, "channels_last": False, "precision": "fp32"}
    from app.config import load_config
    from app.runtime.allocator import reuse_freed_memory

    overrides = {"device": "$torch.device('cpu')"}
    if variant == "fp32":
        overrides["precision"] = "fp32"
    parser = load_config("train.yaml", overrides=overrides)
    precision = parser.get_parsed_content("compute_precision")
    reuse = reuse_freed_memory(bool(parser.get_parsed_content("reuse_freed_memory")))
    return {
        "build": lambda: load_config("train.yaml").get_parsed_content("network_def"),
        "bf16": precision == "bf16",
        "channels_last": bool(parser.get_parsed_content("channels_last")),
        "precision": precision,
        "reuse_freed_memory": reuse,
    }


def time_steps(net: nn.Module, steps: int, bf16: bool, channels_last: bool) -> float:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 128, 128, 64)
    y = torch.tensor([[0.0], [1.0]])
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last_3d)
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        if i:  # the first step warms up the allocator and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(net: nn.Module, calls: int, bf16: bool, channels_last: bool) -> float:
    net = net.eval()
    x = torch.rand(1, 1, 128, 128, 64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(calls + 2):
            start = time.perf_counter()
            net(x)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (0: none)")
    parser.add_argument("--calls", type=int, default=8, help="timed forward passes (0: none)")
    args = parser.parse_args(argv)
    v = setup(args.variant)
    result: dict = {
        "variant": args.variant,
        "precision": v["precision"],
        "channels_last": v["channels_last"],
        "reuse_freed_memory": v.get("reuse_freed_memory", False),
        "threads": torch.get_num_threads(),
    }
    if args.steps:
        torch.manual_seed(0)
        result["train_step_s"] = time_steps(v["build"](), args.steps, v["bf16"], v["channels_last"])
    if args.calls:
        torch.manual_seed(0)
        result["infer_model_s"] = latency(v["build"](), args.calls, v["bf16"], v["channels_last"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
