"""What ``reuse_freed_memory`` changes: page faults, time and peak RSS per training step.

    python -m benchmarks.page_faults [--precision fp32]   # with and without, alternating

Each setting runs in its own process (the allocator setting is process-wide): 8 training steps
of the spec network at batch 2, 128x128x64, in ``--precision``, channels-last; prints JSON
with the minor page faults and seconds of each step and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STEPS = """
import json, resource, sys, time
import torch
from app.runtime.allocator import reuse_freed_memory
from app.runtime.inferers import resolve_precision
from nets.cnn3d import CNN3D
applied = reuse_freed_memory(sys.argv[1] == "on")
bf16 = resolve_precision(sys.argv[3], "cpu") == "bf16"
torch.manual_seed(0)
net = CNN3D().train().to(memory_format=torch.channels_last_3d)
x = torch.rand(2, 1, 128, 128, 64).contiguous(memory_format=torch.channels_last_3d)
y = torch.tensor([[0.0], [1.0]])
opt = torch.optim.Adam(net.parameters(), 1e-4, fused=True)
faults, seconds = [], []
for _ in range(int(sys.argv[2])):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = net(x)
    torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y).backward()
    opt.step()
    seconds.append(round(time.perf_counter() - t0, 3))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"applied": applied, "bf16": bf16, "faults": faults, "seconds": seconds,
                  "peak_rss_mb": round(peak)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args(argv)
    code = STEPS
    results: dict[str, list] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            out = subprocess.run(
                [sys.executable, "-c", code, mode, str(args.steps), args.precision],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,  # the child imports this checkout's app (python -c: the folder is on its path)
            ).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
