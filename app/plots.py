"""Figures people would rather look at than read: training curves and slice montages."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.run_folder import VALIDATION_LABELS, kept_row
from app.runtime.files import atomic_write


def embedded_png(path: Path | None, alt: str, zoom: bool = False) -> str:
    """``<img>`` holding the PNG at ``path`` (base64: a report is one self-contained file); with
    ``zoom`` a click shows it at full size (CSS focus, no script). "" when there is no file."""

    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    focus = ' tabindex="0"' if zoom else ""
    return f'<img{focus} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path, title: str | None = None) -> None:
    """The figure as PNG, atomically; ``title`` also in the PNG's Title text chunk (what the
    picture says, for a reader that cannot see it)."""
    meta = {"Title": title} if title else None
    atomic_write(
        path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight", metadata=meta)
    )


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Accuracy and loss per epoch, train vs val (as the reference plots them), and validation
    ROC-AUC, sensitivity and specificity; the kept epoch (best validation accuracy, the one
    ``best_model.pt`` holds) marked in every panel, and where the run stopped."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in rows]

    kept = kept_row(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = (
        ("Model accuracy", (("train_acc", "train"), ("val_acc", "val"))),
        ("Model loss", (("train_loss", "train"), ("val_loss", "val"))),
        (
            "Validation ROC-AUC, sensitivity, specificity",
            tuple((k, v) for k, v in VALIDATION_LABELS.items() if k != "val_acc"),
        ),
    )
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(
                    epochs,
                    [np.nan if v is None else v for v in values],
                    marker="o",
                    ms=3,
                    label=label,
                )
        if kept is not None:
            ax.axvline(
                int(kept["epoch"]),
                color="0.3",
                ls="--",
                lw=1,
                label=f"kept model (epoch {kept['epoch']})",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if kept is not None:
        fig.suptitle(
            f"kept model: epoch {kept['epoch']} of {epochs[-1]}, val accuracy "
            f"{kept['val_acc']:.3f}"
            + (f", ROC-AUC {kept['val_auc']:.3f}" if kept.get("val_auc") is not None else ""),
            fontsize=11,
        )
    _save(fig, path)
    plt.close(fig)


#: overlay values below it are left undrawn (a map scaled by a small probability shows nothing)
OVERLAY_FLOOR = 0.05


def plot_montage(
    volume: np.ndarray,
    path: str | Path,
    rows: int = 4,
    columns: int = 10,
    overlay: np.ndarray | None = None,
    title: str | None = None,
) -> None:
    """``rows`` x ``columns`` axial slices of a preprocessed (x, y, z) volume, evenly spaced
    (the reference shows 40 slices, 4 x 10); ``overlay`` (same shape, 0..1) is drawn as a
    heat map on top, e.g. a saliency map."""
    plt = _pyplot()
    volume = np.asarray(volume)
    if volume.ndim == 4:
        volume = volume[0]
    count = rows * columns
    index = np.linspace(0, volume.shape[2] - 1, count).round().astype(int)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.0, rows * 2.0 + 0.6))
    heat = None
    for i, (ax, z) in enumerate(zip(np.ravel(axes), index, strict=True)):
        # the reference's 90-degree rotation makes axis 0 the rows: anterior up, patient right
        # on the left, as radiologists read axial slices
        ax.imshow(volume[:, :, z], cmap="gray", vmin=0, vmax=1)
        if overlay is not None:  # below OVERLAY_FLOOR nothing is drawn: no wash over the scan
            shown = np.ma.masked_less(np.asarray(overlay)[..., z], OVERLAY_FLOOR)
            heat = ax.imshow(shown, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.text(0.03, 0.97, f"z {z}", color="yellow", fontsize=7, va="top", transform=ax.transAxes)
        if i == 0:  # orientation letters on the first slice
            for x, y, letter in (
                (0.5, 0.97, "A"),
                (0.5, 0.03, "P"),
                (0.03, 0.5, "R"),
                (0.97, 0.5, "L"),
            ):
                ax.text(x, y, letter, color="cyan", fontsize=8, ha="center", va="center",
                        transform=ax.transAxes, fontweight="bold")  # fmt: skip
        ax.axis("off")
    plt.subplots_adjust(wspace=0.02, hspace=0.02)
    if heat is not None:  # what the colours mean
        bar = fig.colorbar(heat, ax=np.ravel(axes).tolist(), fraction=0.015, pad=0.01)
        bar.set_label("saliency x P(abnormal): attention, not a finding", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, title)
    plt.close(fig)


def plot_cv_curves(folds: Sequence[Sequence[Mapping[str, Any]]], path: str | Path) -> None:
    """Cross-validation: each fold's validation ROC-AUC and accuracy per epoch, overlaid, the
    kept epoch (best validation accuracy) marked."""

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for k, rows in enumerate(folds):
        rows = [r for r in rows if r.get("val_acc") is not None]
        kept = kept_row(rows)
        if kept is None:
            continue
        epochs = [r["epoch"] for r in rows]
        for ax, key in zip(axes, ("val_auc", "val_acc"), strict=True):
            values = [r.get(key) for r in rows]
            (line,) = ax.plot(epochs, values, marker=".", label=f"fold {k}")
            ax.plot([kept["epoch"]], [kept.get(key)], "*", ms=12, color=line.get_color())
    for ax, title in zip(axes, ("validation ROC-AUC", "validation accuracy"), strict=True):
        ax.set(xlabel="epoch", title=title + " (star: the kept epoch)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
