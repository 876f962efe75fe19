"""Classify a folder: the work behind ``python -m app.infer`` (which parses, calls and prints).

:func:`classify_folder` finds every input under a folder, classifies those its output folder
does not hold yet (one fsync'd row and one console line each, resumable), draws the report's
montages and the saliency maps as asked, and writes the report.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from app.errors import UsageError
from app.inference.classifier import Classifier, Prediction
from app.inference.dicom_sr import write_dicom_sr
from app.inference.predictions import PredictionLog
from app.inference.report import write_report
from app.inference.saliency import write_saliency_nifti
from app.model_settings import shareable
from app.plots import plot_montage
from app.runtime.scanqc import TrainingContext
from app.runtime.scans import ScanInput, find_inputs
from app.runtime.writer import PREDICTIONS_CSV

__all__ = [
    "FolderOptions",
    "FolderResult",
    "classify_folder",
    "picture_names",
    "safe_name",
    "write_saliency",
]


@dataclass
class FolderOptions:
    """How a folder is classified (``app.infer``'s options)."""

    batch_size: int = 1
    workers: int = 0
    overwrite: bool = False
    saliency: bool = False
    report: bool = False
    progress: bool = True
    #: the model was chosen by the user (``--checkpoint``), not the newest run
    chosen: bool = True
    #: a folder for one DICOM SR per classified DICOM series (``--dicom-sr``); None: none
    dicom_sr: Path | None = None
    #: ``(rank, world)``: classify every world-th input from the rank-th (one process of a
    #: ``torchrun`` job: :func:`merge_ranks` joins the parts); None: every input
    shard: tuple[int, int] | None = None
    #: inputs that could not be fetched (``--from-pacs``: a series the peer did not send
    #: whole), each the key its scan would have with the reason: a failed row each
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass
class FolderResult:
    """What :func:`classify_folder` wrote."""

    rows: list[dict[str, str]]
    csv_path: Path
    report_path: Path | None = None
    images: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["error"]]


def safe_name(key: str) -> str:
    """A file name for an input's pictures: its name without ``.nii``/``.nii.gz``, made safe
    (a series chosen by ``FOLDER#UID``: the folder's name and the UID)."""
    folder, _, uid = key.partition("#")
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(folder).name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}_{uid}" if uid else stem)[:80] or "scan"


def picture_names(keys: list[str]) -> dict[str, str]:
    """Each input's file name for its pictures and report: :func:`safe_name`, and where two
    inputs of the folder share one (``a/scan.nii.gz`` and ``b/scan.nii.gz``), a hash of the
    whole key after it, for those two only."""
    stems = {key: safe_name(key) for key in keys}
    count: dict[str, int] = {}
    for stem in stems.values():
        count[stem.lower()] = count.get(stem.lower(), 0) + 1  # case-insensitive file systems
    return {
        key: stem
        if count[stem.lower()] == 1
        else f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        for key, stem in stems.items()
    }


def find_scan_inputs(folder: Path) -> list[ScanInput]:
    """Every input under ``folder``; a folder without any is refused."""
    inputs = find_inputs(folder)
    if not inputs:
        raise UsageError(f"no .nii/.nii.gz file or DICOM series under {folder}")
    return inputs


def open_log(out: Path, clf: Classifier, overwrite: bool) -> PredictionLog:
    """The output folder's predictions log, for this model (test-time augmentation apart)."""
    identity = clf.identity()
    if clf.tta:  # predictions with and without test-time augmentation differ: never mixed
        identity["tta"] = "left-right flip"
    return PredictionLog(out, overwrite=overwrite, model=identity)


#: where each process of a torchrun job writes its part of an output folder
RANKS_DIR = "ranks"
#: a part's mark: the process classified all of its share
RANK_DONE = ".done"


def rank_folder(out: Path, rank: int) -> Path:
    return out / RANKS_DIR / f"rank-{rank}"


def merge_ranks(
    clf: Classifier, out: Path, world: int, overwrite: bool, wait_s: float = 86_400.0
) -> FolderResult:
    """Rank 0 of a torchrun job, after its own share: wait (polling the shared output folder,
    never a collective) until every rank marked its part done, then write ``out``'s
    predictions.csv and .json from the parts, rows in input order: the files one process writes.

    Raises:
        UsageError: a rank did not finish within ``wait_s`` (rerun the same command: each part
            resumes where it stopped).
    """
    import time

    deadline = time.monotonic() + wait_s
    parts = [rank_folder(out, r) for r in range(world)]
    while not all((p / RANK_DONE).is_file() for p in parts):
        if time.monotonic() > deadline:
            missing = [p.name for p in parts if not (p / RANK_DONE).is_file()]
            raise UsageError(f"{', '.join(missing)} did not finish: run the same command again")
        time.sleep(0.5)
    rows: list[dict[str, str]] = []
    for part in parts:  # every row, failed ones too, as the part wrote them
        with (part / PREDICTIONS_CSV).open(newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("path")]
    log = open_log(out, clf, overwrite=True)
    for row in sorted(rows, key=lambda r: r["path"]):
        log.append_row(row)
    log.write_json()
    log.close()
    return FolderResult(log.rows, log.csv_path)


