"""Imbalanced cohorts: what class weighting and the weighted sampler do on new scans (issue 34).

    python -m studies.imbalance --out /tmp/imb            # ~30 min, 2 CPU cores

For each ratio of normal to abnormal training scans (1:1, 1:3, 1:10: normal is the minority,
as in MosMedData's 254 against 856) and each data seed, ``app.data synth`` writes a training
set (its normal scans thinned to the ratio) and ``python -m app.train --recipe small-data``
trains once per option (``none``; ``--class-weighting pos_weight``; ``--sampler weighted``), its
end choosing the threshold on the validation split as it is (under the imbalance). Each model is
scored by ``python -m app.evaluate`` on 80 new balanced scans (another seed range): ROC-AUC,
sensitivity and specificity at the model's own threshold, balanced accuracy, PR-AUC, the
expected calibration error. Results go to ``OUT/imbalance.json`` and ``OUT/imbalance.md`` as
each run finishes (a rerun skips the finished ones).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OPTIONS = {
    "none": [],
    "pos_weight": ["--class-weighting", "pos_weight"],
    "weighted sampler": ["--sampler", "weighted"],
}


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, *args], check=True, stdout=f, stderr=f, cwd=REPO)


def _training_set(
    out: Path, ratio: int, abnormal: int, seed: int, common: list[str], log: Path
) -> Path:
    """``abnormal`` abnormal scans and ``abnormal // ratio`` normal ones."""
    data = out / f"train-1to{ratio}-seed{seed}"
    if not (data / ".complete").exists():
        _run(
            [
                "-m",
                "app.data",
                "synth",
                str(data),
                "--per-class",
                str(abnormal),
                "--seed",
                str(seed),
                *common,
            ],
            log,
        )
        for path in sorted((data / "CT-0").glob("*.nii.gz"))[abnormal // ratio :]:
            path.unlink()
    return data


def _table(results: dict[str, dict]) -> str:
    lines = [
        "| ratio (normal:abnormal) | option | ROC-AUC | sensitivity | specificity | balanced accuracy | PR-AUC | ECE | threshold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["ratio"], r["option"]), []).append(r)

    def spread(rows: list[dict], key: str) -> str:
        values = np.array([r[key] for r in rows])
        return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"

    for (ratio, option), rows in sorted(groups.items()):
        keys = (
            "roc_auc",
            "sensitivity",
            "specificity",
            "balanced_accuracy",
            "pr_auc",
            "ece",
            "threshold",
        )
        cells = " | ".join(spread(rows, k) for k in keys)
        lines.append(f"| {ratio} ({len(rows)} seeds) | {option} | {cells} |")
    return (
        "\n".join(lines)
        + "\n\nmean (min-max) over the seeds; each model on 80 new balanced scans.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ratios", type=int, nargs="*", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1000])
    parser.add_argument("--abnormal", type=int, default=40, help="abnormal training scans")
    parser.add_argument("--difficulty", type=float, default=0.7)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--spatial-size",
        type=int,
        nargs=3,
        default=[48, 48, 48],
        help="network input (the recipe's 64 x 64 x 48 costs 1.8x more)",
    )
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    results_path = out / "imbalance.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    common = ["--shape", "96", "96", "32", "--difficulty", str(args.difficulty), "--no-progress"]
    test = out / "test"
    if not (test / ".complete").exists():
        _run(
            ["-m", "app.data", "synth", str(test), "--per-class", "40", "--seed", "50000", *common],
            log,
        )
    for seed in args.seeds:
        for ratio in args.ratios:
            data = _training_set(out, ratio, args.abnormal, seed, common, log)
            for option, flags in OPTIONS.items():
                key = f"1:{ratio} {option} seed {seed}"
                if key in results:
                    continue
                run = out / "runs" / key.replace(" ", "_").replace(":", "to")
                _run(["-m", "app.train", "--data", str(data), "--output", str(run), "--recipe", "small-data",
                      "--epochs", str(args.epochs), "--seed", str(seed), "--device", "cpu", "--overwrite",
                      "--spatial-size", *map(str, args.spatial_size),
                      "--no-progress", *flags], log)  # fmt: skip
                evaluation = run / "eval"
                _run(["-m", "app.evaluate", "--data", str(test), "--checkpoint", str(run), "--output",
                      str(evaluation), "--device", "cpu", "--no-progress", "--overwrite"], log)  # fmt: skip
                m = json.loads((evaluation / "metrics.json").read_text())["metrics"]
                results[key] = {
                    "ratio": f"1:{ratio}", "option": option, "seed": seed,
                    **{k: m[k]["value"] for k in ("roc_auc", "sensitivity", "specificity", "balanced_accuracy", "pr_auc")},
                    "ece": m["ece"], "threshold": m["threshold"],
                }  # fmt: skip
                results_path.write_text(json.dumps(results, indent=1))
                (out / "imbalance.md").write_text(_table(results))
                shutil.rmtree(run / "eval" / "montages", ignore_errors=True)
    print((out / "imbalance.md").read_text())


if __name__ == "__main__":
    main()
