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
import os
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
from app.run_folder import fold_dir
from app.runtime.allocator import reuse_freed_memory
from app.runtime.scanqc import Limits


def _add_pacs_options(p: argparse.ArgumentParser) -> None:
    """--from-pacs and what goes with it (app.inference.pacs, app.inference.dicomweb)."""
    p.add_argument(
        "--from-pacs",
        metavar="AE@HOST:PORT|URL",
        help="retrieve the CT series of --study from this DICOM peer (C-FIND, C-GET) or "
        "DICOMweb root (http://HOST:PORT/dicom-web: QIDO-RS, WADO-RS) into OUT/retrieved/ and "
        "classify them",
    )
    p.add_argument("--study", metavar="UID", help="with --from-pacs: the Study Instance UID")
    p.add_argument("--patient", metavar="ID", help="with --from-pacs: every study of a Patient ID")
    p.add_argument(
        "--dates",
        metavar="FROM-TO",
        help="with --from-pacs: studies in a date range, YYYYMMDD-YYYYMMDD (either end open)",
    )
    p.add_argument(
        "--send-sr",
        action="store_true",
        help="with --from-pacs: store each series' DICOM SR back to the peer (C-STORE or "
        "STOW-RS), in its "
        "study (implies --dicom-sr OUT/sr unless given)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "folder",
        type=Path,
        nargs="?",
        help="folder of scans (searched recursively), or one scan (or --from-pacs)",
    )
    _add_pacs_options(p)
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
        "--dicom-sr",
        type=Path,
        metavar="DIR",
        help="write a DICOM Structured Report (Comprehensive 3D SR, TID 1500) per classified "
        "DICOM series into DIR: P(abnormal), the label, the model; same study, new series",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.inference.folder import FolderOptions, classify_folder  # the work, after parsing

    options = FolderOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=args.overwrite,
        saliency=args.saliency,
        report=args.report,
        progress=show_progress(args.no_progress),
        chosen=bool(args.checkpoint),
        dicom_sr=args.dicom_sr,
    )
    out = args.output
    try:
        if args.send_sr and not args.from_pacs:
            raise UsageError("--send-sr needs --from-pacs (the peer to store the reports to)")
        if args.from_pacs:
            out, folder, peer = _retrieve(args, options)
        else:
            out, folder, peer = output_folder(args), args.folder, None
        clf = load_model(args)
        if args.saliency and clf.folds:
            raise UsageError(
                f"--saliency needs one network; {args.checkpoint} is a cross-validation ensemble "
                f"of {clf.folds} fold models: pass one fold's folder (e.g. "
                f"{fold_dir(str(args.checkpoint), 0)}) for its saliency"
            )
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world > 1:  # one process of a torchrun job: its share, then rank 0 joins the parts
            result = _classify_share(clf, folder, out, options, rank, world)
            if result is None:
                return 0
        else:
            result = classify_folder(clf, folder, out, options)
        problems = _send_reports(peer, options) if args.send_sr else []
    except CTClassifyError as exc:  # UsageError, CheckpointError, OutputFolderError, PacsError: 2
        return fail(exc)
    except OSError as exc:  # e.g. a full disk: finished rows are on disk already
        print(
            f"error: cannot write to {out}: {exc.strerror or exc}; the finished rows are kept, run "
            "the same command again to complete the folder",
            file=sys.stderr,
        )
        return 1
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if result.report_path is not None:
        print(f"report: {result.report_path}")
    return max(summarise(result, clf.label_names), 1 if problems else 0)


def _classify_share(clf: Any, folder: Path, out: Path, options: Any, rank: int, world: int) -> Any:
    """Under torchrun: this rank's share of the inputs into OUT/ranks/rank-K (resumable as any
    output folder), marked done; rank 0 then joins every part into OUT (None on the others)."""
    from app.inference.folder import RANK_DONE, classify_folder, merge_ranks, rank_folder

    if options.report or options.saliency:
        raise UsageError(
            "--report and --saliency draw per process: run them without torchrun (a rerun over "
            "the same output folder classifies nothing again and draws them)"
        )
    part = rank_folder(out, rank)
    (part / RANK_DONE).unlink(missing_ok=True)
    options.shard = (rank, world)
    options.progress = options.progress and rank == 0
    classify_folder(clf, folder, part, options)
    (part / RANK_DONE).write_text("done\n")
    if rank != 0:
        return None
    return merge_ranks(clf, out, world, overwrite=options.overwrite)


