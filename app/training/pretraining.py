"""Pretraining on generated scans: the pipeline behind ``python -m app.pretrain``, which makes
the weights ``app.train --init generated`` starts from (``nets/weights/generated.pt``).

:func:`pretrain` writes a wide generated dataset (each scan's lesion size, contrast and count,
confounders and geometry drawn, seeded, from ``configs/pretrain.yaml``; an interrupted run
completes when run again), trains the configured recipe on it from random weights, and writes
the kept model's network and model settings with their record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from app.config import CONFIG_DIR
from app.data.download import sha256_of
from app.data.synth import CLASS_FOLDERS, generate_scan, save_scan, scan_seed
from app.inference.checkpoints import load_checkpoint
from app.model_settings import MODEL_SETTINGS
from app.run_folder import BEST_MODEL, METRICS_JSON, SPLIT
from app.training.pretrained import GENERATED
from app.training.workflow import TrainResult, train


def pretrain_settings(config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """``configs/pretrain.yaml``'s ``pretrain`` section."""
    return dict(yaml.safe_load((config_dir / "pretrain.yaml").read_text())["pretrain"])


def scan_settings(settings: dict[str, Any], index: int) -> dict[str, Any]:
    """The generator settings of the ``index``-th pretraining scan (both classes share them)."""
    rng = np.random.default_rng([int(settings["seed"]), index, 0x5E7])
    side = int(rng.choice(settings["in_plane"]))
    low, high = settings["slices"]
    out = {
        "shape": (side, side, int(rng.integers(low, high + 1))),
        "difficulty": float(rng.uniform(*settings["difficulty"])),
        "confounders": float(rng.uniform(*settings["confounders"])),
    }
    if "hila" in settings:  # drawn last: the draws above stay those of earlier versions
        out["hila"] = float(rng.uniform(*settings["hila"]))
    if "trees" in settings:  # after hila, for the same reason
        out["trees"] = float(rng.uniform(*settings["trees"]))
    return out


def write_pretraining_data(out: Path, settings: dict[str, Any], progress: bool = True) -> int:
    """Write the pretraining scans to ``out/CT-0`` and ``out/CT-23``; returns their count."""
    per_class = int(settings["per_class"])
    for folder in CLASS_FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(label, i) for i in range(per_class) for label in CLASS_FOLDERS]
    for label, i in tqdm(jobs, desc="pretraining scans", unit="scan", disable=not progress):
        path = out / CLASS_FOLDERS[label] / f"synth_{label}_{i:05d}.nii.gz"
        if not path.exists():
            scan = generate_scan(
                label, scan_seed(int(settings["seed"]), i), **scan_settings(settings, i)
            )
            save_scan(scan, path)
    return len(jobs)


def export_weights(run: Path, out: Path, record: dict[str, Any]) -> Path:
    """The kept model of ``run`` as ``out/generated.pt`` (network + model settings) and its
    record ``out/generated.json`` with the file's SHA-256."""
    state, settings = load_checkpoint(run / BEST_MODEL)
    kept = {k: settings[k] for k in (*MODEL_SETTINGS, "class_names", "threshold", "seed")}
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{GENERATED}.pt"
    tmp = weights.with_name(f".{weights.name}.partial")
    torch.save({"network": {k: v.contiguous() for k, v in state.items()}, "run_info": kept}, tmp)
    tmp.replace(weights)
    record = {"sha256": sha256_of(weights), "settings": kept, **record}
    (out / f"{GENERATED}.json").write_text(json.dumps(record, indent=1) + "\n")
    return weights


def pretrain(
    work: Path, out: Path, settings: dict[str, Any], progress: bool = True
) -> tuple[Path, TrainResult]:
    """Write the data to ``work/data``, train ``settings["recipe"]`` on it from random weights
    in ``work/run`` (resumed when a run is there), and write ``out/generated.pt`` and its record.
    Returns the weights and the training's result."""
    data = work / "data"
    count = write_pretraining_data(data, settings, progress=progress)
    run = work / "run"
    overrides = {
        "epochs": int(settings["epochs"]),
        "patience": int(settings["patience"]),
        "seed": int(settings["seed"]),
        "init_weights": "",  # from scratch, whatever the recipe says
        **(settings.get("settings") or {}),
    }
    if not progress:
        overrides["progress"] = False
    result = train(
        data,
        run,
        resume=(run / SPLIT).exists(),
        recipe=str(settings["recipe"]),
        overrides=overrides,
    )
    metrics = json.loads((run / METRICS_JSON).read_text())
    weights = export_weights(
        run,
        out,
        {
            "command": "python -m app.pretrain",
            "pretraining": {**settings, "scans": count},
            "validation_last_epochs": metrics[-3:] if isinstance(metrics, list) else metrics,
        },
    )
    return weights, result
