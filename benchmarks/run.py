"""Benchmarks, side by side in one process: writes benchmarks/results.json and docs/benchmarks.md.

    python benchmarks/run.py                # about 3 minutes on 2 CPU cores
    python benchmarks/run.py --scans 8 --steps 8

(a) preprocessing per MosMed-sized scan (512x512x40 int16 .nii.gz, LAS): ours vs the reference
    pipeline (scipy clip/scale, ndimage.rotate(90, reshape=False), ndimage.zoom(order=1)),
    alternating, median per-scan ratio, and the largest output difference;
(b) one training step at batch 2, 128x128x64: our network (fp32, and bf16 autocast where the
    CPU has it) vs a plain fp32 PyTorch port of the same network (conv -> ReLU -> pool -> BN);
(c) inference: model-only latency per scan, and scans per second through app.classifier for a
    folder of scans (reading and preprocessing included).
GPU figures are not measured here (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from checkpoints import write_spec_checkpoint
from scipy import ndimage
from torch import nn

REPO = Path(__file__).resolve().parent.parent


def reference_process_scan(path: str) -> np.ndarray:
    """The Keras example's read_nifti_file + normalize + resize_volume, as the baseline."""
    volume = nib.load(path).get_fdata()
    volume[volume < -1000] = -1000
    volume[volume > 400] = 400
    volume = ((volume + 1000) / 1400).astype("float32")
    volume = ndimage.rotate(volume, 90, reshape=False)
    w, h, d = volume.shape
    return ndimage.zoom(volume, (128 / w, 128 / h, 64 / d), order=1)


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


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in out.splitlines()
                if line.startswith("Model name")
            ),
            "",
        )
    except OSError:
        model = ""
    return f"{model or platform.processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def bench_preprocessing(scans: list[str]) -> dict:
    from app.config import load_config

    ours_chain = load_config("inference.yaml").get_parsed_content("preprocessing")
    ours_t, ref_t, diffs = [], [], []
    for path in scans:  # alternate, same process
        t = time.perf_counter()
        ref = reference_process_scan(path)
        ref_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = ours_chain({"image": path})["image"][0].numpy()
        ours_t.append(time.perf_counter() - t)
        diffs.append(float(np.abs(ours - ref).max()))
    ratios = [r / o for r, o in zip(ref_t, ours_t, strict=True)]
    return {
        "reference_s_per_scan": statistics.median(ref_t),
        "ours_s_per_scan": statistics.median(ours_t),
        "median_speedup": statistics.median(ratios),
        "max_abs_diff": max(diffs),
        "scans": len(scans),
    }


def time_steps(
    net: nn.Module, steps: int, autocast: bool = False, channels_last: bool = False
) -> float:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 128, 128, 64)
    y = torch.tensor([[0.0], [1.0]])
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(net(x).float(), y)
        loss.backward()
        opt.step()
        if i:  # the first step warms up the allocator and kernels
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_training(steps: int) -> dict:
    from nets.cnn3d import CNN3D

    torch.manual_seed(0)
    result = {
        "plain_fp32_s_per_step": time_steps(plain_port().train(), steps),
        "ours_fp32_s_per_step": time_steps(CNN3D().train(), steps),
        "ours_bf16_channels_last_s_per_step": time_steps(
            CNN3D().train(), steps, autocast=True, channels_last=True
        ),
    }
    result["speedup_fp32"] = result["plain_fp32_s_per_step"] / result["ours_fp32_s_per_step"]
    return result


def bench_inference(scans: list[str], ckpt: Path) -> dict:
    from app.classifier import Classifier
    from nets.cnn3d import CNN3D

    def latency(bf16: bool) -> float:
        net = CNN3D().eval()
        x = torch.rand(1, 1, 128, 128, 64)
        if bf16:
            net = net.to(memory_format=torch.channels_last_3d)
            x = x.to(memory_format=torch.channels_last_3d)
        times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(6):
                t = time.perf_counter()
                net(x)
                if i:
                    times.append(time.perf_counter() - t)
        return statistics.median(times)

    fp32_latency, bf16_latency = latency(False), latency(True)
    clf = Classifier.load(ckpt, device="cpu")
    t = time.perf_counter()
    preds = list(clf.predict_many(scans, batch_size=2))
    elapsed = time.perf_counter() - t
    assert all(p.ok for p in preds)
    return {
        "model_only_s_per_scan": fp32_latency,
        "model_only_bf16_s_per_scan": bf16_latency,
        "end_to_end_scans_per_s": len(scans) / elapsed,
        "end_to_end_scans": len(scans),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=6, help="MosMed-sized scans to generate")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.json")
    args = parser.parse_args(argv)
    from app.engine import RunInfo  # noqa: F401  (import check before the long work)
    from app.synth import generate_scan, save_scan, scan_seed

    with tempfile.TemporaryDirectory() as tmp:
        scans = []
        for i in range(args.scans):
            scan = generate_scan(i % 2, scan_seed(0, i), shape=(512, 512, 40))
            path = Path(tmp) / f"scan{i}.nii.gz"
            save_scan(scan, path)
            scans.append(str(path))
        ckpt = write_spec_checkpoint(Path(tmp) / "model.pt")
        results = {
            "machine": machine(),
            "preprocessing": bench_preprocessing(scans),
            "training_step_batch2_128x128x64": bench_training(args.steps),
            "inference": bench_inference(scans, ckpt),
            "gpu": "not measured: no GPU on this machine",
        }
    args.out.write_text(json.dumps(results, indent=1))
    p, tr, inf = (
        results["preprocessing"],
        results["training_step_batch2_128x128x64"],
        results["inference"],
    )
    table = f"""# Benchmarks

Machine: {results["machine"]}. Command: `python benchmarks/run.py --scans {args.scans} --steps {args.steps}`
(all figures from one run, side by side in one process; raw numbers in `benchmarks/results.json`).

| what | reference / baseline | ours | ratio |
|---|---|---|---|
| (a) preprocessing, s per 512x512x40 scan (median of {p["scans"]}) | {p["reference_s_per_scan"]:.3f} (Keras example's scipy pipeline) | {p["ours_s_per_scan"]:.3f} | {p["median_speedup"]:.2f}x faster |
| (a) largest output difference | | {p["max_abs_diff"]:.2e} | |
| (b) training step, batch 2, 128x128x64, s | {tr["plain_fp32_s_per_step"]:.3f} (plain fp32 PyTorch port) | {tr["ours_fp32_s_per_step"]:.3f} (fp32, pool before ReLU) | {tr["speedup_fp32"]:.2f}x faster |
| (b) the same, bf16 autocast + channels_last_3d (`--set cpu_bf16=true`) | | {tr["ours_bf16_channels_last_s_per_step"]:.3f} | {tr["plain_fp32_s_per_step"] / tr["ours_bf16_channels_last_s_per_step"]:.2f}x faster |
| (c) inference, model only, s per scan | | {inf["model_only_s_per_scan"]:.3f} (fp32); {inf["model_only_bf16_s_per_scan"]:.3f} (`--precision bf16`) | bf16 {inf["model_only_s_per_scan"] / inf["model_only_bf16_s_per_scan"]:.2f}x faster than fp32 |
| (c) inference end to end (read, check, preprocess, classify), scans per s | | {inf["end_to_end_scans_per_s"]:.2f} ({inf["end_to_end_scans"]} scans) | |
| (e) GPU | | not measured: no GPU on this machine | |
"""
    (REPO / "docs" / "benchmarks.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
