"""Labels a clinician can act on: a single model's own threshold against 0.5 and against the best
any threshold reaches, on new scans (issue 30).

    python -m studies.operating_point --out /tmp/op            # ~12 min, 2 CPU cores

For each training seed: ``testdata/third_scans.py`` writes 120 training scans (the held-out
generator; ``--confounded`` its strength) and 60 new ones (another seed range),
``python -m app.train --recipe small-data`` trains (its end chooses the temperature and
threshold on the validation split), and ``python -m app.evaluate`` scores the new scans twice:
at the model's own threshold and at 0.5 (the scaled probability is 0.5 exactly where the raw one
is: the old labels). The best accuracy any threshold reaches on those scans is the ceiling a
label could reach. Results go to ``OUT/operating_point.json`` and ``.md`` as each run finishes.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, *args], check=True, stdout=f, stderr=f, cwd=REPO)


def best_accuracy(predictions: Path) -> float:
    """The best accuracy any threshold reaches on an ``app.evaluate`` predictions.csv."""
    with predictions.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("prob_abnormal")]
    probs = np.array([float(r["prob_abnormal"]) for r in rows])
    labels = np.array([int(r["true_label"]) for r in rows])
    cuts = np.concatenate([[0.0], np.unique(probs), [1.0 + 1e-9]])
    return float(max(((probs >= c).astype(int) == labels).mean() for c in cuts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 300])
    parser.add_argument("--confounded", type=float, default=0.0)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    results_path = out / "operating_point.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    third = "-m", "testdata.third_scans"
    strength = ["--confounded", str(args.confounded)]
    for seed in args.seeds:
        key = f"seed {seed}"
        if key in results:
            continue
        train, test, run = out / f"train{seed}", out / f"test{seed}", out / f"run{seed}"
        if not train.is_dir():
            _run([*third, str(train), "--per-class", "60", "--seed", str(seed), *strength], log)
        if not test.is_dir():
            _run([*third, str(test), "--per-class", "30", "--seed", str(seed + 100), *strength],
                 log)  # fmt: skip
        if not (run / "best_model.pt").is_file():
            _run(["-m", "app.train", "--data", str(train), "--recipe", "small-data", "--output",
                  str(run), "--seed", str(seed), "--overwrite", "--no-progress"], log)  # fmt: skip
        row = {}
        for name, extra in (("own", []), ("half", ["--threshold", "0.5"])):
            evaluated = out / f"eval{seed}-{name}"
            _run(["-m", "app.evaluate", "--data", str(test), "--checkpoint", str(run),
                  "--output", str(evaluated), "--no-baseline", "--overwrite", *extra], log)  # fmt: skip
            metrics = json.loads((evaluated / "metrics.json").read_text())["metrics"]
            row[name] = {k: metrics[k] for k in ("threshold", "roc_auc", "accuracy",
                                                 "sensitivity", "specificity")}  # fmt: skip
            row["best_accuracy"] = best_accuracy(evaluated / "predictions.csv")
        point = json.loads((run / "operating_point.json").read_text())
        row["chosen_on"] = {k: point[k] for k in ("method", "scans", "temperature")}
        results[key] = row
        results_path.write_text(json.dumps(results, indent=1))
        _table(results, out / "operating_point.md")


def _table(results: dict, path: Path) -> None:
    def ci(m: dict) -> str:
        return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"

    lines = [
        "| training seed | ROC-AUC (95% CI) | threshold, temperature (its own) | accuracy at its own "
        "label | sensitivity | specificity | accuracy at 0.5 | best accuracy, any threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        own, half = r["own"], r["half"]
        lines.append(
            f"| {key.split()[-1]} | {ci(own['roc_auc'])} | {own['threshold']:.4f}, "
            f"{r['chosen_on']['temperature']:.2f} | {ci(own['accuracy'])} | "
            f"{ci(own['sensitivity'])} | {ci(own['specificity'])} | {ci(half['accuracy'])} | "
            f"{r['best_accuracy']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
