"""Benchmarks, side by side in one run: writes benchmarks/results.json and docs/benchmarks.md.

    python -m benchmarks.run                      # every section; about 15 minutes on 2 CPU cores
    python -m benchmarks.run --only b             # the network beside Keras (make bench-reference)
    python -m benchmarks.run --only e --out DIR   # the GPU epoch, results in DIR/results.json

(a) preprocessing per MosMed-sized scan (512x512x40 int16 .nii.gz, LAS): ours vs the reference
    pipeline (scipy clip/scale, ndimage.rotate(90, reshape=False), ndimage.zoom(order=1)),
    alternating, median per-scan ratio, and the largest output difference;
(b) one training step at batch 2 and one model-only inference at batch 1, 128x128x64, each way
    of running the network in its own process (``benchmarks/variants.py``): a plain fp32 PyTorch
    port, the app's default on this machine, the app with ``--precision fp32``, and the
    reference itself in TensorFlow/Keras graph mode when ``.venv-reference`` exists
    (``make bench-reference``), alternating over ``--rounds``; top-level keys
    ``train_step_default_s``, ``infer_model_default_s``, ``keras_graph_train_step_s``,
    ``keras_graph_predict_s`` and the ratios;
(f) ``python -m app.infer FOLDER`` on ``--folder-scans`` generated MosMed-size scans (512x512,
    30-70 slices): process start, time to the first result, scans per second;
(d) peak memory (RSS) of ``python -m app.train`` (one epoch) on the generated scans for each
    cache mode, and the cost per scan over ``cache: none``;
(e) with CUDA: wall time per epoch of 140 scans on the GPU path, validation of 60 and every
    handler included, at batch 2 and ``--large-batch``, samples per second and peak GPU memory;
    without CUDA the same path runs on the CPU on a few tiny scans (exercised, not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from cache_memory import TRAIN_AND_MEASURE
from checkpoints import write_spec_checkpoint
from scipy import ndimage
from variants import VARIANTS

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


def cpu() -> dict:
    """The CPU's model name, family and model numbers, and whether it has AVX512-BF16."""
    info: dict = {"model_name": platform.processor() or platform.machine()}
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
    info["cores"] = len(os.sched_getaffinity(0))
    return info


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


KERAS_PYTHON = REPO / ".venv-reference" / "bin" / "python"


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_network(steps: int, rounds: int, keras_python: Path) -> dict:
    """(b) and (c): each variant in its own process, alternating over ``rounds``; Keras too when
    its environment exists. Medians over rounds; ratios app default / peer."""
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.variants", variant, "--steps", str(steps)]
            runs.setdefault(variant, []).append(run_json(cmd))
        if keras_python.exists():
            cmd = [
                str(keras_python),
                str(REPO / "benchmarks" / "keras_reference.py"),
                "--steps",
                str(steps),
            ]
            runs.setdefault("keras", []).append(run_json(cmd))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    result: dict = {"rounds": rounds, "steps": steps, "runs": runs}
    for variant in VARIANTS:
        result[f"{variant}_train_step_s"] = median(variant, "train_step_s")
        result[f"{variant}_infer_model_s"] = median(variant, "infer_model_s")
    result["default_precision"] = runs["default"][0]["precision"]
    if "keras" in runs:
        result["keras_graph_train_step_s"] = median("keras", "keras_graph_train_step_s")
        result["keras_graph_predict_s"] = median("keras", "keras_graph_predict_s")
        result["tensorflow"] = runs["keras"][0]["tensorflow"]
    return result


