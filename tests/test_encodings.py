"""Differential tests: our preprocessing (fast reader, fused HU window, resize before the turn)
against MONAI's stock chain, and the classification, over every NIfTI encoding a user can hand us.

The stock chain is ``LoadImaged(reader=NibabelReader) -> EnsureChannelFirstd -> Orientationd ->
ScaleIntensityRanged(clip) -> Resized -> Rotate90d``; files are written byte by byte
(``conftest.write_raw_nifti``), so the byte order, scaling and header variants are exactly the
ones under test.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SETTINGS, write_raw_nifti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    Resized,
    Rotate90d,
    ScaleIntensityRanged,
)

from app.inference.classifier import Classifier
from transforms.presets import eval_transforms

DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64")
#: (slope, inter) per stored type: HU = raw * slope + inter, exact in float32
SCALING = {
    "uint8": (8.0, -1024.0),
    "int8": (8.0, 0.0),
    "uint16": (1.0, -1024.0),
    "int16": (2.0, -1024.0),
    "int32": (0.5, -1000.0),
    "float32": (2.0, -24.0),
    "float64": (2.0, -24.0),
}
#: stored values that are not HU without scaling: refused as "not CT in Hounsfield units"
NOT_HU_UNSCALED = {"uint8", "int8", "uint16"}
SHAPE = (34, 30, 20)
AFFINE = np.diag([-0.8, -0.8, 5.0, 1.0])  # LPS: the chains reorient it to LAS
TOLERANCE = 1e-5


def hu_volume(seed: int = 0) -> np.ndarray:
    """Air around a body of soft tissue with two lungs: integer HU from -1024 to 1000."""
    rng = np.random.default_rng(seed)
    vol = np.full(SHAPE, -1024.0)
    vol[3:31, 4:27, :] = rng.integers(-100, 200, size=(28, 23, SHAPE[2]))
    vol[6:15, 8:23, 2:18] = rng.integers(-950, -700, size=(9, 15, 16))
    vol[19:28, 8:23, 2:18] = rng.integers(-950, -700, size=(9, 15, 16))
    vol[10, 10, 10] = 1000.0
    return vol


def stored(dtype: str, scaled: bool, hu: np.ndarray) -> tuple[np.ndarray, float | None, float]:
    """Raw values of ``dtype`` (and the scaling) that a scanner or converter would write."""
    if scaled:
        slope, inter = SCALING[dtype]
        raw = np.round((hu - inter) / slope) if dtype[0] in "ui" else (hu - inter) / slope
        info = np.iinfo(dtype) if dtype[0] in "ui" else None
        if info is not None:
            raw = np.clip(raw, info.min, info.max)
        return raw.astype(dtype), slope, inter
    if dtype == "uint8":
        return np.round((hu + 1024) / 8).clip(0, 255).astype(dtype), None, 0.0
    if dtype == "int8":
        return np.round(hu / 8).clip(-128, 127).astype(dtype), None, 0.0
    if dtype == "uint16":
        return (hu + 1024).astype(dtype), None, 0.0
    return hu.astype(dtype), None, 0.0


def values_of(raw: np.ndarray, slope: float | None, inter: float) -> np.ndarray:
    """What the file means: the stored values with the scaling applied."""
    return raw.astype(np.float64) * (1.0 if slope is None else slope) + inter


def stock_chain(size=TINY_SETTINGS["spatial_size"]) -> Compose:
    """MONAI's own path, step for step what the presets promise to equal."""
    low, high = TINY_SETTINGS["hu_window"]
    x, y, z = size
    return Compose(
        [
            LoadImaged("image", reader=NibabelReader(), image_only=True),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="LAS", labels=None),
            ScaleIntensityRanged("image", low, high, 0.0, 1.0, clip=True),
            Resized("image", spatial_size=(y, x, z), mode="trilinear", align_corners=True),
            Rotate90d("image", k=1, spatial_axes=(0, 1)),
        ]
    )


def ours(size=TINY_SETTINGS["spatial_size"]) -> Compose:
    return eval_transforms(
        keys=["image"], spatial_size=size, hu_window=TINY_SETTINGS["hu_window"], axcodes="LAS"
    )


VARIANTS = list(itertools.product((1, 2), (".nii", ".nii.gz"), ("3d", "4d"), ("qform", "sform")))


def write_variants(folder: Path, dtype: str, endian: str, scaled: bool) -> list[Path]:
    hu = hu_volume()
    raw, slope, inter = stored(dtype, scaled, hu)
    paths = []
    for version, ext, layout, xform in VARIANTS:
        data = raw[..., None] if layout == "4d" else raw
        name = f"{dtype}-{'be' if endian == '>' else 'le'}-{'scl' if scaled else 'raw'}"
        path = folder / f"{name}-nifti{version}-{layout}-{xform}{ext}"
        paths.append(
            write_raw_nifti(
                path,
                data,
                AFFINE,
                version=version,
                endian=endian,
                slope=slope,
                inter=inter,
                xform=xform,
            )
        )
    return paths


