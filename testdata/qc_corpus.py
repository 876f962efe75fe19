"""The input checks as a classifier: a labelled corpus of scans, and what each check says of each.

    python -m testdata.qc_corpus --shared ../shared --work /tmp/qc [--markdown]

The corpus: the shared real files (chest CT as NIfTI, LAS NIfTI and a DICOM series; an
abdomen-pelvis CT and its upper-abdomen crop; a head CT angiogram stored as uint8 with a slope; a
MosMedData lesion mask; a MosMed scan already normalised to [0, 1]), generated chest scans
(``app.data synth`` at three sizes, with and without confounders), and inputs made from the real
chest CT: a mask of its lungs, the scan normalised to [0, 1], z-scored and as 8-bit, stored
without its rescale intercept, an abdomen-only crop of the abdomen-pelvis CT, and a head-like
phantom in HU. Each row is labelled ``chest`` (a chest CT in HU: the model's input),
``not-chest`` (CT in HU of another body part) or ``not-hu`` (anything else); the checks run as
``app.infer`` runs them (``ScanPreparer``: header, values, lungs), with the training context of
a model trained on generated 128x128x40 scans. Prints one row per input and the table of true
and false positives per check that ``docs/reliability.md`` holds.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Item:
    name: str
    path: Path
    truth: str  # chest | not-chest | not-hu
    origin: str


def _save(data: np.ndarray, like: nib.Nifti1Image, path: Path, dtype: type = np.float32) -> Path:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), like.affine)
    img.header.set_qform(like.affine, 1)
    nib.save(img, str(path))
    return path


def build(shared: Path, work: Path) -> list[Item]:
    """Writes the made inputs under ``work`` and returns the corpus."""
    from app.data.synth import write_dataset  # noqa: F401  (fails early without the app)

    real = shared / "data" / "real-ct"
    work.mkdir(parents=True, exist_ok=True)
    items = [
        Item("cip chest CT (NIfTI)", real / "cip_ct-64_chest.nii.gz", "chest", "real"),
        Item("cip chest CT (NIfTI, LAS)", real / "cip_ct-64_chest_LAS.nii.gz", "chest", "real"),
        Item("cip chest CT (DICOM series)", real / "cip_ct-64_dicom", "chest", "real"),
        Item("dcmqi lower chest, 3 slices (DICOM series)", real / "dcmqi_ct-3slice_dicom", "chest",
             "real"),
        Item("MONAI head CT crops, uneven slices (DICOM)", real / "monai_CT_DICOM_head_16x16",
             "not-chest", "real"),
        Item("TotalSegmentator abdomen-pelvis CT", real / "totalsegmentator_example_ct.nii.gz",
             "not-chest", "real"),
        Item("TotalSegmentator upper-abdomen crop", real / "totalsegmentator_example_ct_sm.nii.gz",
             "not-chest", "real"),
        Item("niivue head CT angiogram (uint8 x 2.2)", real / "niivue-images_CT_AVM.nii.gz",
             "not-hu", "real"),
        Item("MosMedData lesion mask", real / "mosmeddata_CT-1_study_0255_mask.nii.gz", "not-hu",
             "real"),
        Item("MosMed scan normalised to [0, 1]",
             real / "bkoz-3d-image-classification_mosmed_preproc_volume0.nii.gz", "not-hu", "real"),
    ]  # fmt: skip
    chest = nib.load(str(real / "cip_ct-64_chest.nii.gz"))
    hu = np.asarray(chest.dataobj, dtype=np.float32)
    made = work / "made"
    made.mkdir(exist_ok=True)
    from transforms.lung import lung_mask

    window = np.clip(hu, -1000, 400)
    items += [
        Item("cip lung mask (0/1)", _save(lung_mask(hu), chest, made / "mask.nii.gz", np.uint8),
             "not-hu", "made"),
        Item("cip normalised to [0, 1]",
             _save((window + 1000) / 1400, chest, made / "unit.nii.gz"), "not-hu", "made"),
        Item("cip z-scored", _save((hu - hu.mean()) / hu.std(), chest, made / "z.nii.gz"),
             "not-hu", "made"),
        Item("cip as 8-bit (0-255)",
             _save(np.round((window + 1000) / 1400 * 255), chest, made / "u8.nii.gz", np.uint8),
             "not-hu", "made"),
        Item("cip without its rescale intercept (air at 0)",
             _save(hu + 1024, chest, made / "raw.nii.gz", np.int16), "not-hu", "made"),
    ]  # fmt: skip
    below = hu[:, :, :1].copy()
    below[below < -500] = 40.0  # the lowest slice with the air inside the body filled
    body_air = hu[:, :, :1] < -500
    below[body_air & (np.abs(np.indices(below.shape)[0] - 32) > 28)] = -1000.0
    long = np.concatenate([np.repeat(below, 260, axis=2), hu], axis=2)
    items.append(Item("cip chest CT + 260 abdomen-like slices (lung in 23%)",
                      _save(long, chest, made / "long.nii.gz", np.int16), "chest", "made"))  # fmt: skip
    abdomen = nib.load(str(real / "totalsegmentator_example_ct.nii.gz"))
    lower = np.asarray(abdomen.dataobj)[:, :, :60]
    items.append(Item("abdomen-pelvis only (slices 0-59)",
                      _save(lower, abdomen, made / "abdomen.nii.gz", np.int16), "not-chest", "made"))  # fmt: skip
    items.append(Item("head phantom in HU", _head(made / "head.nii.gz"), "not-chest", "made"))
    synth = work / "synth"
    if not synth.exists():
        _synth(synth)
    for path in sorted(synth.glob("*/CT-*/*.nii.gz")):
        items.append(Item(f"generated {path.parent.parent.name} {path.parent.name}", path,
                          "chest", "generated"))  # fmt: skip
    return items


def _synth(out: Path) -> None:
    from app.data.synth import write_dataset

    for name, shape, conf in (
        ("512x512", None, 0.0), ("128x128x40", (128, 128, 40), 0.0),
        ("96x96x32", (96, 96, 32), 0.0), ("96x96x32-confounded", (96, 96, 32), 1.0),
    ):  # fmt: skip
        kwargs = {"shape": shape} if shape else {}
        write_dataset(out / name, per_class=2 if shape else 1, seed=7, confounders=conf,
                         progress=False, **kwargs)  # fmt: skip


def _head(path: Path) -> Path:
    """An axial head-like phantom in HU: air, scalp, skull, brain, ventricles; 1 x 1 x 5 mm."""
    x, y, z = np.meshgrid(np.arange(160) - 80, np.arange(180) - 90, np.arange(30) - 15,
                          indexing="ij")  # fmt: skip
    r = np.sqrt((x / 70.0) ** 2 + (y / 85.0) ** 2 + (z / 22.0) ** 2)
    vol = np.full(x.shape, -1000.0, np.float32)
    vol[r < 1.0] = 20.0
    vol[r < 0.95] = 900.0
    vol[r < 0.88] = 35.0
    vol[(np.abs(x) < 8) & (np.abs(y) < 20) & (np.abs(z) < 6)] = 5.0
    vol += np.random.default_rng(0).normal(0, 8, vol.shape)
    img = nib.Nifti1Image(np.round(vol).astype(np.int16), np.diag([1.0, 1.0, 5.0, 1.0]))
    nib.save(img, str(path))
    return path


#: the QC outcome per input: refused (failed row), or the warnings' kinds
KINDS = {
    "not HU": ("not CT in Hounsfield units", "label map"),
    "not chest": ("not a chest CT",),
    "spacing": ("spacing",),
    "few slices": ("very few slices",),
    "generated model on real CT": ("trained on generated scans",),
}


def run_checks(items: list[Item]) -> list[dict[str, object]]:
    from app.data.synth import is_generated  # noqa: F401
    from app.inference.reading import ScanPreparer
    from app.runtime.scanqc import Limits, TrainingContext
    from app.runtime.scans import find_inputs
    from transforms.presets import eval_transforms

    chain = eval_transforms(keys=["image"], spatial_size=(64, 64, 48), hu_window=(-1000, 400),
                            axcodes="LAS", lung_crop=True)  # fmt: skip
    training = TrainingContext(generated=True, spacing_min=(3.125, 3.125, 8.0),
                               spacing_max=(3.125, 3.125, 8.0))  # fmt: skip
    prepare = ScanPreparer(chain, Limits(), training=training)
    rows = []
    for item in items:
        scan = find_inputs(item.path)[0] if item.path.is_dir() else None
        if scan is None:
            from app.inference.reading import as_input

            scan = as_input(item.path)
        out = prepare(scan)
        text = " | ".join([out["error"] or ""] + list(out["warnings"]))
        flags = {k: any(s in text for s in subs) for k, subs in KINDS.items()}
        rows.append({"item": item, "refused": out["error"], "warnings": out["warnings"],
                     "flags": flags})  # fmt: skip
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| check | flags | true positives | false positives (flagged, should not be) | missed |",
             "|---|---|---|---|---|"]  # fmt: skip
    should = {
        "not HU": lambda t, o: t == "not-hu",
        "not chest": lambda t, o: t == "not-chest",
        "generated model on real CT": lambda t, o: o != "generated",
    }
    for kind in KINDS:
        flagged = [r for r in rows if r["flags"][kind]]  # type: ignore[index]
        rule = should.get(kind)
        if rule is None:
            lines.append(f"| {kind} | {len(flagged)} | - | - | - |")
            continue

        def ok(r: dict[str, object], rule: object = rule) -> bool:
            return bool(rule(r["item"].truth, r["item"].origin))  # type: ignore[attr-defined,operator]

        tp = sum(ok(r) for r in flagged)
        fp = [r["item"].name for r in flagged if not ok(r)]  # type: ignore[attr-defined]
        missed = [r["item"].name for r in rows if ok(r) and not r["flags"][kind]  # type: ignore[index,attr-defined]
                  and not r["refused"]]  # fmt: skip
        lines.append(f"| {kind} | {len(flagged)} | {tp} | {len(fp)} {fp if fp else ''} | "
                     f"{len(missed)} {missed if missed else ''} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-corpus"))
    p.add_argument("--fresh", action="store_true", help="remake the generated scans")
    args = p.parse_args()
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    rows = run_checks(build(args.shared, args.work))
    print("| input | truth | origin | result |\n|---|---|---|---|")
    for r in rows:
        item = r["item"]
        result = f"refused: {r['refused']}" if r["refused"] else "; ".join(r["warnings"]) or "-"  # type: ignore[arg-type]
        print(f"| {item.name} | {item.truth} | {item.origin} | {result} |")  # type: ignore[attr-defined]
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
