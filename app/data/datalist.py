"""Find scans and labels (class folders or a CSV/JSON datalist) and split them reproducibly."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DataError
from app.runtime.files import atomic_write_text
from app.runtime.scans import is_scan_name

#: MosMedData's class folders: CT-0 is normal; CT-1..CT-4 (and the example's CT-23) abnormal.
DEFAULT_CLASS_MAP: dict[str, int] = {
    "CT-0": 0,
    "CT-1": 1,
    "CT-2": 1,
    "CT-3": 1,
    "CT-4": 1,
    "CT-23": 1,
}
#: larger files are not datalists (1,110 MosMed entries take about 100 KB)
MAX_DATALIST_BYTES = 64 * 1024**2

Item = dict[str, object]


def is_scan_file(path: Path) -> bool:
    return path.is_file() and is_scan_name(path.name)


def discover(root: str | Path, class_map: Mapping[str, int] | None = None) -> list[Item]:
    """List ``{"image": path, "label": int}`` for the scans in the class folders of ``root``.

    Args:
        root: a folder holding class folders (``CT-0``, ``CT-23``...), or a MosMedData download
            root that holds them under ``MosMedData/``.
        class_map: folder name -> label; defaults to :data:`DEFAULT_CLASS_MAP`.

    Raises:
        DataError: ``root`` is missing, has no class folder, or a class folder has no scans.
    """
    class_map = dict(DEFAULT_CLASS_MAP if class_map is None else class_map)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    if not any((root / name).is_dir() for name in class_map) and (root / "MosMedData").is_dir():
        root = root / "MosMedData"
    folders = sorted(name for name in class_map if (root / name).is_dir())
    if not folders:
        raise DataError(
            f"{root} holds none of the class folders {sorted(class_map)}; "
            "pass a folder with CT-0/ and CT-23/ (or a datalist), see `python -m app.data --help`"
        )
    items: list[Item] = []
    for name in folders:
        scans = sorted(p for p in (root / name).iterdir() if is_scan_file(p))
        if not scans:
            raise DataError(f"class folder {root / name} holds no .nii/.nii.gz scans")
        items.extend({"image": str(p), "label": int(class_map[name])} for p in scans)
    refuse_duplicates(items, str(root), [str(i["image"]) for i in items])
    return items


def refuse_duplicates(items: Sequence[Item], source: str, names: Sequence[str]) -> None:
    """Refuse two entries that are one file (the same path written another way, ``./x``,
    ``sub/../x``, or a symbolic link to it): both copies could land on both sides of a split.

    Args:
        items: ``{"image", "label"}`` entries.
        source: the datalist or folder, named in the message.
        names: how to name each entry in the message (``entry 3``, a path).

    Raises:
        DataError: naming both entries, and whether they also carry two classes.
    """

    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        real = os.path.realpath(str(item["image"]))
        j = seen.setdefault(real, i)
        if j == i:
            continue
        labels = {int(str(items[j]["label"])), int(str(item["label"]))}
        what = "the same file in two classes" if len(labels) == 2 else "the same file twice"
        raise DataError(
            f"{source}: {names[j]} and {names[i]} are {what} ({real}): a scan may appear once, "
            "or it could land on both sides of a split; remove one"
        )


def load_datalist(path: str | Path, grades: int = 2) -> list[Item]:
    """Read a CSV (columns ``image``, ``label``) or JSON datalist (a list of such objects, or
    MONAI's ``{"training": [...], "validation": [...]}`` of which all entries are taken).

    Relative image paths are taken relative to the datalist's folder. Labels are 0 or 1, or a
    grade from 0 to ``grades - 1`` for a severity run.

    Raises:
        DataError: the file is missing or malformed, or names scans that do not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist {path} does not exist")
    if path.stat().st_size > MAX_DATALIST_BYTES:
        raise DataError(
            f"datalist {path} is {path.stat().st_size:,} bytes, above {MAX_DATALIST_BYTES:,}: "
            "not a datalist"
        )
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                rows: list[Mapping[str, object]] = list(csv.DictReader(f))
        else:
            loaded = json.loads(path.read_text())
            rows = (
                [r for part in loaded.values() if isinstance(part, list) for r in part]
                if isinstance(loaded, dict)
                else loaded
            )
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"datalist {path} cannot be read: {exc}") from exc
    items: list[Item] = []
    missing: list[str] = []
    if not isinstance(rows, list):
        raise DataError(f"datalist {path}: expected a list of entries, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "image" not in row or "label" not in row:
            raise DataError(f"datalist {path}, entry {i + 1}: needs the fields 'image' and 'label'")
        text = row["image"]
        if not isinstance(text, str) or not text or len(text) > 4096 or "\0" in text:
            raise DataError(
                f"datalist {path}, entry {i + 1}: image must be a file path, got {text!r}"[:300]
            )
        image = Path(text)
        image = image if image.is_absolute() else path.parent / image
        label = row["label"]
        allowed = [str(k) for k in range(grades)]
        if isinstance(label, str) and label.strip() in allowed:
            label = int(label.strip())
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < grades:
            raise DataError(
                f"datalist {path}, entry {i + 1}: label {row['label']!r} is not "
                f"{' or '.join(allowed) if grades == 2 else f'a grade from 0 to {grades - 1}'}"[
                    :300
                ]
            )
        if not image.exists():
            missing.append(str(image))
        items.append({"image": str(image), "label": label})
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(
            f"datalist {path} names files that do not exist: {', '.join(missing[:3])}{more}"
        )
    if not items:
        raise DataError(f"datalist {path} is empty")
    refuse_duplicates(items, f"datalist {path}", [f"entry {i + 1}" for i in range(len(items))])
    return sorted(items, key=lambda d: (str(d["image"]), int(str(d["label"]))))


def find_items(
    source: str | Path,
    class_map: Mapping[str, int] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Item]:
    """Items from a class-folder root or a datalist file, whichever ``source`` is. With
    ``class_names`` (a severity run's grades, in order), the class folders are those names and
    each scan's label its grade's index."""
    source = Path(source)
    grades = 2 if class_names is None else len(class_names)
    if class_names is not None:
        class_map = {str(name): k for k, name in enumerate(class_names)}
    return load_datalist(source, grades) if source.is_file() else discover(source, class_map)


def stratified_split(
    items: Sequence[Item], *, train_fraction: float, seed: int
) -> tuple[list[Item], list[Item]]:
    """Split ``items`` per class into training and validation, seeded and deterministic.

    Each class gives ``round(train_fraction * n)`` scans to training (the reference's 0.7 in
    train.yaml: 70 of 100),
    and at least one to each side when it has two or more.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    train: list[Item] = []
    val: list[Item] = []
    for label in sorted({int(str(d["label"])) for d in items}):
        group = sorted(
            (d for d in items if int(str(d["label"])) == label), key=lambda d: str(d["image"])
        )
        order = np.random.default_rng([seed, label]).permutation(len(group))
        n_train = int(round(train_fraction * len(group)))
        if len(group) >= 2:
            n_train = min(max(n_train, 1), len(group) - 1)
        train.extend(group[i] for i in sorted(order[:n_train]))
        val.extend(group[i] for i in sorted(order[n_train:]))
    return train, val


def split_datalist(
    items: Sequence[Item], *, train_fraction: float, seed: int
) -> dict[str, list[Item]]:
    """:func:`stratified_split` as a MONAI datalist: ``{"training": [...], "validation": [...]}``."""
    train, val = stratified_split(items, train_fraction=train_fraction, seed=seed)
    return {"training": train, "validation": val}


def make_split(
    items: Sequence[Item], *, train_fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> dict[str, list[Item]]:
    """The run's datalist: :func:`split_datalist` (``folds`` 0), or fold ``fold`` of ``folds``
    stratified, seeded folds over all ``items`` (cross-validation: that fold validates, the
    others train). The folds depend on the items' paths and labels and ``seed`` alone.

    Raises:
        DataError: ``fold`` is not one of the folds, or a class has fewer scans than folds.
    """
    if folds == 0:
        return split_datalist(items, train_fraction=train_fraction, seed=seed)
    if folds < 2 or not 0 <= fold < folds:
        raise DataError(f"fold {fold} of {folds} folds: folds must be 2 or more, fold 0 to K-1")
    from sklearn.model_selection import StratifiedKFold

    ordered = sorted(items, key=lambda item: str(item["image"]))
    labels = [int(str(item["label"])) for item in ordered]
    fewest = min(labels.count(label) for label in set(labels))
    if fewest < folds:
        raise DataError(
            f"{folds} folds need at least {folds} scans of each class; the smaller class has "
            f"{fewest}"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(labels, labels))[fold]
    return {
        "training": [ordered[i] for i in train_idx],
        "validation": [ordered[i] for i in val_idx],
    }


def write_split(
    path: str | Path,
    train: Sequence[Item],
    val: Sequence[Item],
    record: Mapping[str, Any] | None = None,
) -> None:
    """Write a MONAI datalist JSON (``training``, ``validation``), atomically, with ``record``:
    how the split was made (seed, folds, fold, train_fraction, dataset_dir), which a resume
    must reproduce (:func:`app.training.resume_guard.check_recorded_split`), and ``base``: the
    working folder relative paths were given in (:func:`app.readback.read_split` resolves them
    against it, wherever the file is read from)."""

    content: dict[str, Any] = {"training": list(train), "validation": list(val)}
    content["base"] = os.getcwd()
    if record is not None:
        content["record"] = dict(record)
    atomic_write_text(path, json.dumps(content, indent=1))


def describe_training_data(
    items: Sequence[Item], source: str | Path, validation: Sequence[Item] = ()
) -> dict[str, object]:
    """What a model is trained on, recorded in its checkpoints (``run_info.training_data``):
    scan and class counts, the data source, whether every scan was generated by
    ``app.data synth``, the range of voxel spacings (sorted per scan: in-plane first, slice
    thickness last) and shapes (from the NIfTI headers), the content digest of the training
    scans, and ``scan_sha256``: the SHA-256 of every training and ``validation`` scan's content
    (:func:`scan_sha256`), by which ``app.evaluate`` recognises them in a test set whatever
    their path. Each scan is read once, here."""
    import nibabel as nib

    from app.data.synth import is_generated

    labels = [int(str(item["label"])) for item in items]
    counts = [labels.count(k) for k in range(max([1, *labels]) + 1)]  # binary: [normal, abnormal]
    generated = bool(items)
    spacings, shapes = [], []
    for item in items:
        try:
            header: Any = nib.load(str(item["image"])).header
        except Exception:  # a file the training itself will report; not this record's job
            generated = False
            continue
        generated = generated and is_generated(header)
        spacings.append(sorted(float(z) for z in header.get_zooms()[:3]))
        shapes.append([int(s) for s in header.get_data_shape()[:3]])
    hashes = {"training": [scan_sha256(i["image"]) for i in items]}
    hashes["validation"] = [scan_sha256(i["image"]) for i in validation]
    record: dict[str, object] = {
        "scans": len(items),
        "class_counts": counts,
        "generated": generated,
        "source": str(source),
        "digest": content_digest(items, source, hashes["training"]),
        "scan_sha256": {k: "".join(h for h in v if h != UNREADABLE) for k, v in hashes.items()},
    }
    if spacings:
        record["spacing_min"] = [round(float(v), 4) for v in np.min(spacings, axis=0)]
        record["spacing_max"] = [round(float(v), 4) for v in np.max(spacings, axis=0)]
        record["shape_min"] = [int(v) for v in np.min(shapes, axis=0)]
        record["shape_max"] = [int(v) for v in np.max(shapes, axis=0)]
    return record


#: what :func:`scan_sha256` gives for a scan it cannot read
UNREADABLE = "unreadable"


def scan_sha256(path: str | Path | object) -> str:
    """The SHA-256 of a scan's content: of a file's bytes, or for a folder (a DICOM series) of
    its files' names and hashes in name order; :data:`UNREADABLE` when it cannot be read. The
    same for a copy, a hard link or a symbolic link, wherever it lies."""

    def of_file(file: str) -> str:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    name = str(path)
    try:
        if not os.path.isdir(name):
            return of_file(name)
        lines = []
        for root, dirs, files in os.walk(name):
            dirs.sort()
            for file in sorted(files):
                full = os.path.join(root, file)
                lines.append(f"{os.path.relpath(full, name)}\t{of_file(full)}")
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    except OSError:
        return UNREADABLE


def content_digest(
    items: Sequence[Item], source: str | Path, hashes: Sequence[str] | None = None
) -> str:
    """SHA-256 naming a dataset by its content, the same on any machine: over each scan's path
    relative to ``source`` (its name when outside it), label and the SHA-256 of its bytes, in
    path order. What a shared bundle records instead of the data's absolute path. ``hashes``:
    the scans' :func:`scan_sha256`, when known (otherwise each scan is read)."""

    base = Path(source) if Path(source).is_dir() else Path(source).parent
    if hashes is None:
        hashes = [scan_sha256(item["image"]) for item in items]
    lines = []
    for item, digest in zip(items, hashes, strict=True):
        path = Path(str(item["image"]))
        try:
            name = os.path.relpath(path, base)
            name = path.name if name.startswith("..") else name
        except ValueError:  # another drive (Windows)
            name = path.name
        lines.append(f"{Path(name).as_posix()}\t{int(str(item['label']))}\t{digest}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
