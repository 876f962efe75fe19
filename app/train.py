"""python -m app.train: train the 3D CNN through MONAI's Ignite engines, from the bundle configs.

    python -m app.train --demo                     # generated data, settings for a 2-core CPU
    python -m app.train --data data/MosMedData --output runs/mosmed
    python -m app.train --output runs/mosmed --epochs 120 --resume

Every default comes from configs/common.yaml and configs/train.yaml (with --demo:
configs/recipes/small-data.yaml and configs/demo.yaml on top; --recipe NAME: that recipe);
--set ID=VALUE overrides any config id.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.cli import (
    add_device_option,
    add_precision_option,
    add_progress_option,
    default_text,
    fail,
    show_progress,
)
from app.config import TASKS, parse_set_options
from app.errors import ConfigError, CTClassifyError
from app.readback import read_cv_summary
from app.run_folder import CV_SUMMARY
from app.training.recipes import DEMO_RECIPE, recipe_file, recipes

if TYPE_CHECKING:
    from app.training.workflow import TrainResult, train

__all__ = ["TrainResult", "build_parser", "main", "overrides_from_args", "train"]


def __getattr__(name: str) -> Any:
    """``train`` and ``TrainResult`` (``app.training.workflow``), imported when first used: the
    command line's ``--help`` loads neither PyTorch nor MONAI (tests/test_cli.py checks it)."""
    if name in ("train", "TrainResult"):
        from app.training import workflow

        return getattr(workflow, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="class-folder root (CT-0/, CT-23/...) or datalist")
    src.add_argument(
        "--demo",
        action="store_true",
        help="generate the MosMed-like demo data if needed and train a CPU-sized model",
    )
    p.add_argument("--output", type=Path, help="run folder (default: runs/run-<date>-<time>)")
    p.add_argument(
        "--recipe",
        choices=recipes(),
        help="a named recipe read after train.yaml (configs/recipes/NAME.yaml); default: the "
        f"reference's; --demo uses {DEMO_RECIPE}",
    )

    p.add_argument(
        "--task",
        choices=TASKS,
        help="binary: normal vs abnormal (the reference's; default); severity: grades CT-0..CT-4 "
        "from class folders of those names, an ordinal head (configs/severity.yaml)",
    )
    _add_setting_options(p)
    _add_run_options(p)
    add_progress_option(p)
    return p


def _add_setting_options(p: argparse.ArgumentParser) -> None:
    """Options that override a config setting (their defaults: the configs')."""

    def default(key: str) -> str:
        return default_text(key, "common.yaml", "train.yaml", demo=recipe_file(DEMO_RECIPE))

    p.add_argument("--epochs", type=int, help=f"maximum epochs {default('epochs')}")
    p.add_argument("--batch-size", type=int, help=f"scans per step {default('batch_size')}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate {default('learning_rate')}")
    p.add_argument(
        "--patience", type=int, help=f"early-stopping patience in epochs {default('patience')}"
    )
    p.add_argument(
        "--spatial-size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help=f"network input size {default('spatial_size')}",
    )
    p.add_argument(
        "--cache",
        choices=("memory", "device", "disk", "none"),
        help="cache of the deterministic preprocessing (default: device, i.e. GPU memory, with "
        "CUDA; memory otherwise)",
    )
    p.add_argument(
        "--seed", type=int, help=f"seed of split, initialisation and augmentation {default('seed')}"
    )
    p.add_argument(
        "--class-weighting",
        choices=("none", "pos_weight"),
        help="imbalanced cohorts: pos_weight weighs each class equally in the loss "
        f"{default('class_weighting')}",
    )
    p.add_argument(
        "--sampler",
        choices=("shuffle", "weighted"),
        help=f"imbalanced cohorts: weighted draws each class about equally often {default('sampler')}",
    )
    add_device_option(
        p,
        "where to train (default auto: CUDA when there is a GPU; under torchrun each process "
        "takes its LOCAL_RANK's GPU)",
    )
    add_precision_option(p)
    p.add_argument(
        "--workers", type=int, help=f"data-loading worker processes {default('num_workers')}"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="override any config id, e.g. --set bn_momentum=0.1 (repeatable)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options about the run: its start, resuming, cross-validation, the run folder."""
    p.add_argument(
        "--init",
        metavar="WEIGHTS",
        help="start from these weights: 'generated' (the network pretrained on generated scans "
        "that ships with the package; fits --recipe small-data) or a checkpoint file or run "
        "folder of app.train (default: the network's own random initialisation)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument(
        "--tracking",
        choices=("mlflow",),
        help="log the run to MLflow: parameters, the resolved config, per-epoch metrics, the "
        "curves, the model card, the kept checkpoint (store: MLFLOW_TRACKING_URI, else "
        "OUTPUT/mlruns.db); cross-validation: one run per fold under a parent run",
    )
    p.add_argument(
        "--folds",
        type=int,
        help="cross-validation: K stratified folds, each a run in OUTPUT/fold-k; finished folds "
        "are kept, started ones resumed; then OUTPUT/cv_summary.csv, oof_predictions.csv, "
        "cv_calibration.json (threshold, temperature)",
    )
    p.add_argument("--fold", type=int, help="with --folds: run this fold only (0 to K-1)")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        help="with --folds: the threshold reaching this out-of-fold sensitivity (default: "
        "Youden's J)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides for the options given on the command line (and only those)."""
    mapping = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "patience": args.patience,
        "spatial_size": list(args.spatial_size) if args.spatial_size else None,
        "cache": args.cache,
        "seed": args.seed,
        "precision": args.precision,
        "num_workers": args.workers,
        "init_weights": args.init,
        "class_weighting": args.class_weighting,
        "sampler": args.sampler,
    }
    out = {k: v for k, v in mapping.items() if v is not None}
    from app.training.distributed import launched_distributed

    if args.device == "cpu" or (args.device == "cuda" and not launched_distributed()):
        out["device"] = f"$torch.device('{args.device}')"
    # --device cuda under torchrun: multi_gpu_train.yaml's device, cuda:LOCAL_RANK, is the one
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available here")
    if not show_progress(args.no_progress):
        out["progress"] = False
    out.update(parse_set_options(args.sets))
    return out


