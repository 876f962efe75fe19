"""Another scanner: train on one acquisition, classify new scans acquired otherwise (issue 30).

    python -m studies.acquisition_shift --out /tmp/shift            # ~30 min, 2 CPU cores

Trains ``--recipe small-data`` on generated scans of one acquisition (128 x 128 in-plane, pixels
of 2.4-3.6 mm, 40 slices of 8 mm, LAS storage: the demo's), then runs ``python -m app.evaluate``
on new scans (other seeds) of the same patients acquired otherwise, one test set per shift:

- slice thickness 1, 3, 5 and 10 mm: the generator draws the same anatomy and findings (they
  are drawn in millimetres) on thinner or thicker slices over the same 320 mm;
- finer (256 x 256) or coarser (96 x 96) pixels over the same field of view;
- a smaller field of view: the central 75 % of each slice (the body, and at times the lungs, cut);
- RAS or LPS storage instead of LAS (the same voxels, reordered, the affine to match);
- more noise (Gaussian, 40 HU), a sharper kernel (unsharp mask, the image plus its difference
  from a 1-voxel Gaussian; or each slice minus half its Laplacian), a softer one (a 1-voxel
  Gaussian).

Every test set holds the same ``--per-class`` patients per class, so the rows differ only by
the acquisition. With ``--run RUN --test DIR``, no training: the edits of :data:`EDITS`
(resampled slices and pixels, a smaller field of view, other storage, noise, a sharper kernel)
are applied to the scans of an existing test set (e.g. the held-out generator's,
``studies/operating_point.py`` writes one and trains on its kind) and ``RUN`` evaluates each. Results go to ``OUT/shift.json`` and ``OUT/shift.md`` as each row finishes (a
rerun skips the rows it has); ``studies/log.md`` shows them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent

#: the training acquisition: the demo's scans
TRAIN_SHAPE = (128, 128, 40)


def _generate(
    folder: Path, per_class: int, seed: int, shape, slice_mm: float, edit, difficulty: float
) -> None:
    """``per_class`` scans per class of seed range ``seed``, drawn at ``shape`` with slices of
    ``slice_mm``, each passed through ``edit(volume, affine) -> (volume, affine)``."""
    import app.data.synth as synth

    saved = synth.SLICE_MM
    synth.SLICE_MM = slice_mm  # the anatomy is drawn in millimetres: the same patient
    try:
        for label, name in synth.CLASS_FOLDERS.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                scan = synth.generate_scan(
                    label, synth.scan_seed(seed, i), shape=shape, difficulty=difficulty
                )
                volume, affine = edit(scan.volume, scan.affine)
                image = nib.Nifti1Image(volume.astype(np.int16), affine)
                image.header["descrip"] = synth.GENERATED_DESCRIP.encode()
                nib.save(image, folder / name / f"s{seed}_{label}_{i:03d}.nii.gz")
    finally:
        synth.SLICE_MM = saved


def _same(volume, affine):
    return volume, affine


def _reorient(codes: str) -> Callable:
    def edit(volume, affine):
        image = nib.Nifti1Image(volume, affine)
        now = nib.orientations.io_orientation(affine)
        target = nib.orientations.axcodes2ornt(tuple(codes))
        moved = image.as_reoriented(nib.orientations.ornt_transform(now, target))
        return np.asarray(moved.dataobj), moved.affine

    return edit


def _crop(share: float) -> Callable:
    def edit(volume, affine):
        nx, ny = volume.shape[:2]
        x0, y0 = int(nx * (1 - share) / 2), int(ny * (1 - share) / 2)
        out = volume[x0 : nx - x0, y0 : ny - y0]
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ [x0, y0, 0] + affine[:3, 3]
        return out, shifted

    return edit


def _noise(sigma: float) -> Callable:
    def edit(volume, affine):
        rng = np.random.default_rng(int(volume.sum()) % (2**32))
        return np.rint(volume + rng.normal(0, sigma, volume.shape)), affine

    return edit


def _sharpen(volume, affine):
    v = volume.astype(np.float32)
    sharp = v + 1.0 * (v - ndimage.gaussian_filter(v, (1, 1, 0)))
    return np.clip(np.rint(sharp), -1024, 3071), affine


def _edge_enhance(volume, affine):
    """A sharp kernel of another form than the unsharp mask (and than the kernel augmentation):
    each slice minus half its 4-neighbour Laplacian."""
    v = volume.astype(np.float32)
    laplace = np.zeros((3, 3, 1), np.float32)
    laplace[1, :, 0] = laplace[:, 1, 0] = 1
    laplace[1, 1, 0] = -4
    sharp = v - 0.5 * ndimage.convolve(v, laplace, mode="nearest")
    return np.clip(np.rint(sharp), -1024, 3071), affine


def _soften(volume, affine):
    v = ndimage.gaussian_filter(volume.astype(np.float32), (1, 1, 0))
    return np.clip(np.rint(v), -1024, 3071), affine


#: shift name -> (what it is, shape, slice mm, edit)
SHIFTS: dict[str, tuple[str, tuple[int, int, int], float, Callable]] = {
    "none": ("as trained: 128 x 128, 8-mm slices, LAS", TRAIN_SHAPE, 8.0, _same),
    "slices-1mm": ("1-mm slices (320)", (128, 128, 320), 1.0, _same),
    "slices-3mm": ("3-mm slices (107)", (128, 128, 107), 3.0, _same),
    "slices-5mm": ("5-mm slices (64)", (128, 128, 64), 5.0, _same),
    "slices-10mm": ("10-mm slices (32)", (128, 128, 32), 10.0, _same),
    "pixels-fine": ("finer pixels (256 x 256)", (256, 256, 40), 8.0, _same),
    "pixels-coarse": ("coarser pixels (96 x 96)", (96, 96, 40), 8.0, _same),
    "fov-75": ("smaller field of view (central 75 %)", TRAIN_SHAPE, 8.0, _crop(0.75)),
    "ras": ("RAS storage", TRAIN_SHAPE, 8.0, _reorient("RAS")),
    "lps": ("LPS storage", TRAIN_SHAPE, 8.0, _reorient("LPS")),
    "noise-40": ("more noise (+40 HU Gaussian)", TRAIN_SHAPE, 8.0, _noise(40.0)),
    "sharp": ("sharper kernel (unsharp mask)", TRAIN_SHAPE, 8.0, _sharpen),
    "sharp-edge": ("sharper kernel (Laplacian edge enhancement)", TRAIN_SHAPE, 8.0, _edge_enhance),
    "soft": ("softer kernel (one-pixel Gaussian)", TRAIN_SHAPE, 8.0, _soften),
}


def _zoom(factors: tuple[float, float, float], slab: bool = False) -> Callable:
    """Resample by ``factors`` (linear), the affine scaled to match; ``slab``: thicker slices
    as the mean of the thin ones they cover (an integer ``1 / factors[2]``), as a scanner's
    thick reconstruction sums thin ones."""

    def edit(volume, affine):
        v = volume.astype(np.float32)
        if slab:
            n = int(round(1 / factors[2]))
            v = v[:, :, : v.shape[2] // n * n].reshape(*v.shape[:2], -1, n).mean(axis=3)
            out = ndimage.zoom(v, (factors[0], factors[1], 1), order=1)
        else:
            out = ndimage.zoom(v, factors, order=1)
        scale = np.array(volume.shape, float) / np.array(out.shape, float)
        resampled = affine.copy()
        resampled[:3, :3] = affine[:3, :3] * scale
        # voxel centres: the first keeps its place up to half the change of voxel size
        resampled[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((scale - 1) / 2)
        return np.clip(np.rint(out), -1024, 3071), resampled

    return edit


#: shifts applied to an existing test set (``--test``, e.g. the held-out generator's):
#: name -> (what it is, edit)
EDITS: dict[str, tuple[str, Callable]] = {
    "none": ("as trained", _same),
    "slices-half": ("slices half as thick (linear interpolation)", _zoom((1, 1, 2))),
    "slices-quarter": ("slices a quarter as thick (linear interpolation)", _zoom((1, 1, 4))),
    "slices-double": ("slices twice as thick (each the mean of two)", _zoom((1, 1, 0.5), True)),
    "pixels-fine": ("pixels half as large (linear interpolation)", _zoom((2, 2, 1))),
    "pixels-coarse": ("pixels 1.5x as large", _zoom((2 / 3, 2 / 3, 1))),
    "fov-75": ("smaller field of view (central 75 %)", _crop(0.75)),
    "ras": ("RAS storage", _reorient("RAS")),
    "las": ("LAS storage", _reorient("LAS")),
    "noise-40": ("more noise (+40 HU Gaussian)", _noise(40.0)),
    "sharp": ("sharper kernel (unsharp mask)", _sharpen),
    "sharp-edge": ("sharper kernel (Laplacian edge enhancement)", _edge_enhance),
    "soft": ("softer kernel (one-pixel Gaussian)", _soften),
}


def _edit_set(source: Path, target: Path, edit: Callable) -> None:
    for path in sorted(source.glob("CT-*/*.nii*")):
        image = nib.load(path)
        volume, affine = edit(np.asarray(image.dataobj), image.affine)
        out = nib.Nifti1Image(volume.astype(np.int16), affine, header=image.header)
        out.set_qform(affine, 1)
        out.set_sform(affine, 1)
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        nib.save(out, target / path.parent.name / path.name)


def _run(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        subprocess.run([sys.executable, *args], check=True, stdout=f, stderr=f, cwd=REPO)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=60, help="training scans per class")
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="training data and training seed")
    parser.add_argument("--test-seed", type=int, default=100)
    parser.add_argument("--difficulty", type=float, default=0.5, help="the generator's")
    parser.add_argument("--only", nargs="*", default=list(SHIFTS))
    parser.add_argument("--set", nargs="*", default=[], help="--set values for app.train")
    parser.add_argument("--run", type=Path, help="a trained model: with --test, no training")
    parser.add_argument("--test", type=Path, help="a labelled test set to shift (EDITS)")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    if args.run and args.test:
        return _shift_existing(args.run, args.test, out, log)
    run = out / "run"
    if not (run / "best_model.pt").is_file():
        train = out / "train"
        if not train.is_dir():
            _generate(train, args.per_class, args.seed, TRAIN_SHAPE, 8.0, _same, args.difficulty)
        sets = [x for v in args.set for x in ("--set", v)]
        _run(["-m", "app.train", "--data", str(train), "--recipe", "small-data", "--output",
              str(run), "--seed", str(args.seed), "--overwrite", *sets], log)  # fmt: skip
    results_path = out / "shift.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.only:
        if name in results:
            continue
        what, shape, slice_mm, edit = SHIFTS[name]
        test = out / "test" / name
        if not test.is_dir():
            _generate(
                test, args.test_per_class, args.test_seed, shape, slice_mm, edit, args.difficulty
            )
        results[name] = _evaluate(what, test, run, out / "eval" / name, log)
        results_path.write_text(json.dumps(results, indent=1))
        _table(results, out / "shift.md")


def _shift_existing(run: Path, source: Path, out: Path, log: Path) -> None:
    """Each of :data:`EDITS` applied to the scans of ``source``, evaluated with ``run``."""
    results_path = out / "shift.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, (what, edit) in EDITS.items():
        if name in results:
            continue
        test = out / "test" / name
        if not test.is_dir():
            _edit_set(source, test, edit)
        results[name] = _evaluate(what, test, run, out / "eval" / name, log)
        results_path.write_text(json.dumps(results, indent=1))
        _table(results, out / "shift.md")


def _evaluate(what: str, test: Path, run: Path, evaluated: Path, log: Path) -> dict:
    """``python -m app.evaluate`` of ``test`` with ``run``: its metrics, and the best accuracy
    any threshold reaches on those scans."""
    from studies.operating_point import best_accuracy

    start = time.perf_counter()
    _run(["-m", "app.evaluate", "--data", str(test), "--checkpoint", str(run), "--output",
          str(evaluated), "--no-baseline", "--overwrite"], log)  # fmt: skip
    metrics = json.loads((evaluated / "metrics.json").read_text())["metrics"]
    metrics.pop("rows", None)
    return {
        "what": what,
        "seconds": time.perf_counter() - start,
        "best_accuracy": best_accuracy(evaluated / "predictions.csv"),
        **metrics,
    }


def _table(results: dict, path: Path) -> None:
    def ci(m: dict) -> str:
        return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"

    base = results.get("none", {}).get("roc_auc", {}).get("value")
    lines = [
        "| acquisition | ROC-AUC (95% CI) | vs as trained | accuracy at its label | "
        "sensitivity | specificity | best accuracy, any threshold | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        auc = r["roc_auc"]
        delta = "" if base is None else f"{auc['value'] - base:+.3f}"
        lines.append(
            f"| {r['what']} | {ci(auc)} | {delta} | {ci(r['accuracy'])} | "
            f"{ci(r['sensitivity'])} | {ci(r['specificity'])} | "
            f"{r['best_accuracy']:.3f} | {r['threshold']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
