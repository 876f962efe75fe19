"""The baseline every model is measured against: lung-density features with logistic regression.

Features of a scan, from its lungs (``transforms.lung.lung_mask``, no learned weights): the share
of lung voxels in 50-HU bins from -1000 to +200 HU, the 5th to 95th HU percentiles, the shares
in the ground-glass (-700 to -300 HU) and consolidation (-100 to +100 HU) ranges, mean and
standard deviation. A standardised logistic regression (scikit-learn) on them is what a
histogram sees; a CNN that does not beat it has learned nothing a histogram could not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.cli import config_values
from app.evaluation.metrics import auc_with_ci, paired_auc_difference
from app.readback import read_split
from app.run_folder import SPLIT, fold_dirs

#: 50-HU bins of the lung histogram
BIN_EDGES = np.arange(-1000.0, 201.0, 50.0)
PERCENTILES = (5, 25, 50, 75, 95)
GROUND_GLASS = (-700.0, -300.0)
CONSOLIDATION = (-100.0, 100.0)
#: the regression's inverse regularisation (scikit-learn's default)
C = 1.0


def density_features(volume: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The feature vector of one (x, y, z) HU volume (axial third axis) with voxel ``spacing``
    (mm); NaN when the mask finds no lung."""
    from transforms.lung import lung_mask

    n_features = len(BIN_EDGES) - 1 + len(PERCENTILES) + 4
    if np.asarray(volume).size == 0:
        return np.full(n_features, np.nan)
    values = np.asarray(volume, dtype=np.float32)[lung_mask(volume, spacing=spacing)]
    if values.size == 0:
        return np.full(n_features, np.nan)
    histogram = np.histogram(np.clip(values, BIN_EDGES[0], BIN_EDGES[-1]), BIN_EDGES)[0]
    return np.concatenate(
        [
            histogram / values.size,
            np.percentile(values, PERCENTILES),
            [
                np.mean((values >= GROUND_GLASS[0]) & (values < GROUND_GLASS[1])),
                np.mean((values >= CONSOLIDATION[0]) & (values < CONSOLIDATION[1])),
                values.mean(),
                values.std(),
            ],
        ]
    )


