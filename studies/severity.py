"""Severity grading: an ordinal (CORAL) head against plain softmax, on new scans (issue 34).

    python -m studies.severity --out /tmp/sev            # ~40 min, 2 CPU cores

``app.data synth --severity`` writes a training set (``--per-grade`` scans in each of CT-0..CT-4,
the share of lung involved drawn within each grade's range; the demo's 128 x 128 x 40 scans at
difficulty 0.3) per data seed and a test set from another seed range. For each head (``coral``,
``softmax``) and seed, ``python -m app.train --recipe small-data --task severity`` trains once
and ``python -m app.evaluate`` scores it on the new scans: quadratic-weighted kappa, mean
absolute grade error, exact-grade accuracy, the binary view's ROC-AUC (normal vs any grade), and
the burden baseline's kappa. Results go to ``OUT/severity.json`` and ``OUT/severity.md`` as each
run finishes (a rerun skips the finished ones).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = ("128", "128", "40")


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, *args], check=True, stdout=f, stderr=f, cwd=REPO)


def _synth(folder: Path, per_grade: int, seed: int, difficulty: float, log: Path) -> None:
    if not (folder / "CT-4").is_dir():
        _run(["-m", "app.data", "synth", str(folder), "--severity", "--per-class", str(per_grade),
              "--shape", *SHAPE, "--seed", str(seed), "--difficulty", str(difficulty),
              "--no-progress"], log)  # fmt: skip


def _score(metrics: dict) -> dict:
    sev = metrics["severity"]
    base = sev.get("baseline") or {}
    return {
        "kappa": sev["quadratic_weighted_kappa"],
        "mae": sev["mean_absolute_error"],
        "accuracy": sev["accuracy"],
        "binary_auc": metrics["metrics"]["roc_auc"],
        "baseline_kappa": base.get("quadratic_weighted_kappa"),
        "baseline_mae": base.get("mean_absolute_error"),
        "confusion": sev["confusion"],
    }


def _table(results: dict, path: Path) -> None:
    def ci(e: dict | None) -> str:
        return "" if not e else f"{e['value']:.3f} ({e['low']:.3f}-{e['high']:.3f})"

    lines = [
        "| head | seed | kappa (95% CI) | grade error | exact grade | ROC-AUC, any finding | "
        "burden baseline kappa | baseline grade error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        head, seed = key.split("/")
        lines.append(
            f"| {head} | {seed} | {ci(r['kappa'])} | {ci(r['mae'])} | {ci(r['accuracy'])} | "
            f"{ci(r['binary_auc'])} | {ci(r['baseline_kappa'])} | {ci(r['baseline_mae'])} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-grade", type=int, default=24, help="training scans per grade")
    parser.add_argument("--test-per-grade", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-seed", type=int, default=100)
    parser.add_argument("--difficulty", type=float, default=0.3)
    parser.add_argument("--heads", nargs="+", default=["coral", "softmax"])
    parser.add_argument("--set", nargs="*", default=[], help="--set values for app.train")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    test = out / "test"
    _synth(test, args.test_per_grade, args.test_seed, args.difficulty, log)
    results_path = out / "severity.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in args.seeds:
        train = out / f"train{seed}"
        _synth(train, args.per_grade, seed, args.difficulty, log)
        for head in args.heads:
            key = f"{head}/{seed}"
            if key in results:
                continue
            run, evaluated = out / f"run-{head}-{seed}", out / f"eval-{head}-{seed}"
            sets = [x for v in [f"ordinal_head={head}", *args.set] for x in ("--set", v)]
            _run(["-m", "app.train", "--data", str(train), "--recipe", "small-data", "--task",
                  "severity", "--output", str(run), "--seed", str(seed), "--overwrite",
                  "--no-progress", *sets], log)  # fmt: skip
            _run(["-m", "app.evaluate", "--data", str(test), "--checkpoint", str(run),
                  "--output", str(evaluated), "--overwrite", "--no-progress"], log)  # fmt: skip
            metrics = json.loads((evaluated / "metrics.json").read_text())
            results[key] = _score(metrics)
            results_path.write_text(json.dumps(results, indent=1))
            _table(results, out / "severity.md")


if __name__ == "__main__":
    main()
