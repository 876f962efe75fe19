"""Saliency maps a researcher can overlay and measure: a map of the network's input grid carried
back to the input scan's own voxel grid and affine (NIfTI), and how well maps point at known
lesions (the pointing game)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import ConfigError
from app.runtime.files import atomic_write

if TYPE_CHECKING:
    import torch

#: how :func:`saliency_map` (``Classifier.saliency``) maps where the model looks
SALIENCY_METHODS = ("gradient", "gradcam")
#: Gaussian smoothing (voxels of the network's input) of the gradient saliency
SALIENCY_SIGMA = 2.0


def to_input_grid(
    saliency: np.ndarray,
    scan_path: str | Path,
    axcodes: str,
    lung_crop: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(map, affine)`` of a (x, y, z) map of the preprocessed volume (made with ``axcodes``,
    the model's orientation setting) on the scan's own (a NIfTI file's or DICOM series')
    voxel grid: the preprocessing's geometry undone step by step (the 90-degree axial turn, the
    corner-aligned trilinear resize, the lung crop, the reorientation to ``axcodes``); zero
    outside the crop."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    img = nib.funcs.squeeze_image(scan_image(scan_path))
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


def scan_image(scan: str | Path) -> Any:
    """A scan as a nibabel image: a NIfTI file as stored; a DICOM series (a folder or
    ``FOLDER#SeriesUID``) as the app's reader gives it to the preprocessing (column, row, slice
    in position order, its RAS affine), so a map carried back lies on the series in a viewer."""
    import nibabel as nib

    name = str(scan)
    if name.endswith((".nii", ".nii.gz")):
        return nib.load(name)
    from transforms.dicom import DicomSeriesReader

    reader = DicomSeriesReader()
    volume, meta = reader.get_data(reader.read(name))
    return nib.Nifti1Image(volume, meta["affine"])


def write_saliency_nifti(
    saliency: np.ndarray,
    scan_path: str | Path,
    out_path: str | Path,
    axcodes: str,
    lung_crop: bool = False,
) -> Path:
    """:func:`to_input_grid`, written as float32 NIfTI with the scan's affine (atomically)."""

    import nibabel as nib

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


def saliency_map(
    network: torch.nn.Module,
    image: torch.Tensor,
    device: torch.device,
    method: str = "gradient",
    block: int = -1,
) -> np.ndarray:
    """Where ``network`` looks, for one preprocessed (C, x, y, z) volume: a map of the input's
    grid in [0, 1].

    ``gradient`` (the default): the positive part of the gradient of the abnormal logit (a
    severity model's: the sum of its cumulative logits, what raises its grade) with
    respect to each input voxel (the voxels whose brightening raises it), smoothed by a
    Gaussian of :data:`SALIENCY_SIGMA` voxels: on generated scans its maximum lies in a
    lesion on every tested abnormal scan for the small-data recipe (studies/log.md).
    ``gradcam``: MONAI's Grad-CAM of conv block ``block`` (default the last), which the
    network's few-voxel last blocks make coarse.
    """
    import torch

    if not hasattr(network, "features"):
        raise ConfigError("saliency needs one network: run it with one fold's model")
    if method == "gradient":
        from scipy import ndimage

        with torch.enable_grad():
            x = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(network(x).sum(), x)  # no weight gradients
        heat = ndimage.gaussian_filter(
            grad[0, 0].clamp_min(0).cpu().numpy().astype(np.float64), SALIENCY_SIGMA
        )
    elif method == "gradcam":
        from monai.visualize import GradCAM

        blocks = len(network.features)  # type: ignore[arg-type]
        if not -blocks <= block < blocks:
            raise ConfigError(f"saliency block {block}: the network has {blocks} blocks")
        cam = GradCAM(nn_module=network, target_layers=f"features.{block % blocks}.conv")
        with torch.enable_grad():
            x = torch.as_tensor(image)[None].to(device).requires_grad_(True)
            heat = cam(x=x, class_idx=0)[0, 0].detach().cpu().numpy()
    else:
        raise ConfigError(f"saliency method must be one of {', '.join(SALIENCY_METHODS)}")
    span = float(heat.max() - heat.min())
    out = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    return np.asarray(out, dtype=np.float32)