def _retrieve(args: argparse.Namespace, options: Any) -> tuple[Path, Path, Any]:
    """--from-pacs: the CT series of --study (or of every study --patient and --dates find),
    retrieved into OUT/retrieved/STUDY/ (OUT defaults to outputs/pacs-<study or query>); with
    --send-sr the SRs go to --dicom-sr or OUT/sr."""
    from app.inference.dicomweb import is_web_address, parse_web_peer
    from app.inference.pacs import PacsError, check_uid, parse_peer, retrieve_study

    if args.folder is not None:
        raise UsageError("give a folder or --from-pacs, not both")
    if not (args.study or args.patient or args.dates):
        raise UsageError("--from-pacs needs --study UID, or --patient ID and/or --dates FROM-TO")
    web = is_web_address(args.from_pacs)
    peer = parse_web_peer(args.from_pacs) if web else parse_peer(args.from_pacs)
    if args.study:
        studies, name = [check_uid(args.study)], args.study
    else:
        studies = peer.studies(args.patient, args.dates)
        name = "query"
        if not studies:
            raise PacsError(f"{peer} holds no study for that query")
        print(f"{len(studies)} studies found on {peer}")
    out: Path = args.output or Path("outputs") / f"pacs-{name}"
    retrieved = out / "retrieved"
    for study in studies:
        got = retrieve_study(peer, study, retrieved / study)
        options.unavailable.update(got.failed)
        missing = f"; {len(got.failed)} could not be (failed rows say why)" if got.failed else ""
        print(
            f"retrieved {len(got.folders)} CT series of study {study} from {peer} into "
            f"{retrieved}{missing}"
        )
    if args.send_sr and options.dicom_sr is None:
        options.dicom_sr = out / "sr"
    return out, retrieved, peer


def _send_reports(peer: Any, options: Any) -> list[str]:
    """--send-sr: each SR of the output folder stored to the peer; what it refused."""
    files = sorted(options.dicom_sr.glob("*.dcm")) if options.dicom_sr.is_dir() else []
    problems: list[str] = peer.store(files) if files else []
    print(f"sent {len(files) - len(problems)} of {len(files)} DICOM SRs to {peer}")
    return problems


def summarise(result: Any, class_names: list[str]) -> int:
    """The summary line; exit status 1 when some inputs failed."""
    classified = [r for r in result.rows if r["prob_abnormal"]]
    abnormal = sum(1 for r in classified if r["label"] == class_names[1])
    warned = sum(1 for r in classified if r["warnings"])
    graded = [r["grade"] for r in classified if r.get("grade")]
    grades = (
        "; by grade " + ", ".join(f"{g} {graded.count(g)}" for g in sorted(set(graded)))
        if graded
        else ""
    )
    print(
        f"summary: {len(classified)} classified ({abnormal} abnormal, {len(classified) - abnormal} "
        f"normal, {warned} with warnings{grades}), {len(result.failed)} failed; {result.csv_path}"
    )
    return 1 if result.failed else 0


def output_folder(args: argparse.Namespace) -> Path:
    """The output folder; refuses a missing input, a bad threshold, an output inside the input."""
    folder: Path | None = args.folder
    if folder is None:
        raise UsageError("give a folder of scans, or --from-pacs AE@HOST:PORT --study UID")
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
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device != "cpu":
        import torch  # under torchrun each process takes its LOCAL_RANK's GPU, as training does

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    clf = Classifier.load(
        args.checkpoint,
        device=device,
        threshold=args.threshold,
        limits=limits,
        precision=args.precision,
    )
    clf.tta = bool(getattr(args, "tta", False))
    # a process of its own: keep freed blocks for the next scan (configs' reuse_freed_memory)
    reuse_freed_memory(clf.reuse_freed_memory and clf.device.type == "cpu")
    return clf


if __name__ == "__main__":
    raise SystemExit(main())
