"""The evaluation's pictures: ROC curve with the operating point, reliability diagram, confusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.evaluation.metrics import BinaryMetrics
from app.plots import _pyplot, _save

#: the pictures of an evaluation
ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"
CONFUSION_PNG = "confusion.png"


def plot_roc(probs: np.ndarray, labels: np.ndarray, m: BinaryMetrics, path: str | Path) -> None:
    """ROC curve (scikit-learn's), the chance line, and the operating point at the threshold."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if m.n_positive and m.n_negative:
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, color="C0", lw=2, label=f"ROC-AUC {m.roc_auc.text()}")
        ax.plot(
            [1 - m.specificity.value],
            [m.sensitivity.value],
            "o",
            color="C3",
            ms=8,
            clip_on=False,  # at a corner (a perfect split) the whole dot, not a quarter
            zorder=5,
            label=f"threshold {m.threshold:g}: sensitivity {m.sensitivity.value:.2f}, "
            f"specificity {m.specificity.value:.2f}",
        )
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.set_title(f"ROC on {m.n} scans ({m.n_positive} abnormal, {m.n_negative} normal)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


#: a calibration bin with fewer scans is drawn apart (its fraction is 0 or 1 by chance)
CALIBRATION_MIN_SCANS = 5


def calibration_points(
    probs: np.ndarray, labels: np.ndarray, bins: int = 10
) -> list[dict[str, float | int]]:
    """Per bin of predicted probability (the bins ``expected_calibration_error`` uses): the
    scans in it, their mean predicted probability and the observed fraction abnormal."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    points: list[dict[str, float | int]] = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        points.append({
            "bin": b, "scans": n,
            "mean_prob": float(probs[inside].mean()) if n else (b + 0.5) / bins,
            "observed": float(labels[inside].mean()) if n else float("nan"),
        })  # fmt: skip
    return points


def plot_calibration(
    probs: np.ndarray,
    labels: np.ndarray,
    m: BinaryMetrics,
    path: str | Path,
    bins: int = 10,
    temperature: float | None = None,
) -> None:
    """Reliability diagram: observed frequency of abnormal per bin of predicted probability
    (the bins ``expected_calibration_error`` uses), with the scans per bin below; the title says
    whether the probabilities are after temperature scaling (``temperature``) or as the model
    gives them."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    points = calibration_points(probs, labels, bins)
    counts = [p["scans"] for p in points]
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    solid = [p for p in points if p["scans"] >= CALIBRATION_MIN_SCANS]
    sparse = [p for p in points if 0 < p["scans"] < CALIBRATION_MIN_SCANS]
    ax.plot([p["mean_prob"] for p in solid], [p["observed"] for p in solid], "o-", color="C0",
            label=f"model (ECE {m.ece:.3f})")  # fmt: skip
    if sparse:  # a bin of one scan reads 0 or 1: shown, not joined, its count beside it
        ax.plot([p["mean_prob"] for p in sparse], [p["observed"] for p in sparse], "o",
                mfc="none", color="C0", label=f"bins of fewer than {CALIBRATION_MIN_SCANS} "
                "scans (not joined: too few to read)")  # fmt: skip
    for p in points:
        if p["scans"]:
            ax.annotate(f"n={p['scans']}", (p["mean_prob"], p["observed"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points", color="0.3")  # fmt: skip
    ax.set(ylabel="observed fraction abnormal", xlim=(0, 1), ylim=(-0.03, 1.03))
    scaling = (
        f"after temperature scaling (T = {temperature:.3g})"
        if temperature is not None
        else "no temperature scaling"
    )
    ax.set_title(f"Calibration, {scaling}\n(Brier score {m.brier:.3f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar((np.arange(bins) + 0.5) / bins, counts, width=0.9 / bins, color="0.5")
    hist.set(xlabel="predicted P(abnormal)", ylabel="scans")
    _save(fig, path)
    plt.close(fig)


def confusion_colours(matrix: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
    """Each cell's colour (``Blues`` from 0 to the largest count) and the text colour that
    reads on it (white on dark cells, black on light ones)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    norm = Normalize(vmin=0, vmax=max(1, int(matrix.max())))
    cells = colormaps["Blues"](norm(matrix))
    luminance = cells[..., :3] @ np.array([0.2126, 0.7152, 0.0722])
    text = [["white" if v < 0.5 else "black" for v in row] for row in luminance]
    return cells, text


def plot_confusion(m: BinaryMetrics, path: str | Path, class_names: list[str]) -> None:
    """The 2x2 confusion matrix at the threshold, counts and row percentages."""
    plt = _pyplot()
    c = m.confusion
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    cells, text = confusion_colours(matrix)
    ax.imshow(cells)
    for (i, j), count in np.ndenumerate(matrix):
        share = count / max(1, matrix[i].sum())
        ax.text(
            j,
            i,
            f"{count}\n{100 * share:.0f}%",
            ha="center",
            va="center",
            fontsize=12,
            color=text[i][j],
        )
    ax.set_xticks([0, 1], [f"predicted {n}" for n in class_names])
    ax.set_yticks([0, 1], [f"true {n}" for n in class_names])
    ax.set_title(f"Confusion at threshold {m.threshold:g}")
    _save(fig, path)
    plt.close(fig)