def _say(line: str) -> None:
    print(line, flush=True)


def classify_folder(
    clf: Classifier,
    folder: Path,
    out: Path,
    options: FolderOptions,
    say: Callable[[str], None] = _say,
) -> FolderResult:
    """Classify every input under ``folder`` not yet in ``out`` with ``clf``: the model line
    and its caveats, one line per input, the montages and saliency maps as asked, the report.

    Raises:
        UsageError: no input under ``folder``.
        OutputFolderError: ``out`` holds the predictions of another model.
        OSError: the output cannot be written (the finished rows are on disk already).
    """
    inputs = find_inputs(folder) if options.unavailable else find_scan_inputs(folder)
    names = picture_names([s.key for s in inputs])
    if options.shard is not None:
        rank, world = options.shard
        inputs = inputs[rank::world]
    log = open_log(out, clf, overwrite=options.overwrite)
    _announce(clf, options.chosen, inputs, log, say)
    for key, reason in options.unavailable.items():  # a failed row each, retried by a rerun
        if key not in log.done:
            log.append(Prediction(key, None, None, error=reason))
            say(f"{key}: error: {reason}")
    images: dict[str, dict[str, Path]] = {}
    reports = _classify(clf, inputs, log, out, options, images, names)
    if options.dicom_sr is not None:
        _say_reports(reports, options.dicom_sr, say)
    result = FolderResult(log.rows, log.csv_path, images=images)
    if options.report:
        generated = TrainingContext.from_settings(clf.settings).generated
        result.report_path = report(log.rows, out, images, clf.describe(), generated, names)
    return result


def _announce(
    clf: Classifier,
    chosen: bool,
    inputs: list[ScanInput],
    log: PredictionLog,
    say: Callable[[str], None],
) -> None:
    """The model line, its caveats, and how much of the folder is done."""
    default = "" if chosen else " (the newest run under runs/: choose with --checkpoint)"
    say(f"model: {clf.describe()}; device {clf.device}{default}")
    for note in clf.caveats():
        say(f"warning: {note}")
    retried = f" ({len(log.retried)} that failed before are retried)" if log.retried else ""
    done = sum(1 for s in inputs if s.key in log.done)
    say(f"{len(inputs)} inputs, {done} already in {log.csv_path}{retried}")


def _classify(
    clf: Classifier,
    inputs: list[ScanInput],
    log: PredictionLog,
    out: Path,
    options: FolderOptions,
    images: dict[str, dict[str, Path]],
    names: dict[str, str],
) -> dict[str, list[str]]:
    """Classify the inputs not yet in ``log``, one fsync'd row and one console line each (and a
    DICOM SR for each classified series, as asked); returns how the SRs went."""
    todo = [s for s in inputs if s.key not in log.done]
    by_key = {s.key: s for s in todo}
    reports: dict[str, list[str]] = {"written": [], "nifti": [], "failed": []}
    bar = tqdm(total=len(todo), unit="scan", disable=not options.progress, file=sys.stderr)
    try:
        for pred in clf.predict_many(
            todo,
            batch_size=options.batch_size,
            workers=options.workers,
            keep_images=options.saliency or options.report,
        ):
            _draw_pictures(clf, pred, out, options, images, names[pred.path])
            log.append(pred)
            bar.write(pred.sentence())
            if options.dicom_sr is not None and pred.prob_abnormal is not None:
                sr = options.dicom_sr / f"{names[pred.path]}.dcm"
                _write_report(clf, pred, by_key[pred.path], sr, reports, bar.write)
            bar.update(1)
    finally:
        bar.close()
        with contextlib.suppress(OSError):
            log.write_json()
        log.close()
    return reports


