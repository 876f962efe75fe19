"""The app's defaults against the reference's own TensorFlow/Keras, side by side in one run.

    make bench-reference          # makes .venv-reference (tensorflow-cpu), then runs this
    python benchmarks/peer.py --reference-python .venv-reference/bin/python --rounds 2

Alternates, ``--rounds`` times: one training step at batch 2 and one model inference at batch 1
on 128x128x64, exactly as ``app.train`` and ``app.infer`` run them by default on this machine
(the configs' precision and memory format, the first block's slab path), then the same in Keras
graph mode (``benchmarks/keras_reference.py`` in the reference environment). Medians over rounds;
writes ``--out`` (JSON) with the CPU's model name, family and model numbers, and prints the
ratios (app / Keras: below 1 is faster than Keras).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu() -> dict:
    """Model name, family and model numbers from /proc/cpuinfo (Linux)."""
    info = {"model_name": platform.processor() or platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model_name"] = value
        elif key == "cpu family":
            info["family"] = int(value)
        elif key == "model":
            info["model"] = int(value)
        elif key == "flags":
            info["avx512_bf16"] = "avx512_bf16" in value.split()
            break
    return info


def app_defaults(steps: int) -> dict:
    """The default training step and model inference, built from the configs as the app does."""
    import torch
    from run import latency, time_steps

    from app.config import load_config

    train = load_config("train.yaml", overrides={"device": "$torch.device('cpu')"})
    infer = load_config("inference.yaml", overrides={"device": "$torch.device('cpu')"})
    bf16 = bool(train.get_parsed_content("cpu_bf16"))
    torch.manual_seed(0)
    step = time_steps(
        train.get_parsed_content("network_def").train(),
        steps,
        autocast=bf16,
        channels_last=bool(train.get_parsed_content("channels_last")),
    )
    inference = latency(
        infer.get_parsed_content("network_def"),
        bf16=infer.get_parsed_content("precision") == "bf16",
        channels_last=bool(infer.get_parsed_content("channels_last")),
    )
    return {"train_step_default_s": step, "infer_model_default_s": inference, "cpu_bf16": bf16}


def keras(python: str, steps: int) -> dict:
    out = subprocess.run(
        [python, str(REPO / "benchmarks" / "keras_reference.py"), "--steps", str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-python", default=str(REPO / ".venv-reference/bin/python"))
    parser.add_argument("--rounds", type=int, default=2, help="alternations of app and Keras")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per round")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "peer.json")
    args = parser.parse_args(argv)
    if not Path(args.reference_python).exists():
        print(
            f"error: no reference environment at {args.reference_python}: run "
            "`make bench-reference`",
            file=sys.stderr,
        )
        return 2
    rounds: list[dict] = []
    for _ in range(args.rounds):
        rounds.append({**app_defaults(args.steps), **keras(args.reference_python, args.steps)})
    keys = (
        "train_step_default_s",
        "infer_model_default_s",
        "keras_graph_train_step_s",
        "keras_graph_predict_s",
    )
    result = {k: statistics.median(r[k] for r in rounds) for k in keys}
    result["train_ratio_app_over_keras"] = (
        result["train_step_default_s"] / result["keras_graph_train_step_s"]
    )
    result["infer_ratio_app_over_keras"] = (
        result["infer_model_default_s"] / result["keras_graph_predict_s"]
    )
    result.update(
        cpu=cpu(),
        rounds=rounds,
        tensorflow=rounds[0]["tensorflow"],
        command=f"python benchmarks/peer.py --rounds {args.rounds} --steps {args.steps}",
    )
    args.out.write_text(json.dumps(result, indent=1))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (*keys, "train_ratio_app_over_keras", "infer_ratio_app_over_keras", "cpu")
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
