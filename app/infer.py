"""python -m app.infer FOLDER: classify every NIfTI file and DICOM series under FOLDER.

    python -m app.infer scans/ --checkpoint runs/demo --output results/ --report --saliency

Writes OUT/predictions.csv (path, prob_abnormal, label, warnings, error, seconds, fold_probs,
tta_spread) row by row,
OUT/predictions.json and OUT/model.json (the model and threshold that wrote the folder).
Running the same command again completes an interrupted folder and retries failed inputs.
Exit status: 0 all classified, 1 some inputs failed (the rest are written), 2 usage error, no
inputs, an unusable checkpoint, or an output folder of another model.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import re
import sys
from pathlib import Path
from typing import Any

from app.cli import (
    add_device_option,
    add_precision_option,
    add_progress_option,
    add_reading_options,
    config_values,
    count,
    fail,
    show_progress,
)
from app.errors import CTClassifyError, UsageError
from app.inference.report import write_report
from app.plots import plot_montage
from app.runtime.allocator import reuse_freed_memory
from app.runtime.scanqc import Limits, TrainingContext
from app.runtime.scans import find_inputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="folder of scans (searched recursively), or one scan")
    p.add_argument(
        "--checkpoint", help="run folder, checkpoint file or exported bundle (default: newest run)"
    )
    p.add_argument("--output", type=Path, help="output folder (default: outputs/<FOLDER name>)")
    add_device_option(p, "where the model runs (default auto: CUDA when there is a GPU)")
    defaults = config_values("common.yaml", "inference.yaml")
    add_reading_options(p, defaults)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="P(abnormal) from which a scan is 'abnormal' (default: the model's own, "
        f"{defaults['threshold']} unless it was trained with another)",
    )
    add_precision_option(p, default="auto")
    p.add_argument(
        "--saliency",
        action="store_true",
        help="save OUT/saliency/NAME.png (one colour scale for all scans) and NAME.nii.gz on the "
        "scan's own grid: where the model looks (the smoothed gradient of its logit), not a "
        "finding; one network: for a CV folder pass one fold's folder",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each scan with its left-right mirror; the spread "
        "between them goes to the tta_spread column as an uncertainty",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write OUT/report.html (a row per scan) with each scan's montage in OUT/montages/",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start OUT afresh (predictions of another model or threshold are replaced)",
    )
    p.add_argument(
        "--max-voxels",
        type=count,
        default=None,
        metavar="N",
        help=f"refuse larger scans, e.g. 300000000 or 300M (default {Limits.max_voxels:,})",
    )
    add_progress_option(p)
    return p


def safe_name(key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key).name)[:60]
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = output_folder(args)
        clf = load_model(args)
        if args.saliency and clf.folds:
            raise UsageError(
                f"--saliency needs one network; {args.checkpoint} is a cross-validation ensemble "
                f"of {clf.folds} fold models: pass one fold's folder (e.g. "
                f"{Path(str(args.checkpoint)) / 'fold-0'}) for its saliency"
            )
        inputs = find_scan_inputs(args.folder)
        log = open_log(out, clf, overwrite=args.overwrite)
    except CTClassifyError as exc:  # UsageError, CheckpointError, OutputFolderError: 2
        return fail(exc)
    announce(clf, chosen=bool(args.checkpoint), inputs=inputs, log=log)
    images: dict[str, dict[str, Path]] = {}
    try:
        classify(clf, inputs, log, out, args, images)
    except OSError as exc:  # e.g. a full disk: finished rows are on disk already
        print(
            f"error: cannot write to {out}: {exc.strerror or exc}; the finished rows are kept, run "
            "the same command again to complete the folder",
            file=sys.stderr,
        )
        return 1
    if args.report:
        generated = TrainingContext.from_settings(clf.settings).generated
        print(f"report: {report(log.rows, out, images, clf.describe(), generated)}")
    return summarise(log, clf)


def output_folder(args: argparse.Namespace) -> Path:
    """The output folder; refuses a missing input, a bad threshold, an output inside the input."""
    folder: Path = args.folder
    if not folder.exists():
        raise UsageError(f"{folder} does not exist")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UsageError("--threshold must be in [0, 1]")
    out: Path = args.output or Path("outputs") / (folder.resolve().name or "scans")
    if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        raise UsageError(
            f"the output folder {out} is inside the input folder: choose another --output"
        )
    return out


def load_model(args: argparse.Namespace) -> Any:
    from app.inference.classifier import Classifier

    limits = Limits() if args.max_voxels is None else Limits(max_voxels=args.max_voxels)
    clf = Classifier.load(
        args.checkpoint,
        device=args.device,
        threshold=args.threshold,
        limits=limits,
        precision=args.precision,
    )
    clf.tta = bool(getattr(args, "tta", False))
    # a process of its own: keep freed blocks for the next scan (configs' reuse_freed_memory)
    reuse_freed_memory(clf.reuse_freed_memory and clf.device.type == "cpu")
    return clf


def find_scan_inputs(folder: Path) -> list[Any]:

    inputs = find_inputs(folder)
    if not inputs:
        raise UsageError(f"no .nii/.nii.gz file or DICOM series under {folder}")
    return inputs


def open_log(out: Path, clf: Any, overwrite: bool) -> Any:
    from app.inference.predictions import PredictionLog

    identity = clf.identity()
    if clf.tta:  # predictions with and without test-time augmentation differ: never mixed
        identity["tta"] = "left-right flip"
    return PredictionLog(out, overwrite=overwrite, model=identity)


def announce(clf: Any, chosen: bool, inputs: list[Any], log: Any) -> None:
    """The model line, its caveats, and how much of the folder is done."""
    default = "" if chosen else " (the newest run under runs/: choose with --checkpoint)"
    print(f"model: {clf.describe()}; device {clf.device}{default}", flush=True)
    for note in clf.caveats():
        print(f"warning: {note}", flush=True)
    retried = f" ({len(log.retried)} that failed before are retried)" if log.retried else ""
    done = sum(1 for s in inputs if s.key in log.done)
    print(f"{len(inputs)} inputs, {done} already in {log.csv_path}{retried}", flush=True)


def classify(
    clf: Any,
    inputs: list[Any],
    log: Any,
    out: Path,
    args: argparse.Namespace,
    images: dict[str, dict[str, Path]],
) -> None:
    """Classify the inputs not yet in ``log``, one fsync'd row and one console line each."""
    from tqdm import tqdm

    todo = [s for s in inputs if s.key not in log.done]
    bar = tqdm(
        total=len(todo), unit="scan", disable=not show_progress(args.no_progress), file=sys.stderr
    )
    try:
        for pred in clf.predict_many(
            todo,
            batch_size=args.batch_size,
            workers=args.workers,
            keep_images=args.saliency or args.report,
        ):
            draw_pictures(clf, pred, out, args, images)
            log.append(pred)
            bar.write(pred.sentence())
            bar.update(1)
    finally:
        bar.close()
        with contextlib.suppress(OSError):
            log.write_json()
        log.close()