def _write_report(
    clf: Classifier,
    pred: Prediction,
    scan: ScanInput,
    path: Path,
    reports: dict[str, list[str]],
    say: Callable[[str], None],
) -> None:
    """The DICOM SR of one classified input: a series gets one, a NIfTI file none (it belongs to
    no DICOM study); a series whose SR cannot be made says why and the folder goes on."""
    if scan.kind != "dicom":
        reports["nifti"].append(scan.key)
        return
    # what a PACS keeps: the model by name and digest, no folder of this machine
    card = dataclasses.replace(
        clf.card,
        settings=shareable(clf.card.settings),
        checkpoint=Path(Path(str(clf.checkpoint)).name),
    )
    model = {**clf.identity(), "description": card.describe()}
    try:
        write_dicom_sr(
            scan.files,
            float(str(pred.prob_abnormal)),
            str(pred.label),
            pred.warnings,
            model,
            path,
            pred.grade,
            list(zip(clf.grades or [], pred.grade_probs or [], strict=False)),
        )
    except Exception as exc:  # a source header highdicom refuses: that scan's SR only
        reports["failed"].append(scan.key)
        say(f"{scan.key}: no DICOM SR: {type(exc).__name__}: {str(exc)[:200]}")
        return
    reports["written"].append(scan.key)


def _say_reports(reports: dict[str, list[str]], folder: Path, say: Callable[[str], None]) -> None:
    line = f"DICOM SR: {len(reports['written'])} written to {folder}"
    if reports["nifti"]:
        line += f"; none for {len(reports['nifti'])} NIfTI inputs: they belong to no DICOM study"
    if reports["failed"]:
        line += f"; {len(reports['failed'])} could not be made (said above)"
    say(line)


def _draw_pictures(
    clf: Classifier,
    pred: Prediction,
    out: Path,
    options: FolderOptions,
    images: dict[str, dict[str, Path]],
    name: str,
) -> None:
    """The report's montage and the saliency montage of one prediction, as asked."""
    image = getattr(pred, "image", None)
    if image is None or pred.prob_abnormal is None:
        return
    pics = images.setdefault(pred.path, {})
    if options.report:
        pics["montage"] = out / "montages" / f"{name}.png"
        title = (
            f"{Path(pred.path).name}: P(abnormal) {100 * pred.prob_abnormal:.2f}% -> {pred.label}"
        )
        if pred.warnings:  # what the row says of the scan, on its picture too
            title += "\n" + "\n".join(f"warning: {_short(w)}" for w in pred.warnings)
        plot_montage(image.numpy(), pics["montage"], rows=2, columns=5, title=title)
    if options.saliency:
        pics.update(write_saliency(clf, pred, out / "saliency", name))


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_saliency(clf: Classifier, pred: Prediction, folder: Path, name: str) -> dict[str, Path]:
    """The saliency of one classified prediction (kept image): ``folder/NAME.png``, a montage
    of the map over the scan, and ``folder/NAME.nii.gz``, the map on the scan's own grid (a
    NIfTI file's or a DICOM series', for a viewer); their paths as ``saliency`` and
    ``saliency_nifti``.

    One colour scale for every scan: the map (its maximum 1) times P(abnormal), drawn where it
    reaches :data:`app.plots.OVERLAY_FLOOR`. A scan called normal thus shows little or no colour,
    and its picture says why: what the map shows is what would raise P(abnormal), and here
    nothing raised it far."""
    image = pred.image  # type: ignore[attr-defined]
    prob = float(str(pred.prob_abnormal))
    written = {"saliency": folder / f"{name}.png"}
    overlay = clf.saliency(image) * prob
    title = f"{Path(pred.path).name}: saliency x P(abnormal) = {prob:.3f}: "
    if pred.label == clf.label_names[0]:
        title += (
            f"called {pred.label}: the map is scaled by P(abnormal), so little or no colour: "
            "no region raised it far"
        )
    else:
        title += f"called {pred.label}: the model's attention, not a finding"
    if pred.grade:  # a severity model: the map is of what raises its grade
        title += f"; severity {pred.grade}"
    plot_montage(image.numpy(), written["saliency"], overlay=overlay, title=title)
    written["saliency_nifti"] = write_saliency_nifti(
        overlay,
        pred.path,
        folder / f"{name}.nii.gz",
        axcodes=str(clf.settings["axcodes"]),
        lung_crop=bool(clf.settings.get("lung_crop")),
    )
    return written


def report(
    rows: list[dict[str, str]],
    out: Path,
    images: dict[str, dict[str, Path]],
    model: str = "",
    generated: bool = False,
    names: dict[str, str] | None = None,
) -> Path:
    """OUT/report.html, with the pictures of scans classified by an earlier, interrupted run."""
    for r in rows:
        name = (names or {}).get(r["path"]) or safe_name(r["path"])
        pics = images.setdefault(r["path"], {})
        for kind, folder_name in (("montage", "montages"), ("saliency", "saliency")):
            candidate = out / folder_name / f"{name}.png"
            if kind not in pics and candidate.is_file():
                pics[kind] = candidate
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return write_report(rows, out, images, model=model, date=date, generated=generated)