def scan_features(
    paths: Sequence[str], axcodes: str | None = None, progress: bool = False
) -> np.ndarray:
    """:func:`density_features` of each scan (NIfTI file or DICOM series folder), read and
    reoriented as the model's preprocessing does (``axcodes``: the configs' by default, whose
    third axis is axial); a row of NaN for a scan that cannot be read."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd
    from tqdm import tqdm

    from transforms.dicom import DicomSeriesReader
    from transforms.readers import FastNiftiReader

    axcodes = axcodes or str(config_values("common.yaml")["axcodes"])
    load = Compose(
        [
            # the model's readers: DICOM series by slice position, NIfTI; MONAI's for the rest
            LoadImaged(
                "image",
                reader=(DicomSeriesReader(), FastNiftiReader()),  # type: ignore[arg-type]
                image_only=True,
            ),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes=axcodes, labels=None),
        ]
    )
    rows = []
    for path in tqdm(paths, unit="scan", disable=not progress, file=sys.stderr, desc="baseline"):
        try:
            image = load({"image": str(path)})["image"]
            spacing = [float(s) for s in np.asarray(image.pixdim)[:3]]
            rows.append(density_features(np.asarray(image[0]), spacing))
        except Exception:  # the model's own run reports the file; the baseline skips it
            rows.append(density_features(np.zeros((0, 0, 0))))
    return np.array(rows, dtype=np.float64)


@dataclass
class DensityBaseline:
    """Logistic regression on :func:`density_features`, fitted on the model's training scans.

    Example:
        >>> baseline = DensityBaseline.fit(train_paths, train_labels)  # doctest: +SKIP
        >>> baseline.predict(test_paths)  # P(abnormal) per scan, NaN where unreadable # doctest: +SKIP
    """

    model: Any
    scans: int

    @classmethod
    def fit(
        cls, paths: Sequence[str], labels: Sequence[int], progress: bool = False
    ) -> DensityBaseline:
        return cls.fit_features(scan_features(paths, progress=progress), labels)

    @classmethod
    def fit_features(cls, features: np.ndarray, labels: Sequence[int]) -> DensityBaseline:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        y = np.asarray(labels, dtype=int)
        ok = np.isfinite(features).all(axis=1)
        if len(set(y[ok].tolist())) < 2:
            raise ValueError("the baseline needs readable training scans of both classes")
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        model.fit(features[ok], y[ok])
        return cls(model, int(ok.sum()))

    def predict(self, paths: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.predict_features(scan_features(paths, progress=progress))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        out = np.full(len(features), np.nan)
        ok = np.isfinite(features).all(axis=1)
        if ok.any():
            out[ok] = self.model.predict_proba(features[ok])[:, 1]
        return out


#: the features that make the classical burden measure: the shares of the lung at ground-glass
#: and at consolidation density (:func:`density_features`' two after the histogram and
#: percentiles)
BURDEN_FEATURES = (len(BIN_EDGES) - 1 + len(PERCENTILES), len(BIN_EDGES) + len(PERCENTILES))


def burden_grades(
    train_features: np.ndarray, train_grades: Sequence[int], features: np.ndarray, grades: int
) -> np.ndarray:
    """A severity baseline by the classical burden measure: the share of the lung at
    ground-glass or consolidation density. Each boundary between grade ``k`` and above gets the burden cut that
    calls the training scans on either side best (the middle of the best run of cuts); a scan's
    grade is the number of cuts its burden passes (cuts made to rise with ``k``); -1 where no
    lung was found."""
    burden = np.asarray(train_features)[:, BURDEN_FEATURES].sum(axis=1)
    truth = np.asarray(train_grades, int)
    keep = np.isfinite(burden)
    burden, truth = burden[keep], truth[keep]
    values = np.unique(burden)
    candidates = np.concatenate(
        [[values[0] - 1e-6], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-6]]
    )
    called = burden[None, :] >= candidates[:, None]  # (cuts, scans)
    found = []
    for k in range(grades - 1):
        right = (called == (truth > k)[None, :]).mean(axis=1)
        found.append(float(candidates[right >= right.max() - 1e-12].mean()))
    cuts = np.maximum.accumulate(np.asarray(found))
    test = np.asarray(features)[:, BURDEN_FEATURES].sum(axis=1)
    out = (test[:, None] >= cuts[None, :]).sum(axis=1)
    return np.where(np.isfinite(test), out, -1)


def training_scans(checkpoint: Path) -> list[dict[str, Any]] | None:
    """The scans the model at ``checkpoint`` trained on (its run's ``split.json`` training
    part, relative paths resolved against the folder the training ran in; for a
    cross-validation folder every scan of its folds), as ``{image, label}``; None when no split
    is recorded (a bundle, a bare checkpoint file)."""

    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (folder / SPLIT).is_file():
        return read_split(folder / SPLIT)["training"]
    folds = fold_dirs(folder)
    if folds and (folds[0] / SPLIT).is_file():  # each fold's split holds every scan
        split = read_split(folds[0] / SPLIT)
        return split["training"] + split["validation"]
    return None


class NoBaseline(Exception):
    """Why the density baseline could not be fitted or compared (said in metrics.json)."""


def baseline_figures(
    checkpoint: Path,
    rows: list[dict[str, Any]],
    confidence: float,
    progress: bool,
    grade_names: list[str] | None = None,
) -> dict[str, Any]:
    """The density baseline (``app.evaluation.baseline``) fitted on the model's own training
    scans, on the classified test scans: its ROC-AUC with its interval and the model's paired
    difference (DeLong). For a severity model (``grade_names``), ROC-AUC of normal vs any
    grade, and each test scan's grade by lung burden (:func:`burden_grades`) in the rows'
    ``grade_baseline``; ``graded`` holds those grades (-1: no lung found).

    Raises:
        NoBaseline: the training scans are not recorded or not found, or too few to fit.
    """

    train = training_scans(checkpoint)
    if not train:
        raise NoBaseline(
            "the model's training scans are not recorded (no split.json beside the checkpoint: "
            "a bundle or a checkpoint copied out of its run folder)"
        )
    present = [t for t in train if Path(t["image"]).exists()]
    if not present:
        raise NoBaseline(
            f"none of the model's {len(train)} training scans is found (e.g. "
            f"{train[0]['image']}): moved or deleted"
        )
    train_labels = [int(int(t["label"]) > 0) for t in present]  # severity: any grade
    train_features = scan_features([t["image"] for t in present], progress=progress)
    try:
        baseline = DensityBaseline.fit_features(train_features, train_labels)
    except ValueError as exc:
        raise NoBaseline(f"it cannot be fitted on the training scans ({str(exc)[:200]})") from None
    for r in rows:
        r["prob_baseline"] = ""
    ok = [r for r in rows if r["prob_abnormal"] != ""]
    test_features = scan_features([r["path"] for r in ok], progress=progress)
    probs = baseline.predict_features(test_features)
    both = np.isfinite(probs)
    grades = np.array([int(r["true_label"]) for r in ok])
    labels = (grades > 0).astype(int)[both]
    model = np.array([float(r["prob_abnormal"]) for r in ok])[both]
    for r, p in zip(ok, probs, strict=True):
        r["prob_baseline"] = "" if not np.isfinite(p) else round(float(p), 6)
    if len(set(labels.tolist())) < 2:
        raise NoBaseline("it read the test scans of one class only")
    graded = None
    if grade_names:
        graded = burden_grades(
            train_features, [int(t["label"]) for t in present], test_features, len(grade_names)
        )
        for r, g in zip(ok, graded, strict=True):
            r["grade_baseline"] = "" if g < 0 else grade_names[int(g)]
    difference = paired_auc_difference(model, probs[both], labels, confidence)
    return {
        "what": "lung-density features + logistic regression (app.evaluation.baseline)",
        "trained_on": baseline.scans,
        "scans": int(both.sum()),
        "roc_auc": auc_with_ci(probs[both], labels, confidence),
        "difference": difference,
        "graded": None if graded is None else graded.tolist(),
        "verdict": (
            "the model beats its density baseline"
            if difference.low > 0
            else "the model does NOT beat its density baseline (the difference's interval "
            "reaches 0 or below)"
        ),
    }
