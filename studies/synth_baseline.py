"""How well does mean lung HU alone separate the generated classes? (ROC-AUC of that threshold.)

    python -m studies.synth_baseline --per-class 100            # MosMed size, 200 scans
    python -m studies.synth_baseline --per-class 100 --shape 128 128 40

A low AUC means a model must find where the opacities are, not just how dense the lungs are.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from tqdm import tqdm

from app.data.synth import generate_scan, scan_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--shape", type=int, nargs=3, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=0.5)
    args = parser.parse_args(argv)
    means, labels, affected = [], [], []
    shape = tuple(args.shape) if args.shape else None
    for i in tqdm(range(args.per_class), unit="pair"):
        for label in (0, 1):
            scan = generate_scan(
                label, scan_seed(args.seed, i), shape=shape, difficulty=args.difficulty
            )
            lung = scan.volume[scan.lung_mask].astype(np.float64)
            means.append(lung.mean())
            labels.append(label)
            if label:
                affected.append(float((lung > -500).mean()))
    auc = compute_roc_auc(torch.tensor(means), torch.tensor(labels))
    result = {
        "scans": len(labels),
        "shape": shape or "MosMed (512x512x30-70)",
        "difficulty": args.difficulty,
        "mean_lung_hu_auc": round(float(auc), 4),
        "mean_lung_hu_normal": round(
            float(np.mean([m for m, y in zip(means, labels, strict=True) if y == 0])), 1
        ),
        "mean_lung_hu_abnormal": round(
            float(np.mean([m for m, y in zip(means, labels, strict=True) if y == 1])), 1
        ),
        "abnormal_lung_fraction_above_-500HU_median": round(float(np.median(affected)), 4),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
