"""Which small-data recipe? Each candidate change cross-validated on the same folds.

    python -m app.data synth /tmp/cv60 --per-class 60 --shape 128 128 40 --seed 0
    python -m studies.recipe_study --data /tmp/cv60 --out /tmp/study     # ~50 min, 2 CPU cores

Every choice runs ``python -m app.train --recipe small-data --folds 3 --seed 0 --set ...`` in
``OUT/NAME`` (the same seed gives every choice the same three folds, so the choices are compared
fold by fold), then reads its ``cv_summary.json`` (the kept epoch of each fold: mean +- sd of
ROC-AUC and accuracy) and ``oof_predictions.csv`` (one ROC-AUC over all out-of-fold
predictions). A choice whose ``cv_summary.json`` exists is not rerun. ``--only`` picks choices;
``--base`` adds settings to every choice (e.g. the chosen recipe, to try one change more). The
table goes to ``OUT/study.md`` and ``OUT/study.json``; ``studies/log.md`` shows the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: choice name -> (what it changes, --set values on top of the recipe)
CHOICES: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the small-data recipe as it stood (BatchNorm, rotation only)", []),
    "flip": ("+ left-right flips (p 0.5)", ["flip_prob=0.5"]),
    "intensity": (
        "+ contrast x[0.8, 1.2] and shift +-0.05",
        ["contrast_range=0.2", "intensity_shift=0.05"],
    ),
    "scale": ("+ zoom 0.9x-1.1x", ["scale_range=0.1"]),
    "group-norm": ("GroupNorm (8 groups) instead of BatchNorm", ["norm=group"]),
    "cosine": ("cosine learning-rate schedule", ["lr_schedule=cosine"]),
    "lr-1e-3": ("learning rate 1e-3", ["learning_rate=0.001"]),
    "quarter-width": (
        "quarter widths (16, 16, 32, 64; dense 128)",
        ["filters=[16,16,32,64]", "dense_units=128"],
    ),
    "input-96": ("input 96x96x48", ["spatial_size=[96,96,48]"]),
    "epochs-20": ("20 epochs (patience 10)", ["epochs=20", "patience=10"]),
    # issue 20: inputs and heads for small findings
    "lung-crop": ("input cropped to the lungs' box", ["lung_crop=true"]),
    "max-pool": ("global max pooling", ["pooling=max"]),
    "attention": ("attention (multiple-instance) pooling", ["pooling=attention"]),
    "crop-max": ("lung crop + max pooling", ["lung_crop=true", "pooling=max"]),
    "crop-attention": ("lung crop + attention pooling", ["lung_crop=true", "pooling=attention"]),
    "lung-window": (
        "HU window [-1000, -200]: more contrast for ground glass",
        ["hu_window=[-1000,-200]"],
    ),
    "crop-window": (
        "lung crop + window [-1000, -200]",
        ["lung_crop=true", "hu_window=[-1000,-200]"],
    ),
    "density": ("a density branch (32-bin soft histogram)", ["density_bins=32"]),
    "crop-density": ("lung crop + density branch", ["lung_crop=true", "density_bins=32"]),
    "crop-density-max": (
        "lung crop + density branch + max pooling",
        ["lung_crop=true", "density_bins=32", "pooling=max"],
    ),
    "lung-only": ("the lungs only (outside blanked to air)", ["lung_crop=true", "lung_only=true"]),
    "only-density": (
        "the lungs only + density branch",
        ["lung_crop=true", "lung_only=true", "density_bins=32"],
    ),
    "today": (
        "the recipe before pretraining (lung crop; no density branch, random initialisation)",
        ["density_bins=0", 'init_weights=""'],
    ),
    "scratch-density": (
        "+ density branch, random initialisation",
        ["density_bins=32", 'init_weights=""'],
    ),
    "init": (
        "+ density branch, started from the weights pretrained on generated scans",
        ["density_bins=32", "init_weights=generated"],
    ),
    "init-lr-1e-4": (
        "+ density branch, from the pretrained weights, learning rate 1e-4 (fine-tuning)",
        ["density_bins=32", "init_weights=generated", "learning_rate=0.0001"],
    ),
    "crop-window-max": (
        "lung crop + window [-1000, -200] + max pooling",
        ["lung_crop=true", "hu_window=[-1000,-200]", "pooling=max"],
    ),
}


def roc_auc_oof(path: Path) -> float | None:
    from sklearn.metrics import roc_auc_score

    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["prob_abnormal"] != ""]
    labels = [int(r["label"]) for r in rows]
    if len(set(labels)) < 2:
        return None
    return float(roc_auc_score(labels, [float(r["prob_abnormal"]) for r in rows]))


def run_choice(name: str, sets: list[str], args: argparse.Namespace) -> dict:
    out = args.out / name
    summary = out / "cv_summary.json"
    started = time.perf_counter()
    if not summary.exists():
        command = [
            sys.executable,
            "-m",
            "app.train",
            "--recipe",
            "small-data",
            "--data",
            str(args.data),
            "--folds",
            str(args.folds),
            "--seed",
            str(args.seed),
            "--output",
            str(out),
            "--no-progress",
            *(["--resume"] if out.exists() else []),
        ]
        for value in [*args.base, *sets]:
            command += ["--set", value]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    stats = json.loads(summary.read_text())
    tested: dict = {}
    if args.test is not None:  # the CV ensemble on new scans, through app.evaluate
        evaluation = out / "evaluate"
        if not (evaluation / "metrics.json").exists():
            command = [sys.executable, "-m", "app.evaluate", "--data", str(args.test),
                       "--checkpoint", str(out), "--output", str(evaluation), "--no-progress",
                       "--overwrite"]  # fmt: skip
            subprocess.run(command, cwd=REPO, check=False, stdout=subprocess.DEVNULL)
        metrics = json.loads((evaluation / "metrics.json").read_text())
        auc = metrics["metrics"]["roc_auc"]
        tested = {"test_auc": auc["value"], "test_low": auc["low"], "test_high": auc["high"]}
        baseline = metrics.get("baseline") or {}
        if "difference" in baseline:
            diff = baseline["difference"]
            tested |= {
                "baseline_auc": baseline["roc_auc"]["value"],
                "diff": diff["value"],
                "diff_low": diff["low"],
                "diff_high": diff["high"],
            }
    return {
        "choice": name,
        "sets": [*args.base, *sets],
        "folds_auc": [f.get("val_auc") for f in stats["folds"]],
        "auc_mean": stats["mean_sd"]["val_auc"]["mean"],
        "auc_sd": stats["mean_sd"]["val_auc"]["sd"],
        "acc_mean": stats["mean_sd"]["val_acc"]["mean"],
        "acc_sd": stats["mean_sd"]["val_acc"]["sd"],
        "oof_auc": roc_auc_oof(out / "oof_predictions.csv"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        **tested,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="labelled scans (class folders)")
    p.add_argument("--out", type=Path, required=True, help="folder of the choices' CV runs")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=sorted(CHOICES), help="these choices only")
    p.add_argument("--base", nargs="*", default=[], help="ID=VALUE settings for every choice")
    p.add_argument(
        "--test", type=Path, help="new labelled scans: each choice's CV ensemble evaluated on them"
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or CHOICES:
        rows.append(run_choice(name, CHOICES[name][1], args))
        row = rows[-1]
        (args.out / "study.json").write_text(json.dumps(rows, indent=1))  # as it goes
        print(
            f"{name}: ROC-AUC {row['auc_mean']:.3f} +- {row['auc_sd']:.3f} "
            f"(folds {', '.join(f'{a:.3f}' for a in row['folds_auc'])}), out-of-fold "
            f"{row['oof_auc']:.3f}, accuracy {row['acc_mean']:.3f} +- {row['acc_sd']:.3f}",
            flush=True,
        )
    (args.out / "study.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| choice | settings | ROC-AUC mean +- sd | folds | out-of-fold ROC-AUC | accuracy "
        "| ensemble on new scans (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        test = (
            f"{row['test_auc']:.3f} ({row['test_low']:.3f}-{row['test_high']:.3f})"
            if "test_auc" in row
            else "-"
        )
        lines.append(
            f"| {CHOICES[row['choice']][0]} | `{' '.join(row['sets']) or '-'}` | "
            f"{row['auc_mean']:.3f} +- {row['auc_sd']:.3f} | "
            f"{' / '.join(f'{a:.3f}' for a in row['folds_auc'])} | {row['oof_auc']:.3f} | "
            f"{row['acc_mean']:.3f} +- {row['acc_sd']:.3f} | {test} |"
        )
    (args.out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
