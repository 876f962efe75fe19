"""Does bfloat16 inference change accuracy? fp32 and bf16 predictions of one model, side by side.

    python -m studies.precision --checkpoint runs/demo --per-class 60

Generates ``--per-class`` new scans per class (a seed the model never saw, default difficulty),
classifies them with ``--precision fp32`` (the CPU default) and ``--precision bf16``, and prints
JSON: ROC-AUC and accuracy of each, the largest probability difference and the labels that flip.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def roc_auc(probs: list[float], labels: list[int]) -> float:
    """Probability that an abnormal scan scores above a normal one (ties count half)."""
    pos = [p for p, y in zip(probs, labels, strict=True) if y == 1]
    neg = [p for p, y in zip(probs, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--difficulty", type=float, default=0.5)
    args = parser.parse_args(argv)
    from app.data.synth import write_dataset
    from app.inference.classifier import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        items = write_dataset(
            Path(tmp),
            args.per_class,
            shape=(128, 128, 40),
            seed=args.seed,
            difficulty=args.difficulty,
            progress=False,
        )
        paths = [str(i["image"]) for i in items]
        labels = [int(i["label"]) for i in items]  # type: ignore[call-overload]
        probs = {}
        for precision in ("fp32", "bf16"):
            clf = Classifier.load(args.checkpoint, device="cpu", precision=precision)
            preds = list(clf.predict_many(paths, batch_size=2))
            assert all(p.ok for p in preds), [p.error for p in preds if not p.ok]
            probs[precision] = [float(p.prob_abnormal) for p in preds]  # type: ignore[arg-type]
            threshold = clf.threshold
    result: dict[str, object] = {"scans": len(paths), "checkpoint": args.checkpoint}
    for precision, p in probs.items():
        correct = sum((q >= threshold) == bool(y) for q, y in zip(p, labels, strict=True))
        result[precision] = {"roc_auc": roc_auc(p, labels), "accuracy": correct / len(labels)}
    diffs = [abs(a - b) for a, b in zip(probs["fp32"], probs["bf16"], strict=True)]
    result["max_abs_prob_diff"] = max(diffs)
    result["label_flips"] = sum(
        (a >= threshold) != (b >= threshold)
        for a, b in zip(probs["fp32"], probs["bf16"], strict=True)
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