def draw_pictures(
    clf: Any, pred: Any, out: Path, args: argparse.Namespace, images: dict[str, dict[str, Path]]
) -> None:
    """The report's montage and the saliency montage of one prediction, as asked."""

    image = getattr(pred, "image", None)
    if image is None:
        return
    name = safe_name(pred.path)
    pics = images.setdefault(pred.path, {})
    if args.report:
        pics["montage"] = out / "montages" / f"{name}.png"
        title = (
            f"{Path(pred.path).name}: P(abnormal) {100 * pred.prob_abnormal:.2f}% -> {pred.label}"
        )
        plot_montage(image.numpy(), pics["montage"], rows=2, columns=5, title=title)
    if args.saliency:
        pics["saliency"] = out / "saliency" / f"{name}.png"
        # one colour scale for every scan: the map (its maximum 1) times P(abnormal), so a
        # scan the model finds normal does not glow
        overlay = clf.saliency(image) * float(pred.prob_abnormal)
        plot_montage(
            image.numpy(),
            pics["saliency"],
            overlay=overlay,
            title=f"{Path(pred.path).name}: saliency x P(abnormal) = {pred.prob_abnormal:.3f}: "
            "the model's attention, not a finding",
        )
        if str(pred.path).endswith((".nii", ".nii.gz")):  # on the scan's own grid, for a viewer
            from app.inference.saliency import write_saliency_nifti

            write_saliency_nifti(
                overlay,
                pred.path,
                out / "saliency" / f"{name}.nii.gz",
                axcodes=str(clf.settings["axcodes"]),
                lung_crop=bool(clf.settings.get("lung_crop")),
            )


def report(
    rows: list[dict[str, str]],
    out: Path,
    images: dict[str, dict[str, Path]],
    model: str = "",
    generated: bool = False,
) -> Path:
    """OUT/report.html, with the pictures of scans classified by an earlier, interrupted run."""

    for r in rows:
        name = safe_name(r["path"])
        pics = images.setdefault(r["path"], {})
        for kind, folder_name in (("montage", "montages"), ("saliency", "saliency")):
            candidate = out / folder_name / f"{name}.png"
            if kind not in pics and candidate.is_file():
                pics[kind] = candidate

    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return write_report(rows, out, images, model=model, date=date, generated=generated)


def summarise(log: Any, clf: Any) -> int:
    """The summary line; exit status 1 when some inputs failed."""
    rows = log.rows
    failed = [r for r in rows if r["error"]]
    classified = [r for r in rows if r["prob_abnormal"]]
    abnormal = sum(1 for r in classified if r["label"] == clf.class_names[1])
    warned = sum(1 for r in classified if r["warnings"])
    print(
        f"summary: {len(classified)} classified ({abnormal} abnormal, {len(classified) - abnormal} "
        f"normal, {warned} with warnings), {len(failed)} failed; {log.csv_path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
