"""Pretrain the network on generated scans: the weights ``app.train --init generated`` starts from.

    python -m app.pretrain [--work .cache/pretrain] [--out nets/weights]

1. writes a wide generated dataset to ``WORK/data`` (each scan's lesion size, contrast and
   count, confounders and geometry drawn, seeded, from ``configs/pretrain.yaml``; an interrupted
   run completes when run again);
2. trains ``--recipe small-data`` on it (``app.training.workflow.train``, run folder ``WORK/run``);
3. writes the kept model's network and model settings (no optimizer, no paths) to
   ``OUT/generated.pt`` and its record (SHA-256, command, settings, data, validation figures) to
   ``OUT/generated.json``; ``--init generated`` checks the file against that digest.

The same configs and seed give the same weights on the same machine and library versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from app.cli import add_progress_option, show_progress


def _weights_folder() -> Path:
    """``nets/weights`` of the installed ``nets`` (found without importing it: --help stays fast)."""
    spec = importlib.util.find_spec("nets")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--work", type=Path, default=Path(".cache/pretrain"), help="data and run")
    p.add_argument("--out", type=Path, default=_weights_folder(), help="weights folder")
    p.add_argument("--per-class", type=int, help="scans per class (default: configs/pretrain.yaml)")
    p.add_argument("--epochs", type=int, help="epochs (default: configs/pretrain.yaml)")
    add_progress_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.errors import CTClassifyError
    from app.training import pretraining  # the work, after parsing

    settings = pretraining.pretrain_settings()
    if args.per_class is not None:
        if args.per_class < 2:
            print("error: --per-class must be at least 2", file=sys.stderr)
            return 2
        settings["per_class"] = args.per_class
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    try:
        weights, result = pretraining.pretrain(
            args.work, args.out, settings, progress=show_progress(args.no_progress)
        )
    except CTClassifyError as exc:
        from app.cli import fail

        return fail(exc)
    for line in result.summary_lines():
        print(line)
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
