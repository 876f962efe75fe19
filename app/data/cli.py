"""python -m app.data: download MosMedData, or generate the MosMed-like default dataset.

python -m app.data download [--root DIR]
python -m app.data synth OUT [--per-class N] [--shape X Y Z] [--seed S] [--difficulty D] [--workers N] [--severity]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from app.cli import add_progress_option, config_values, count, fail, show_progress
from app.errors import CTClassifyError

DEFAULT_ROOT = Path("data")
#: the generator's settings of strength 0 to 1, with what each adds (in both classes alike)
STRENGTHS = {
    "confounders": "dependent density, expiration, vessels and blur in both classes alike, which "
    "make lung density mislead as in real CT",
    "shift": "a shifted domain (elongated, lower-contrast lesions, more noise) for tests on "
    "settings that neither pretraining nor the recipe's choice saw",
    "hila": "large hilar vessels in both classes, as real CT has them",
    "trees": "3D vessel trees with partial volume in both classes (up to 6 per lung at 1)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch CT-0.zip and CT-23.zip into ROOT/MosMedData")
    dl.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help="folder to download into (default: %(default)s)",
    )
    dl.add_argument("--base-url", default=None, help="mirror to fetch the archives from")
    dl.add_argument("--keep-archives", action="store_true", help="keep the zips after unpacking")
    add_progress_option(dl)
    _add_synth_parser(sub.add_parser("synth", help="write a generated MosMed-like dataset"))
    return parser


def _add_synth_parser(sy: argparse.ArgumentParser) -> None:
    sy.add_argument("out", type=Path, help="output folder (gets CT-0/ and CT-23/)")
    defaults = config_values("synth.yaml")["synth"]  # as app.data.synth.synth_defaults()
    sy.add_argument(
        "--per-class",
        type=int,
        default=int(defaults["per_class"]),
        help="scans per class (default: %(default)s)",
    )
    sy.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="voxels per scan (default: 512 512 and 30-70 slices, like MosMed)",
    )
    sy.add_argument(
        "--seed",
        type=int,
        default=int(defaults["seed"]),
        help="seed of the dataset (default %(default)s)",
    )
    for name, what in STRENGTHS.items():
        sy.add_argument(
            f"--{name}",
            type=float,
            default=float(defaults[name]),
            help=f"0 to 1 (default %(default)s): {what}",
        )
    sy.add_argument(
        "--severity",
        action="store_true",
        help="MosMedData's severity grades instead: --per-class scans in each of CT-0..CT-4, "
        "the share of lung involved drawn within each grade's range (CT-1 2-25 %%, CT-2 25-50 %%, "
        "CT-3 50-75 %%, CT-4 75-95 %%), for app.train --task severity",
    )
    sy.add_argument(
        "--masks",
        action="store_true",
        help="also write each scan's lesion mask (uint8 NIfTI, same grid) to OUT/masks/",
    )
    sy.add_argument(
        "--difficulty",
        type=float,
        default=float(defaults["difficulty"]),
        help="0 (large, dense findings) .. 1 (few, faint ones); default %(default)s",
    )
    sy.add_argument(
        "--workers",
        type=count,
        default=os.cpu_count() or 1,
        help="processes generating scans, at most the CPU cores (default: the CPU cores, "
        "%(default)s); the files are the same with any number",
    )
    add_progress_option(sy)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        if args.command == "download":
            from app.config import load_config
            from app.data.download import download_mosmed

            archives = load_config("train.yaml").get_parsed_content("mosmed_archives")
            download_mosmed(
                args.root,
                archives,
                base_url=args.base_url,
                keep_archives=args.keep_archives,
                progress=show_progress(args.no_progress),
            )
        else:
            from app.data.synth import write_dataset

            if args.per_class < 1:
                print("error: --per-class must be at least 1", file=sys.stderr)
                return 2
            if not 0 <= args.difficulty <= 1:
                print("error: --difficulty must be in [0, 1]", file=sys.stderr)
                return 2
            for name in STRENGTHS:
                if not 0 <= getattr(args, name) <= 1:
                    print(f"error: --{name} must be in [0, 1]", file=sys.stderr)
                    return 2
            items = write_dataset(
                args.out,
                args.per_class,
                tuple(args.shape) if args.shape else None,
                seed=args.seed,
                difficulty=args.difficulty,
                progress=show_progress(args.no_progress),
                masks=args.masks,
                confounders=args.confounders,
                shift=args.shift,
                hila=args.hila,
                trees=args.trees,
                workers=args.workers,
                severity=args.severity,
            )
            print(f"wrote {len(items)} scans to {args.out}")
    except CTClassifyError as exc:  # a failed download: 1; refused data: 2
        return fail(exc)
    return 0
