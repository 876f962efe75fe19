"""Benchmarks, side by side in one process: writes benchmarks/results.json and docs/benchmarks.md.

    python benchmarks/run.py --scans 10 --steps 5     # about 5 minutes on 2 CPU cores

(a) preprocessing per MosMed-sized scan (512x512x40 int16 .nii.gz, LAS): ours vs the reference
    pipeline (scipy clip/scale, ndimage.rotate(90, reshape=False), ndimage.zoom(order=1)),
    alternating, median per-scan ratio, and the largest output difference;
(b) one training step at batch 2, 128x128x64: our network as app.train runs it (fp32; on the CPU
    channels-last memory and the first block in cache-sized slabs), and with the opt-in bf16
    autocast, vs a plain fp32 PyTorch port of the same network (conv -> ReLU -> pool -> BN);
(c) inference: model-only latency per scan (plain port, ours fp32, ours bf16), and scans per
    second through ``python -m app.infer FOLDER`` (process start, reading, checks, preprocessing
    and classification included);
(d) peak memory (RSS) of ``python -m app.train`` (one epoch) on the generated scans for each
    cache mode, and the cost per scan over ``cache: none``;
(e) with CUDA: epoch time of 140 scans on the GPU path (prefix cached on the GPU, batched
    rotation there, mixed precision), steady-state samples per second and peak GPU memory; without
    CUDA the same path runs on the CPU on a few tiny scans (exercised, not measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from cache_memory import TRAIN_AND_MEASURE
from checkpoints import write_spec_checkpoint
from scipy import ndimage
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{model or platform.processor()}, {torch.get_num_threads()} threads{gpu}, "
        f"torch {torch.__version__}"
    )


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
        "ours_fp32_s_per_step": time_steps(CNN3D().train(), steps, channels_last=True),
        "ours_bf16_s_per_step": time_steps(
            CNN3D().train(), steps, autocast=True, channels_last=True
        ),
    }
    result["speedup_fp32"] = result["plain_fp32_s_per_step"] / result["ours_fp32_s_per_step"]
    result["speedup_bf16"] = result["plain_fp32_s_per_step"] / result["ours_bf16_s_per_step"]
    return result


def latency(net: nn.Module, bf16: bool = False, channels_last: bool = False) -> float:
    net = net.eval()
    x = torch.rand(1, 1, 128, 128, 64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(8):
            t = time.perf_counter()
            net(x)
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_inference(folder: Path, scans: int, ckpt: Path, tmp: Path) -> dict:
    from nets.cnn3d import CNN3D

    result = {
        "model_only_plain_fp32_s_per_scan": latency(plain_port()),
        "model_only_s_per_scan": latency(CNN3D(), channels_last=True),
        "model_only_bf16_s_per_scan": latency(CNN3D(), bf16=True, channels_last=True),
    }
    out = tmp / "infer-out"
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "app.infer", str(folder), "--checkpoint", str(ckpt)]
        + ["--output", str(out), "--device", "cpu", "--no-progress"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - t
    rows = (out / "predictions.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == scans, rows
    result["end_to_end_scans_per_s"] = scans / elapsed
    result["end_to_end_scans"] = scans
    result["end_to_end_seconds"] = elapsed
    return result


def bench_cache_memory(data: Path, scans: int, tmp: Path) -> dict:
    """Peak RSS of one training epoch per cache mode, each in its own process."""
    result: dict[str, dict] = {}
    for mode in ("none", "memory", "device", "disk"):
        run, cache = tmp / f"run-{mode}", tmp / f"cache-{mode}"
        out = subprocess.run(
            [sys.executable, "-c", TRAIN_AND_MEASURE, "--data", str(data), "--output", str(run)]
            + ["--epochs", "1", "--cache", mode, "--device", "cpu", "--no-progress"]
            + ["--set", f"cache_dir={cache}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peak = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("PEAK_RSS")))
        disk = (
            sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
        )
        result[mode] = {"peak_rss_mb": peak, "disk_mb_per_scan": disk / 2**20 / scans}
    for mode in ("memory", "device", "disk"):
        result[mode]["rss_mb_per_scan_over_none"] = (
            result[mode]["peak_rss_mb"] - result["none"]["peak_rss_mb"]
        ) / scans
    result["scans"] = scans
    return result


def bench_gpu(tmp: Path) -> dict:
    """The GPU training path from train.yaml: measured with CUDA, exercised on the CPU without."""
    from ignite.engine import Events

    from app.config import load_config
    from app.data.synth import write_dataset

    cuda = torch.cuda.is_available()
    per_class, shape, epochs = (100, (128, 128, 64), 4) if cuda else (4, (48, 48, 24), 2)
    data = tmp / "gpu-data"
    write_dataset(data, per_class, shape=shape, progress=False)
    overrides = {
        "dataset_dir": str(data),
        "output_dir": str(tmp / "gpu-run"),
        "epochs": epochs,
        "cache": "device",
        "augment_on_device": True,
        "progress": False,
        "val_interval": epochs,  # one validation, after the timed epochs
    }
    if not cuda:
        overrides.update(
            {
                "device": "$torch.device('cpu')",
                "spatial_size": [48, 48, 48],
                "filters": [8, 8, 8, 8],
            }
        )
    parser = load_config("train.yaml", overrides=overrides)
    parser.get_parsed_content("initialize")  # seeds, cudnn.benchmark, split.json
    trainer = parser.get_parsed_content("train#trainer")
    epoch_seconds: list[float] = []
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: epoch_seconds.append(e.state.times[Events.EPOCH_COMPLETED.name]),
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    samples = len(parser.get_parsed_content("split")["training"])
    steady = statistics.median(epoch_seconds[1:])
    result = {
        "measured": cuda,
        "train_scans_per_epoch": samples,
        "epoch_seconds": epoch_seconds,
        "steady_epoch_s": steady,
        "steady_samples_per_s": samples / steady,
    }
    if cuda:
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["device"] = torch.cuda.get_device_name(0)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=10, help="MosMed-sized scans to generate")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.json")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite docs/benchmarks.md from --out"
    )
    args = parser.parse_args(argv)
    if args.render:
        (REPO / "docs" / "benchmarks.md").write_text(markdown(json.loads(args.out.read_text())))
        return 0
    from app.data.synth import write_dataset

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "mosmed-size"
        items = write_dataset(data, max(1, args.scans // 2), shape=(512, 512, 40), progress=False)
        scans = [str(item["image"]) for item in items]
        ckpt = write_spec_checkpoint(tmp / "model.pt")
        results = {
            "machine": machine(),
            "command": f"python benchmarks/run.py --scans {args.scans} --steps {args.steps}",
            "preprocessing": bench_preprocessing(scans),
            "training_step_batch2_128x128x64": bench_training(args.steps),
            "inference": bench_inference(data, len(scans), ckpt, tmp),
            "cache_memory": bench_cache_memory(data, len(scans), tmp),
            "gpu": bench_gpu(tmp),
        }
    results["benchmark_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (REPO / "docs" / "benchmarks.md").write_text(table)
    print(table)
    return 0


def markdown(results: dict) -> str:
    p, tr, inf, mem, gpu = (
        results["preprocessing"],
        results["training_step_batch2_128x128x64"],
        results["inference"],
        results["cache_memory"],
        results["gpu"],
    )
    rows = [
        (
            f"(a) preprocessing, s per 512x512x40 scan (median of {p['scans']})",
            f"{p['reference_s_per_scan']:.3f} (the Keras example's scipy pipeline)",
            f"{p['ours_s_per_scan']:.3f}",
            f"**{p['median_speedup']:.2f}x** faster (target 8x)",
        ),
        ("(a) largest output difference", "", f"{p['max_abs_diff']:.1e}", "(target 1e-3)"),
        (
            "(b) training step, batch 2, 128x128x64, s",
            f"{tr['plain_fp32_s_per_step']:.3f} (plain fp32 PyTorch port)",
            f"**{tr['ours_fp32_s_per_step']:.3f}** (default: fp32, channels-last, slabs)",
            f"{tr['speedup_fp32']:.2f}x faster (target <= 1.13 s)",
        ),
        (
            "(b) the same with bf16 autocast (`--set cpu_bf16=true`)",
            "",
            f"{tr['ours_bf16_s_per_step']:.3f}",
            f"{tr['speedup_bf16']:.2f}x faster",
        ),
        (
            "(c) inference, model only, s per scan",
            f"{inf['model_only_plain_fp32_s_per_scan']:.3f} (plain fp32 port)",
            f"**{inf['model_only_s_per_scan']:.3f}** (default fp32); "
            f"{inf['model_only_bf16_s_per_scan']:.3f} (`--precision bf16`)",
            f"{inf['model_only_plain_fp32_s_per_scan'] / inf['model_only_s_per_scan']:.2f}x "
            "faster (target <= 0.19 s)",
        ),
        (
            "(c) `python -m app.infer FOLDER`, scans per s (process start included)",
            "",
            f"{inf['end_to_end_scans_per_s']:.2f} ({inf['end_to_end_scans']} scans in "
            f"{inf['end_to_end_seconds']:.1f} s)",
            "",
        ),
    ]
    for mode in ("none", "memory", "device", "disk"):
        m = mem[mode]
        extra = (
            f"+{m['rss_mb_per_scan_over_none']:.1f} MB RSS per scan"
            if mode != "none"
            else "the baseline"
        )
        if mode == "disk":
            extra += f", {m['disk_mb_per_scan']:.1f} MB of disk per scan"
        rows.append(
            (
                f"(d) peak RSS, one epoch on {mem['scans']} scans, `--cache {mode}`, MB",
                "",
                f"{m['peak_rss_mb']:.0f}",
                extra,
            )
        )
    if gpu["measured"]:
        rows.append(
            (
                f"(e) GPU epoch, {gpu['train_scans_per_epoch']} scans (cache: device, batched "
                "rotation on the GPU, AMP), s",
                "~26 (the reference, on its GPU)",
                f"**{gpu['steady_epoch_s']:.2f}** ({gpu['steady_samples_per_s']:.0f} samples/s, "
                f"peak {gpu['peak_gpu_memory_gb']:.1f} GB GPU memory)",
                "(target <= 0.5 s on one H100)",
            )
        )
    else:
        rows.append(
            (
                "(e) GPU",
                "",
                "**not measured**: no GPU on this machine",
                "the GPU path (cache: device, batched rotation) ran on the CPU on "
                f"{gpu['train_scans_per_epoch']} tiny scans",
            )
        )
    body = "\n".join(f"| {' | '.join(r)} |" for r in rows)
    return f"""# Benchmarks

