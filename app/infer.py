"""python -m app.infer FOLDER: classify every NIfTI file and DICOM series under FOLDER.

    python -m app.infer scans/ --checkpoint runs/demo --output results/ --report --saliency

Writes OUT/predictions.csv (path, prob_abnormal, label, warnings, error, seconds) row by row,
OUT/predictions.json and OUT/model.json (the model and threshold that wrote the folder).
Running the same command again completes an interrupted folder and retries failed inputs.
Exit status: 0 all classified, 1 some inputs failed (the rest are written), 2 usage error, no
inputs, an unusable checkpoint, or an output folder of another model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import sys
from pathlib import Path

from app.cli import config_values, count, show_progress
from app.scanqc import Limits


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
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs (default auto: CUDA when there is a GPU)",
    )
    defaults = config_values("common.yaml", "inference.yaml")
    p.add_argument(
        "--batch-size",
        type=int,
        default=int(defaults["batch_size"]),
        help="scans per forward pass (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(defaults["num_workers"]),
        help="processes that read scans (default %(default)s)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="P(abnormal) from which a scan is 'abnormal' (default: the model's own, "
        f"{defaults['threshold']} unless it was trained with another)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: mixed precision on CUDA, float32 on the CPU; fp32; bf16: bfloat16 autocast "
        "(faster on CPUs with AVX512-BF16)",
    )
    p.add_argument("--saliency", action="store_true", help="save a Grad-CAM montage per scan")
    p.add_argument("--report", action="store_true", help="write OUT/report.html")
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
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is shown only when stderr is a terminal anyway)",
    )
    return p


def safe_name(key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key).name)[:60]
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder: Path = args.folder
    if not folder.exists():
        print(f"error: {folder} does not exist", file=sys.stderr)
        return 2
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        print("error: --threshold must be in [0, 1]", file=sys.stderr)
        return 2
    out = args.output or Path("outputs") / (folder.resolve().name or "scans")
    if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        print(
            f"error: the output folder {out} is inside the input folder: choose another --output",
            file=sys.stderr,
        )
        return 2

    from tqdm import tqdm

    from app.classifier import CheckpointError, Classifier
    from app.errors import ConfigError
    from app.plots import plot_montage
    from app.portable.scans import find_inputs
    from app.predictions import OutputFolderError, PredictionLog

    limits = Limits() if args.max_voxels is None else Limits(max_voxels=args.max_voxels)
    try:
        clf = Classifier.load(
            args.checkpoint,
            device=args.device,
            threshold=args.threshold,
            limits=limits,
            precision=args.precision,
        )
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inputs = find_inputs(folder)
    if not inputs:
        print(f"error: no .nii/.nii.gz file or DICOM series under {folder}", file=sys.stderr)
        return 2
    try:
        log = PredictionLog(out, overwrite=args.overwrite, model=clf.identity())
    except OutputFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    todo = [s for s in inputs if s.key not in log.done]
    chosen = "" if args.checkpoint else " (the newest run under runs/: choose with --checkpoint)"
    print(f"model: {clf.describe()}; device {clf.device}{chosen}", flush=True)
    for note in clf.caveats():
        print(f"warning: {note}", flush=True)
    retried = f" ({len(log.retried)} that failed before are retried)" if log.retried else ""
    print(
        f"{len(inputs)} inputs, {len(inputs) - len(todo)} already in {log.csv_path}{retried}",
        flush=True,
    )
    images: dict[str, dict[str, Path]] = {}
    want_images = args.saliency or args.report
    bar = tqdm(
        total=len(todo), unit="scan", disable=not show_progress(args.no_progress), file=sys.stderr
    )
    try:
        for pred in clf.predict_many(
            todo, batch_size=args.batch_size, workers=args.workers, keep_images=want_images
        ):
            image = getattr(pred, "image", None)
            if image is not None:
                name = safe_name(pred.path)
                pics = images.setdefault(pred.path, {})
                if args.report:
                    pics["montage"] = out / "montages" / f"{name}.png"
                    plot_montage(image.numpy(), pics["montage"], rows=2, columns=5)
                if args.saliency:
                    pics["saliency"] = out / "saliency" / f"{name}.png"
                    plot_montage(
                        image.numpy(),
                        pics["saliency"],
                        overlay=clf.saliency(image),
                        title=f"Grad-CAM, P(abnormal) = {pred.prob_abnormal:.3f}",
                    )
            log.append(pred)
            note = f"  [warning: {'; '.join(pred.warnings)}]" if pred.warnings and pred.ok else ""
            bar.write(pred.sentence() + note)
            bar.update(1)
    except OSError as exc:  # e.g. a full disk: finished rows are on disk already
        print(
            f"error: cannot write to {out}: {exc.strerror or exc}; the finished rows are kept, run "
            "the same command again to complete the folder",
            file=sys.stderr,
        )
        return 1
    finally:
        bar.close()
        with contextlib.suppress(OSError):
            log.write_json()
        log.close()
    rows = log.rows
    if args.report:
        from app.report import write_report

        for r in rows:  # thumbnails of scans classified by an earlier, interrupted run
            name = safe_name(r["path"])
            pics = images.setdefault(r["path"], {})
            for kind, folder_name in (("montage", "montages"), ("saliency", "saliency")):
                candidate = out / folder_name / f"{name}.png"
                if kind not in pics and candidate.is_file():
                    pics[kind] = candidate
        print(f"report: {write_report(rows, out, images)}")
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
