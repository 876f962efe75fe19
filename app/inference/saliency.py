"""Saliency maps a researcher can overlay and measure: a map of the network's input grid carried
back to the input scan's own voxel grid and affine (NIfTI), and how well maps point at known
lesions (the pointing game)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def to_input_grid(
    saliency: np.ndarray,
    scan_path: str | Path,
    axcodes: str,
    lung_crop: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(map, affine)`` of a (x, y, z) map of the preprocessed volume (made with ``axcodes``,
    the model's orientation setting) on the NIfTI scan's own
    voxel grid: the preprocessing's geometry undone step by step (the 90-degree axial turn, the
    corner-aligned trilinear resize, the lung crop, the reorientation to ``axcodes``); zero
    outside the crop."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    img = nib.load(str(scan_path))
    img = nib.funcs.squeeze_image(img)
    stored = io_orientation(img.affine)
    target = axcodes2ornt(tuple(axcodes))
    shape = img.shape[:3]
    oriented_shape = tuple(
        int(shape[int(i)]) for i in ornt_transform(stored, target)[:, 0].argsort()
    )
    start, end = [0, 0, 0], list(oriented_shape)
    if lung_crop:
        from transforms.lung import lung_box

        volume = apply_orientation(np.asanyarray(img.dataobj), ornt_transform(stored, target))
        box = lung_box(np.asarray(volume, dtype=np.float32))
        if box is not None:
            start, end = box
    turned = np.rot90(np.asarray(saliency, dtype=np.float32), k=-1, axes=(0, 1))
    size = tuple(int(b - a) for a, b in zip(start, end, strict=True))
    resized = F.interpolate(
        torch.as_tensor(turned.copy())[None, None],
        size=size,
        mode="trilinear",
        align_corners=True,
    )[0, 0].numpy()
    oriented = np.zeros(oriented_shape, dtype=np.float32)
    oriented[start[0] : end[0], start[1] : end[1], start[2] : end[2]] = resized
    back = apply_orientation(oriented, ornt_transform(target, stored))
    return np.ascontiguousarray(back, dtype=np.float32), img.affine


def write_saliency_nifti(
    saliency: np.ndarray,
    scan_path: str | Path,
    out_path: str | Path,
    axcodes: str,
    lung_crop: bool = False,
) -> Path:
    """:func:`to_input_grid`, written as float32 NIfTI with the scan's affine (atomically)."""
    import gzip

    import nibabel as nib

    from app.bundle.portable.files import atomic_write

    data, affine = to_input_grid(saliency, scan_path, axcodes, lung_crop)
    image = nib.Nifti1Image(data, affine)
    image.header["descrip"] = b"ctclassify saliency (attention, not a finding)"
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    payload = gzip.compress(image.to_bytes(), compresslevel=6)

    def write(tmp: Path) -> None:
        tmp.write_bytes(payload)

    atomic_write(out_path, write)
    return out_path


def pointing_game(
    saliency: np.ndarray,
    lesions: np.ndarray,
    lungs: np.ndarray,
    tolerance: int = 2,
) -> dict[str, Any]:
    """How a map of one scan relates to its known lesions (all arrays on one grid).

    ``hit``: the map's maximum lies inside a lesion dilated by ``tolerance`` voxels;
    ``in_lungs``: the share of the map's mass inside the lungs; ``chance``: the probability that
    a random lung voxel lies in the dilated lesions (what a map pointing at random in the lungs
    would score).
    """
    from scipy import ndimage

    saliency = np.asarray(saliency, dtype=np.float64)
    target = ndimage.binary_dilation(np.asarray(lesions, bool), iterations=tolerance)
    peak = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    total = float(saliency.sum())
    lungs = np.asarray(lungs, bool)
    return {
        "hit": bool(target[peak]),
        "in_lungs": float(saliency[lungs].sum() / total) if total > 0 else float("nan"),
        "chance": float((target & lungs).sum() / max(int(lungs.sum()), 1)),
    }


def summarise_pointing(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Hit rate, mean share in the lungs and mean chance over scans."""
    return {
        "scans": len(results),
        "hit_rate": float(np.mean([r["hit"] for r in results])) if results else float("nan"),
        "in_lungs": float(np.nanmean([r["in_lungs"] for r in results]))
        if results
        else float("nan"),
        "chance": float(np.mean([r["chance"] for r in results])) if results else float("nan"),
    }
