"""Transform recipes: the reference preprocessing, and the same plus augmentation for training.

The values come from the bundle configs (``configs/common.yaml``, ``configs/train.yaml``): the
factories take them as required keyword arguments and restate none of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
    Rotate90d,
)

from .augment import RandDiscreteAxialRotated
from .dicom import DicomSeriesReader
from .intensity import ClipScaleIntensityd
from .lung import CropToLungsd
from .readers import FastNiftiReader


def eval_transforms(
    *,
    keys: Sequence[str],
    spatial_size: Sequence[int],
    hu_window: Sequence[float],
    axcodes: str,
    load: bool = True,
    lung_crop: bool = False,
    lung_only: bool = False,
    lung_flatten_mm: float = 0.0,
) -> Compose:
    """The reference ``process_scan()`` as MONAI dictionary transforms.

    Load -> channel first -> reorient to ``axcodes`` (MosMed's LAS storage order, so MosMed scans
    stay untouched and every other orientation becomes consistent) -> clip ``hu_window`` and scale
    to [0, 1] -> linear resize with corners aligned (as scipy's ``zoom``) -> rotate 90 degrees in
    the axial plane (the reference's ``ndimage.rotate(v, 90)``; exact for square slices) ->
    float32 tensor of ``spatial_size``.

    Args:
        keys: image keys to transform.
        spatial_size: output size (x, y, z).
        hu_window: HU range clipped and scaled to [0, 1].
        axcodes: orientation every scan is brought to before the reference steps.
        load: include ``LoadImaged`` and ``EnsureChannelFirstd`` (``False`` for arrays already
            loaded channel-first with metadata).
        lung_crop: crop each scan to its lungs' bounding box (``transforms.lung``) before the
            window and the resize: more input voxels per lesion (off: the reference's).
        lung_only: set every voxel outside the lungs (the mask dilated by 2 voxels) to the
            window's low end (air) before the window: the network sees the lungs only, so its
            intensity statistics are the lungs' (off: the reference's).
        lung_flatten_mm: > 0: each lung voxel minus its lung's smooth background (a Gaussian of
            this sigma in mm; ``transforms.lung.flatten_lungs``) before the window: dependent
            density and expiration vanish, local findings stay (0: the reference's).
    """
    # scans are read in their stored dtype (int16 HU for MosMed): the window clips them before
    # any float copy exists
    # the fast NIfTI reader first (LoadImage tries the last given first), then DICOM series in
    # slice-position order (transforms.dicom); MONAI falls back to its other readers (NRRD...)
    head = (
        [
            # reversed voxel axes (no transposing copy): Orientationd below restores the order
            # (an instance: LoadImaged would pass reader kwargs on to its fallback readers too)
            # DICOM series (a folder, or a list of its files) in slice-position order first
            LoadImaged(
                keys,
                reader=(DicomSeriesReader(), FastNiftiReader(reverse_axes=True)),  # type: ignore[arg-type]
                image_only=True,
                dtype=None,
            ),
            EnsureChannelFirstd(keys),
        ]
        if load
        else []
    )
    x, y, z = (int(s) for s in spatial_size)
    return Compose(
        [
            *head,
            Orientationd(keys, axcodes=axcodes, labels=None),
            *(
                [
                    CropToLungsd(
                        keys,
                        crop=lung_crop,
                        outside=hu_window[0] if lung_only else None,
                        flatten_mm=lung_flatten_mm,
                    )
                ]
                if lung_crop or lung_only or lung_flatten_mm
                else []
            ),
            ClipScaleIntensityd(keys, a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0),
            # resizing before the 90-degree turn gives the same voxels (the turn only permutes
            # and flips axes, which corner-aligned linear resizing commutes with) on 1/16 of them
            Resized(keys, spatial_size=(y, x, z), mode="trilinear", align_corners=True),
            Rotate90d(keys, k=1, spatial_axes=(0, 1)),
            EnsureTyped(keys, dtype=np.float32, track_meta=False),
        ]
    )


def train_transforms(
    *,
    keys: Sequence[str],
    spatial_size: Sequence[int],
    hu_window: Sequence[float],
    axcodes: str,
    angles_deg: Sequence[float],
    lung_crop: bool = False,
    lung_only: bool = False,
    lung_flatten_mm: float = 0.0,
) -> Compose:
    """:func:`eval_transforms` followed by the reference's random axial rotation.

    Caching datasets (``CacheDataset``, ``PersistentDataset``) cache everything before the first
    random transform, so the deterministic prefix is computed once per scan.

    Args:
        keys: image keys to transform.
        spatial_size: output size (x, y, z).
        hu_window: HU range clipped and scaled to [0, 1].
        axcodes: orientation every scan is brought to.
        angles_deg: rotation angles to draw from, in degrees.
        lung_crop: as :func:`eval_transforms`.
        lung_only: as :func:`eval_transforms`.
        lung_flatten_mm: as :func:`eval_transforms`.
    """
    prefix = eval_transforms(
        keys=keys,
        spatial_size=spatial_size,
        hu_window=hu_window,
        axcodes=axcodes,
        lung_crop=lung_crop,
        lung_only=lung_only,
        lung_flatten_mm=lung_flatten_mm,
    )
    return Compose([*prefix.transforms, RandDiscreteAxialRotated(keys, angles_deg=angles_deg)])
