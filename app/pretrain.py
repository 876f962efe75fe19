"""Pretrain the network on generated scans: the weights ``app.train --init generated`` starts from.

    python -m app.pretrain [--work .cache/pretrain] [--out nets/weights]

1. writes a wide generated dataset to ``WORK/data`` (each scan's lesion size, contrast and
   count, confounders and geometry drawn, seeded, from ``configs/pretrain.yaml``; an interrupted
   run completes when run again);
2. trains ``--recipe small-data`` on it (``app.train``, run folder ``WORK/run``);
3. writes the kept model's network and model settings (no optimizer, no paths) to
   ``OUT/generated.pt`` and its record (SHA-256, command, settings, data, validation figures) to
   ``OUT/generated.json``; ``--init generated`` checks the file against that digest.

The same configs and seed give the same weights on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app import train
from app.cli import add_progress_option, show_progress
from app.config import CONFIG_DIR
from app.data.download import sha256_of
from app.model_settings import MODEL_SETTINGS
from app.run_folder import BEST_MODEL, METRICS_JSON, SPLIT

REPO = Path(__file__).resolve().parent.parent


def pretrain_settings(config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((config_dir / "pretrain.yaml").read_text())["pretrain"])


def scan_settings(settings: dict[str, Any], index: int) -> dict[str, Any]:
    """The generator settings of the ``index``-th pretraining scan (both classes share them)."""
    import numpy as np

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
    from tqdm import tqdm

    from app.data.synth import CLASS_FOLDERS, generate_scan, save_scan, scan_seed

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
    import torch

    from app.inference.checkpoints import load_checkpoint
    from app.training.pretrained import GENERATED

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--work", type=Path, default=Path(".cache/pretrain"), help="data and run")
    p.add_argument("--out", type=Path, default=REPO / "nets" / "weights", help="weights folder")
    p.add_argument("--per-class", type=int, help="scans per class (default: configs/pretrain.yaml)")
    p.add_argument("--epochs", type=int, help="epochs (default: configs/pretrain.yaml)")
    add_progress_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    settings = pretrain_settings()
    if args.per_class is not None:
        if args.per_class < 2:
            print("error: --per-class must be at least 2", file=sys.stderr)
            return 2
        settings["per_class"] = args.per_class
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    progress = show_progress(args.no_progress)
    data = args.work / "data"
    count = write_pretraining_data(data, settings, progress=progress)
    run = args.work / "run"
    command = [
        "--recipe", str(settings["recipe"]), "--data", str(data), "--output", str(run),
        "--epochs", str(settings["epochs"]), "--patience", str(settings["patience"]),
        "--seed", str(settings["seed"]), "--init", "",  # from scratch, whatever the recipe says
        *(["--resume"] if (run / SPLIT).exists() else []),
        *(f"--set={k}={json.dumps(v)}" for k, v in (settings.get("settings") or {}).items()),
        *([] if progress else ["--no-progress"]),
    ]  # fmt: skip
    status = train.main(command)
    if status != 0:
        return status
    metrics = json.loads((run / METRICS_JSON).read_text())
    weights = export_weights(
        run,
        args.out,
        {
            "command": "python -m app.pretrain",
            "pretraining": {**settings, "scans": count},
            "validation_last_epochs": metrics[-3:] if isinstance(metrics, list) else metrics,
        },
    )
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