@pytest.fixture(scope="module")
def classifier(checkpoint) -> Classifier:
    return Classifier.load(checkpoint, device="cpu", precision="fp32")


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scl_slope"])
@pytest.mark.parametrize("endian", ["<", ">"], ids=["little", "big"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_encoding_equals_monai_and_is_classified(tmp_path, classifier, dtype, endian, scaled):
    paths = write_variants(tmp_path, dtype, endian, scaled)
    raw, slope, inter = stored(dtype, scaled, hu_volume())
    # the same values, stored the plainest way: little-endian float32 NIfTI-1, no scaling
    plain = write_raw_nifti(
        tmp_path / "plain.nii", values_of(raw, slope, inter).astype(np.float32), AFFINE
    )
    fast, stock = ours(), stock_chain()
    worst = 0.0
    for path in paths:
        got = np.asarray(fast({"image": str(path)})["image"])
        want = np.asarray(stock({"image": str(path)})["image"])
        assert got.shape == want.shape == (1, *TINY_SETTINGS["spatial_size"]), path.name
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"{dtype} {endian} scaled={scaled}: max |ours - MONAI| = {worst:.2e}")
    assert worst <= TOLERANCE

    preds = list(classifier.predict_many([plain, *paths], batch_size=4))
    if dtype in NOT_HU_UNSCALED and not scaled:  # a failed row with the reason, no probability
        for pred in preds:
            assert not pred.ok and pred.prob_abnormal is None, pred.path
            assert "not CT in Hounsfield units" in str(pred.error), (pred.path, pred.error)
        return
    reference = preds[0]
    assert reference.ok, reference.error
    for pred in preds[1:]:
        assert pred.ok, f"{pred.path}: {pred.error}"
        assert abs(pred.prob_abnormal - reference.prob_abnormal) <= 1e-4, pred.path
        assert not any("Hounsfield" in w for w in pred.warnings), (pred.path, pred.warnings)


def test_app_infer_classifies_big_endian_and_unsigned_files(tmp_path, checkpoint, capsys):
    from app.infer import main

    folder = tmp_path / "scans"
    folder.mkdir()
    for dtype in ("uint8", "uint16", "int16", "float32"):
        write_variants(folder, dtype, ">", scaled=True)
    out = tmp_path / "out"
    code = main(
        [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    assert "64 classified" in capsys.readouterr().out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    dtype=st.sampled_from(DTYPES),
    endian=st.sampled_from("<>"),
    version=st.sampled_from((1, 2)),
    gz=st.booleans(),
    xform=st.sampled_from(("qform", "sform", "both")),
    slope=st.sampled_from((None, 1.0, 0.5, 2.2086, 8.0, -1.0)),
    inter=st.sampled_from((0.0, -1024.0, -1000.5, 3.25)),
    zooms=st.tuples(*[st.floats(0.3, 9.0)] * 3),
    flips=st.tuples(*[st.sampled_from((-1.0, 1.0))] * 3),
    shape=st.tuples(st.integers(8, 40), st.integers(8, 40), st.integers(2, 24)),
    seed=st.integers(0, 2**16),
)
def test_header_fields_drawn_at_random_equal_monai(
    tmp_path, dtype, endian, version, gz, xform, slope, inter, zooms, flips, shape, seed
):
    rng = np.random.default_rng(seed)
    if dtype[0] in "ui":
        info = np.iinfo(dtype)
        raw = rng.integers(max(info.min, -2000), min(info.max, 3000), size=shape).astype(dtype)
    else:
        raw = rng.uniform(-1100, 1500, size=shape).astype(dtype)
    affine = np.diag([*(f * z for f, z in zip(flips, zooms, strict=True)), 1.0])
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    path = tmp_path / f"drawn-{seed}.nii{'.gz' if gz else ''}"
    write_raw_nifti(
        path, raw, affine, version=version, endian=endian, slope=slope, inter=inter, xform=xform
    )
    size = (16, 16, 8)
    got = np.asarray(ours(size)({"image": str(path)})["image"])
    want = np.asarray(stock_chain(size)({"image": str(path)})["image"])
    assert float(np.abs(got - want).max()) <= TOLERANCE


def test_trailing_singleton_dimensions_are_one_3d_scan(tmp_path, classifier):
    """(x, y, z, 1, 1) holds one volume, as (x, y, z) does (a hostile-header run found it refused)."""
    raw, slope, inter = stored("int16", False, hu_volume())
    flat = write_raw_nifti(tmp_path / "flat.nii.gz", raw, AFFINE)
    deep = write_raw_nifti(tmp_path / "deep.nii.gz", raw[..., None, None], AFFINE)
    chain = ours()
    assert np.array_equal(
        np.asarray(chain({"image": str(deep)})["image"]),
        np.asarray(chain({"image": str(flat)})["image"]),
    )
    a, b = classifier.predict_many([flat, deep])
    assert b.ok and b.prob_abnormal == a.prob_abnormal, b.error