T = TypeVar("T")


def _attempt(call: Callable[[], T], stopped_hint: str = "") -> tuple[T | None, int]:
    """``(result, 0)``, or ``(None, exit status)`` with the error printed (``app.errors``: 2
    for refused settings, data or files, 130 for a signal, 1 for any other error of the app)."""
    from app.training.workflow import Interrupted  # the work, loaded once the arguments parsed

    try:
        return call(), 0
    except Interrupted as exc:
        print(f"stopped: {exc}{stopped_hint}", file=sys.stderr)
        return None, exc.exit_status
    except CTClassifyError as exc:
        return None, fail(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and args.output is None:
        print("error: --resume needs --output RUN_DIR", file=sys.stderr)
        return 2
    if args.folds is not None or args.fold is not None:
        return _cross_validate(args)
    from app.training.workflow import train

    result, code = _attempt(
        lambda: train(
            args.data,
            args.output,
            demo=args.demo,
            resume=args.resume,
            overwrite=args.overwrite,
            overrides=overrides_from_args(args),
            recipe=args.recipe,
            tracking=args.tracking,
            task=args.task,
        )
    )
    if result is None:
        return code
    from app.training.distributed import rank

    if rank() != 0:
        return 0
    for line in result.summary_lines():
        print(line)
    return 0


def _cross_validate(args: argparse.Namespace) -> int:
    from app.training.cross_validation import cross_validate

    if args.folds is None or args.output is None:
        print("error: cross-validation needs --folds K and --output CV_DIR", file=sys.stderr)
        return 2
    if args.task == "severity":
        print("error: cross-validation is for binary runs; train a severity run on one split",
              file=sys.stderr)  # fmt: skip
        return 2
    result, code = _attempt(
        lambda: cross_validate(
            args.data,
            args.output,
            args.folds,
            only_fold=args.fold,
            demo=args.demo,
            overwrite=args.overwrite,
            overrides=overrides_from_args(args),
            target_sensitivity=args.target_sensitivity,
            recipe=args.recipe,
            tracking=args.tracking,
        ),
        stopped_hint="; continue with the same command",
    )
    if result is None:
        return code
    if result.summary is None:
        from app.run_folder import is_finished

        missing = [str(d) for d in result.fold_dirs if not is_finished(d)]
        print(f"folds still to run: {', '.join(missing)}; the summary follows when all are done")
        return 0
    print(f"cross-validation: {result.output} ({result.folds} folds)")
    for name, stat in result.summary["mean_sd"].items():
        print(f"  {name:<16} {stat['mean']:.3f} +- {stat['sd']:.3f}")

    base = read_cv_summary(result.output / CV_SUMMARY)["baseline"]
    if base:
        diff = base["difference"]
        print(
            f"  out of fold: ROC-AUC {base['model_auc']['value']:.3f}, density baseline "
            f"{base['baseline_auc']['value']:.3f}; difference {diff['value']:+.3f} "
            f"({diff['low']:+.3f} to {diff['high']:+.3f}, {diff['method']})"
            + ("" if diff["low"] > 0 else ": the model does NOT beat its baseline")
        )
    cal = result.calibration or {}
    print(
        f"threshold {cal.get('threshold_calibrated', float('nan')):g} on P(abnormal) as app.infer, "
        f"app.evaluate and the bundle report it ({cal.get('threshold_method')}, out of fold), "
        f"temperature {cal.get('temperature', float('nan')):.3f} (out-of-fold NLL "
        f"{cal.get('nll_before', float('nan')):.3f} -> {cal.get('nll_after', float('nan')):.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