Machine: {results["machine"]}. Command: `{results["command"]}` ({results["benchmark_seconds"] / 60:.1f} min;
all figures from this one run, side by side in one process; raw numbers in `benchmarks/results.json`).

| what | reference / baseline | ours | ratio |
|---|---|---|---|
{body}

What "ours" is:
- (a) `preprocessing` from `configs/common.yaml`: `.nii.gz` inflated in one pass bounded by
  the header, with ISA-L (`python-isal`; zlib where it is absent) (`FastNiftiReader`), voxels read as (z, y, x) with a permuted affine so no
  transposing copy is made (`Orientationd` restores the order as a view), the HU window clipped
  on the stored int16 voxels, the volume resized before the 90-degree turn. Inflating the gzip
  is most of what is left.
- (b), (c) `nets.cnn3d.CNN3D` as `app.train`/`app.infer` run it on the CPU: fp32, channels-last
  (NDHWC) memory, ReLU after the max-pool (exact), and the first block in cache-sized slabs
  (3x3x3 conv as a 2D conv over plane triples, pooled at once, recomputed in backward). The
  outputs and gradients equal the plain path in float64 (`tests/test_nets.py`), so accuracy is
  unchanged by construction. bf16 stays opt-in: `python benchmarks/precision.py` compares fp32
  and bf16 predictions of a trained model.
- (d) per scan over `none`: the cached volume is 4 MB (128x128x64 float32). With few scans the
  figure is mostly noise (about +-60 MB in the peak); on 100 scans the memory cache costs
  4.7 MB per scan (`benchmarks/cache_memory.py`, `docs/training.md`).
- (e) on a CUDA machine this script measures the GPU path (`cache: device`,
  `augment_on_device`, AMP) on 200 generated 128x128x64 scans (140 train). On this project's
  lent GPU machines, which lack MONAI, Ignite, nibabel and isal: `bash benchmarks/device_wheels.sh`
  here, then the command in its header there (prepared, not yet run on a GPU).
"""


if __name__ == "__main__":
    raise SystemExit(main())