def bench_folder(folder: Path, scans: int, ckpt: Path, tmp: Path) -> dict:
    """(f) ``python -m app.infer FOLDER`` as a user runs it: process start (launch to the model
    line), time to the first result, scans per second over the whole run."""
    out = tmp / "infer-out"
    cmd = [sys.executable, "-u", "-m", "app.infer", str(folder), "--checkpoint", str(ckpt)]
    cmd += ["--output", str(out), "--device", "cpu", "--no-progress"]
    start = time.perf_counter()
    marks: dict[str, float] = {}
    lines = 0
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            if line.startswith("model:"):
                marks.setdefault("model_loaded_s", now)
            elif "confident" in line or line.startswith(("error", "failed")):
                lines += 1
                marks.setdefault("first_result_s", now)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"app.infer exited {proc.returncode}")
    rows = (out / "predictions.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == scans, (len(rows), scans)
    result = {
        "scans": scans,
        "seconds": elapsed,
        "scans_per_s": scans / elapsed,
        "scans_per_s_after_first": (scans - 1) / (elapsed - marks["first_result_s"]),
        "command": " ".join(["python -m app.infer", "FOLDER", "--checkpoint", "MODEL"]),
        **marks,
    }
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


def bench_gpu(tmp: Path, large_batch: int, compile_network: bool = False) -> dict:
    """(e) The GPU training path from train.yaml: measured with CUDA, exercised on the CPU without.

    Epoch wall time from one EPOCH_STARTED to the next (the last: to the end of the run), so
    validation, checkpoints, plots and logging are inside it; at batch 2 and at ``large_batch``.
    With CUDA, steps after the first run under ``torch.cuda.set_sync_debug_mode("warn")``: the
    synchronisations it reports per step are recorded (0 expected).
    """
    from ignite.engine import Events

    from app.config import load_config
    from app.data.synth import write_dataset

    cuda = torch.cuda.is_available()
    per_class, shape, epochs = (100, (128, 128, 64), 4) if cuda else (4, (48, 48, 24), 2)
    data = tmp / "gpu-data"
    write_dataset(data, per_class, shape=shape, progress=False)
    result: dict = {"measured": cuda}
    for batch in (2, large_batch):
        overrides: dict = {
            "dataset_dir": str(data),
            "output_dir": str(tmp / f"gpu-run-{batch}"),
            "epochs": epochs,
            "batch_size": batch,
            "cache": "device",
            "augment_on_device": True,
            "progress": False,
            "compile": compile_network,
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
        parser.get_parsed_content("initialize")  # seeds, cudnn, allocator, split.json
        trainer = parser.get_parsed_content("train#trainer")
        starts: list[float] = []
        trainer.add_event_handler(
            Events.EPOCH_STARTED, lambda _, marks=starts: marks.append(time.perf_counter())
        )
        if cuda:
            trainer.add_event_handler(Events.ITERATION_STARTED, _watch_syncs)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, _unwatch_syncs)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.run()
        if cuda:
            torch.cuda.synchronize()
        starts.append(time.perf_counter())
        epoch_seconds = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
        samples = len(parser.get_parsed_content("split")["training"])
        steady = statistics.median(epoch_seconds[1:])
        entry = {
            "train_scans_per_epoch": samples,
            "val_scans_per_epoch": len(parser.get_parsed_content("split")["validation"]),
            "epoch_seconds_incl_validation": epoch_seconds,
            "steady_epoch_s": steady,
            "steady_samples_per_s": samples / steady,
            "precision": parser.get_parsed_content("compute_precision"),
        }
        if cuda:
            entry["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
            entry["syncs_per_step"] = len(syncs) / max(1, trainer.state.iteration - 1)
            entry["sync_examples"] = sorted(set(syncs))[:5]
        result[f"batch_{batch}"] = entry
    if cuda:
        result["device"] = torch.cuda.get_device_name(0)
    return result


def _watch_syncs(engine) -> None:
    if engine.state.iteration > 1:  # the first step builds per-device tables
        torch.cuda.set_sync_debug_mode("warn")


def _unwatch_syncs(engine) -> None:
    torch.cuda.set_sync_debug_mode("default")


SECTIONS = {
    "a": "preprocessing",
    "b": "training step and model latency beside the plain port and Keras",
    "f": "python -m app.infer on a folder",
    "d": "peak memory per cache mode",
    "e": "GPU epoch",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=10, help="MosMed-sized scans for (a), (d)")
    parser.add_argument("--folder-scans", type=int, default=100, help="MosMed-sized scans for (f)")
    parser.add_argument(
        "--folder-data",
        type=Path,
        help="(f): keep the generated scans in this folder and reuse them (generating 100 takes "
        "about 5 minutes on 2 cores)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the (b) variants")
    parser.add_argument("--large-batch", type=int, default=32, help="(e)'s second batch size")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated sections: " + "; ".join(f"{k} {v}" for k, v in SECTIONS.items()),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks",
        help="folder of results.json (sections run now replace their entries; default "
        "benchmarks/, whose full run also rewrites docs/benchmarks.md)",
    )
    parser.add_argument("--keras-python", type=Path, default=KERAS_PYTHON)
    parser.add_argument("--compile", action="store_true", help="(e) with torch.compile")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite docs/benchmarks.md from --out"
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in only if s not in SECTIONS]:
        parser.error(f"unknown sections {unknown}: choose from {', '.join(SECTIONS)}")
    results_path = args.out / "results.json"
    if args.render:
        (REPO / "docs" / "benchmarks.md").write_text(markdown(json.loads(results_path.read_text())))
        return 0
    from app.data.synth import write_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = write_spec_checkpoint(tmp / "model.pt")
        if {"a", "d"} & set(only):
            data = tmp / "mosmed-size"
            items = write_dataset(
                data, max(1, args.scans // 2), shape=(512, 512, 40), progress=False
            )
            scans = [str(item["image"]) for item in items]
        if "a" in only:
            results["preprocessing"] = bench_preprocessing(scans)
        if "b" in only:
            net = bench_network(args.steps, args.rounds, args.keras_python)
            results["network"] = net
            results["train_step_default_s"] = net["default_train_step_s"]
            results["infer_model_default_s"] = net["default_infer_model_s"]
            for key in ("keras_graph_train_step_s", "keras_graph_predict_s"):
                results.pop(key, None)
                if key in net:
                    results[key] = net[key]
            if "keras_graph_train_step_s" in net:
                results["train_ratio_default_over_keras"] = (
                    net["default_train_step_s"] / net["keras_graph_train_step_s"]
                )
                results["infer_ratio_default_over_keras"] = (
                    net["default_infer_model_s"] / net["keras_graph_predict_s"]
                )
        if "f" in only:
            # MosMed's geometry: 512x512, 30-70 slices, both classes
            folder = args.folder_data or tmp / "folder"
            write_dataset(
                folder, max(1, args.folder_scans // 2), shape=None, seed=1, progress=False
            )
            results["folder"] = bench_folder(folder, 2 * max(1, args.folder_scans // 2), ckpt, tmp)
        if "d" in only:
            results["cache_memory"] = bench_cache_memory(data, len(scans), tmp)
        if "e" in only:
            results["gpu"] = bench_gpu(tmp, args.large_batch, args.compile)
    results.update(
        machine=machine(),
        cpu=cpu(),
        command=f"python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}".strip(),
        benchmark_seconds=time.perf_counter() - started,
    )
    results_path.write_text(json.dumps(results, indent=1))
    if args.out.resolve() == (REPO / "benchmarks").resolve() and set(only) == set(SECTIONS):
        table = markdown(results)
        (REPO / "docs" / "benchmarks.md").write_text(table)
        print(table)
    else:
        print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=1))
    return 0


def network_gflop() -> dict:
    """GFLOP of one training step (batch 2) and one forward pass (batch 1) at 128x128x64,
    counted by ``torch.utils.flop_counter`` on the ``meta`` device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nets.cnn3d import CNN3D

    with torch.device("meta"):
        net = CNN3D()
        x = torch.empty(2, 1, 128, 128, 64)
    with FlopCounterMode(display=False) as train:
        net(x).sum().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as infer:
        net(x[:1])
    return {"train_step": train.get_total_flops() / 1e9, "forward": infer.get_total_flops() / 1e9}


def markdown(results: dict) -> str:
    p, net, folder, mem, gpu = (
        results["preprocessing"],
        results["network"],
        results["folder"],
        results["cache_memory"],
        results["gpu"],
    )
    keras = "keras_graph_train_step_s" in net
    cpu_name = results["cpu"]
    precision = net["default_precision"]
    gflop = network_gflop()

    def rate(seconds: float, kind: str) -> str:
        return f"{gflop[kind] / seconds:.0f} GFLOP/s"

    def vs_keras(ours: float, key: str) -> str:
        return f"**{ours / net[key]:.2f}x** Keras's time" if keras else "Keras not run"

    rows = [
        (
            f"(a) preprocessing, s per 512x512x40 scan (median of {p['scans']})",
            f"{p['reference_s_per_scan']:.3f} (the Keras example's scipy pipeline)",
            f"{p['ours_s_per_scan']:.3f}",
            f"**{p['median_speedup']:.2f}x** faster",
        ),
        ("(a) largest output difference", "", f"{p['max_abs_diff']:.1e}", "(target 1e-3)"),
        (
            "(b) training step, batch 2, 128x128x64, s",
            f"{net['keras_graph_train_step_s']:.3f} (TF/Keras graph mode; "
            f"{rate(net['keras_graph_train_step_s'], 'train_step')})"
            if keras
            else "",
            f"**{net['default_train_step_s']:.3f}** (default: {precision}; "
            f"{rate(net['default_train_step_s'], 'train_step')})",
            vs_keras(net["default_train_step_s"], "keras_graph_train_step_s") + " (target <= 0.80)",
        ),
        (
            "(b) the same, `--precision fp32`",
            f"{net['plain_train_step_s']:.3f} (plain fp32 PyTorch port)",
            f"{net['fp32_train_step_s']:.3f} ({rate(net['fp32_train_step_s'], 'train_step')})",
            vs_keras(net["fp32_train_step_s"], "keras_graph_train_step_s")
            + f"; {net['plain_train_step_s'] / net['fp32_train_step_s']:.2f}x faster than the port",
        ),
        (
            "(b) model inference, batch 1, s per scan",
            f"{net['keras_graph_predict_s']:.3f} (Keras `predict_on_batch`)" if keras else "",
            f"**{net['default_infer_model_s']:.3f}** (default: {precision}; "
            f"{rate(net['default_infer_model_s'], 'forward')})",
            vs_keras(net["default_infer_model_s"], "keras_graph_predict_s") + " (target <= 0.60)",
        ),
        (
            "(b) the same, `--precision fp32`",
            f"{net['plain_infer_model_s']:.3f} (plain fp32 PyTorch port)",
            f"{net['fp32_infer_model_s']:.3f} ({rate(net['fp32_infer_model_s'], 'forward')})",
            vs_keras(net["fp32_infer_model_s"], "keras_graph_predict_s"),
        ),
        (
            f"(f) `python -m app.infer FOLDER`, {folder['scans']} MosMed-size scans (512x512, "
            "30-70 slices)",
            "~1.7 s per scan (the reference's process_scan + predict)",
            f"**{folder['scans_per_s']:.2f} scans/s** ({folder['seconds']:.1f} s in all; "
            f"{folder['scans_per_s_after_first']:.2f} scans/s after the first)",
            f"process start {folder['model_loaded_s']:.1f} s, first result at "
            f"{folder['first_result_s']:.1f} s (target >= 4 scans/s)",
        ),
    ]
    for mode in ("none", "memory", "device", "disk"):
        m = mem[mode]
        extra = (
            f"{m['rss_mb_per_scan_over_none']:+.1f} MB RSS per scan"
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
        for key in (k for k in gpu if k.startswith("batch_")):
            g = gpu[key]
            rows.append(
                (
                    f"(e) GPU epoch of {g['train_scans_per_epoch']} scans + validation of "
                    f"{g['val_scans_per_epoch']}, {key.replace('_', ' ')}, {g['precision']}, s",
                    "~26 (the reference, on its GPU)",
                    f"**{g['steady_epoch_s']:.2f}** ({g['steady_samples_per_s']:.0f} samples/s, "
                    f"peak {g['peak_gpu_memory_gb']:.1f} GB)",
                    f"{gpu['device']} (target <= 0.5 s on one H100)",
                )
            )
    else:
        rows.append(
            (
                "(e) GPU",
                "",
                "**not measured**: no GPU on this machine",
                "the GPU path (cache: device, batched rotation) ran on the CPU on "
                f"{gpu['batch_2']['train_scans_per_epoch']} tiny scans",
            )
        )
    body = "\n".join(f"| {' | '.join(r)} |" for r in rows)
    cpu_line = (
        f"{cpu_name.get('model_name')} (family {cpu_name.get('family')}, model "
        f"{cpu_name.get('model')}, {cpu_name.get('cores')} cores, AVX512-BF16 "
        f"{'yes' if cpu_name.get('avx512_bf16') else 'no'})"
    )
    return f"""# Benchmarks

CPU: {cpu_line}; {results["machine"]}. Command: `{results["command"]}`
({results["benchmark_seconds"] / 60:.1f} min; all figures from this one run, each way of running
the network in its own process, alternating; raw numbers in `benchmarks/results.json`).
{"TensorFlow " + net["tensorflow"] + " (`make bench-reference`)." if keras else ""}

| what | reference / peer | ours | ratio |
|---|---|---|---|
{body}

Work per call, counted by `torch.utils.flop_counter`: {gflop["train_step"]:.1f} GFLOP per
training step at batch 2 (the first block's input needs no gradient), {gflop["forward"]:.1f}
GFLOP per forward pass. The CPU's peak: 32 float32 FLOP per cycle and core with AVX-512 on Zen 4
(two 256-bit FMA pipes), 64 in bfloat16 (`VDPBF16PS`); at the 2.6 GHz `/proc/cpuinfo` reports,
{2 * 32 * 2.6:.0f} GFLOP/s float32 and {2 * 64 * 2.6:.0f} GFLOP/s bfloat16 on 2 cores, more when
the cores boost (the clock they ran at is not visible in this virtual machine).

What "ours" is:
- (a) `preprocessing` from `configs/common.yaml`: `.nii.gz` inflated in one pass bounded by
  the header, with ISA-L (`python-isal`; zlib where it is absent) (`FastNiftiReader`), voxels
  read as (z, y, x) with a permuted affine so no transposing copy is made (`Orientationd`
  restores the order as a view), the HU window clipped on the stored int16 voxels, the volume
  resized before the 90-degree turn.
- (b) `nets.cnn3d.CNN3D` as `app.train`/`app.infer` run it on the CPU: the configs' precision
  (`precision: auto`: bfloat16 autocast on CPUs with AVX512-BF16 or AMX, float32 elsewhere),
  channels-last (NDHWC) memory, ReLU after the max-pool (exact), the first block in cache-sized
  slabs (3x3x3 conv as a 2D conv over plane triples, pooled at once, recomputed in backward),
  and glibc told to keep freed memory (`reuse_freed_memory`: without it every 30-60 MB
  activation is a fresh `mmap` whose pages fault again each step). The slab path's outputs and
  gradients equal the plain path in float64 (`tests/test_nets.py`); bfloat16's accuracy is in
  `studies/log.md` (*Precision*).
- (f) `app.infer` reads and preprocesses the next scans in a background thread while the network
  classifies the current ones.
- (d) per scan over `none`: the cached volume is 4 MB (128x128x64 float32). With few scans the
  figure is mostly noise (about +-60 MB in the peak).
- (e) on a CUDA machine this script measures the GPU path (`cache: device`,
  `augment_on_device`, the configs' precision) on 200 generated 128x128x64 scans (140 train, 60
  validation), whole epochs including validation and handlers. On this project's lent GPU
  machines, which lack MONAI, Ignite, nibabel and isal: `bash benchmarks/device_wheels.sh` here,
  then the command in its header there.
"""


if __name__ == "__main__":
    raise SystemExit(main())
