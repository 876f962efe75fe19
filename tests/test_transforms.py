from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import eval_chain, train_chain
from scipy import ndimage

from app.config import load_config
from transforms import BatchAxialRotation, RandDiscreteAxialRotated
from transforms.augment import BatchAugmentation

#: what the README quotes (4.1e-6), with a small margin
PREPROCESS_TOLERANCE = 5e-6


@pytest.fixture(scope="module")
def config():
    return load_config("inference.yaml")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("cip_ct-64_chest_LAS.nii.gz", id="LAS"),
        pytest.param("cip_ct-64_chest.nii.gz", id="LPS"),
    ],
)
def test_preprocessing_reproduces_reference(real_ct, reference_dir, config, name):
    expected = np.load(reference_dir / "reference_preprocess_cip_ct-64_chest_LAS.npz")["output"]
    out = config.get_parsed_content("preprocessing")({"image": str(real_ct / name)})["image"]
    assert tuple(out.shape) == (1, 128, 128, 64) and out.dtype == torch.float32
    worst = float(np.abs(out[0].numpy() - expected).max())
    print(f"{name}: max |ours - reference| = {worst:.2g}")
    assert worst <= PREPROCESS_TOLERANCE  # README: 4.1e-6


def write_nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_eval_chain_matches_scipy_reference_on_synthetic_volume(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1100, 600, size=(40, 40, 12)).astype(np.int16)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # LAS storage: the reference sees the array as is
    path = write_nifti(tmp_path / "v.nii.gz", vol, affine)
    ours = eval_chain(spatial_size=(48, 48, 48))({"image": path})["image"][0].numpy()
    v = np.clip(vol.astype(np.float64), -1000, 400)
    v = ((v + 1000) / 1400).astype(np.float32)
    v = ndimage.rotate(v, 90, reshape=False)
    ref = ndimage.zoom(v, (48 / 40, 48 / 40, 48 / 12), order=1)
    assert np.abs(ours - ref).max() < 1e-4


def test_reorientation_makes_orientations_agree(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(-1000, 400, size=(30, 30, 10)).astype(np.int16)
    las = write_nifti(tmp_path / "las.nii.gz", vol, np.diag([-1.0, 1.0, 1.0, 1.0]))
    # the same voxels stored RAS: x axis flipped
    ras = write_nifti(tmp_path / "ras.nii.gz", vol[::-1].copy(), np.diag([1.0, 1.0, 1.0, 1.0]))
    chain = eval_chain(spatial_size=(46, 46, 46))
    a, b = chain({"image": las})["image"], chain({"image": ras})["image"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("name", "hu_like"),
    [
        pytest.param("totalsegmentator_example_ct.nii.gz", True, id="int32-RAS"),
        pytest.param("cip_ct-64_chest.nii.gz", True, id="int16-LPS"),
        pytest.param("niivue-images_CT_AVM.nii.gz", False, id="uint8-scaled"),
    ],
)
def test_real_files_load_and_preprocess(real_ct, name, hu_like):
    raw = nib.load(str(real_ct / name)).get_fdata()
    out = eval_chain(spatial_size=(64, 64, 48))({"image": str(real_ct / name)})["image"]
    assert tuple(out.shape) == (1, 64, 64, 48)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # HU scans have air (0 after scaling); the scaled uint8 scan has no value below 0 HU
    assert bool(raw.min() < -900) is hu_like
    assert (float(out.min()) == 0.0) is hu_like


def test_random_rotation_uses_reference_angles_and_is_seeded():
    t = RandDiscreteAxialRotated("image", angles_deg=(-20, -10, -5, 5, 10, 20))
    t.set_random_state(7)
    drawn = set()
    for _ in range(60):
        t.randomize()
        drawn.add(t.angle_deg)
    assert drawn == {-20.0, -10.0, -5.0, 5.0, 10.0, 20.0}
    img = torch.zeros(1, 33, 33, 5)
    img[:, 16, 4:29, :] = 1.0  # a line along y through the centre
    a = RandDiscreteAxialRotated("image", angles_deg=(90,)).set_random_state(0)({"image": img})[
        "image"
    ]
    # a 90 degree turn maps the line along y onto x, keeps shape and range
    assert tuple(a.shape) == (1, 33, 33, 5)
    assert float(a[0, 4:29, 16, 2].mean()) > 0.9 and float(a[0, 16, 4:10, 2].max()) < 0.1
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert math.isclose(float(a.sum()), float(img.sum()), rel_tol=0.05)


def test_train_chain_is_eval_chain_plus_rotation(tmp_path):
    vol = np.random.default_rng(2).integers(-1000, 400, size=(40, 40, 10)).astype(np.int16)
    path = write_nifti(tmp_path / "v.nii.gz", vol)
    train = train_chain(spatial_size=(46, 46, 46))
    assert isinstance(train.transforms[-1], RandDiscreteAxialRotated)
    train.set_random_state(3)
    first = train({"image": path})["image"]
    train.set_random_state(3)
    again = train({"image": path})["image"]
    torch.testing.assert_close(first, again)
    plain = eval_chain(spatial_size=(46, 46, 46))({"image": path})["image"]
    assert first.shape == plain.shape and not torch.equal(torch.as_tensor(first), plain)


def test_resize_before_turn_equals_turn_before_resize(tmp_path):
    from monai.transforms import Compose, Resized, Rotate90d

    vol = np.random.default_rng(3).integers(-1000, 400, size=(50, 40, 12)).astype(np.int16)
    path = write_nifti(tmp_path / "v.nii.gz", vol, np.diag([-1.0, 1.0, 2.0, 1.0]))
    ours = eval_chain(spatial_size=(64, 48, 46))({"image": path})["image"]
    assert tuple(ours.shape) == (1, 64, 48, 46)
    loaded = eval_chain(spatial_size=(64, 48, 46)).transforms[:4]  # load .. intensity window
    turned_first = Compose(
        [
            *loaded,
            Rotate90d("image", k=1, spatial_axes=(0, 1)),
            Resized("image", (64, 48, 46), mode="trilinear", align_corners=True),
        ]
    )
    torch.testing.assert_close(
        ours, torch.as_tensor(turned_first({"image": path})["image"]).float(), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "dtype", [pytest.param(np.int16, id="int16"), pytest.param(np.float64, id="float64")]
)
def test_fused_window_equals_monai_scale_intensity_range(dtype):
    from monai.transforms import ScaleIntensityRanged

    from transforms.intensity import ClipScaleIntensityd

    img = torch.as_tensor(
        np.random.default_rng(4).integers(-3000, 3000, size=(1, 20, 20, 5)).astype(dtype)
    )
    ours = ClipScaleIntensityd("image", -1000, 400)({"image": img})["image"]
    monai = ScaleIntensityRanged("image", -1000, 400, 0.0, 1.0, clip=True)({"image": img.double()})[
        "image"
    ]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), torch.as_tensor(monai).double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_fast_reader_equals_nibabel_and_stays_bounded(tmp_path, real_ct, backend, monkeypatch):
    """Same voxels as nibabel, bounded by the header, CRC checked: with ISA-L and with the
    standard library's zlib (what runs where isal is not installed)."""
    import gzip
    import zlib

    from transforms import readers
    from transforms.readers import inflate_nifti

    if backend == "zlib":
        monkeypatch.setattr(readers, "_inflater_module", zlib)
    else:
        from isal import isal_zlib  # a dependency of the project

        assert readers._inflater_module is isal_zlib

    path = real_ct / "cip_ct-64_chest.nii.gz"
    ours = inflate_nifti(path)
    theirs = nib.load(str(path))
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    # 64 MB of zeros after the declared data: only the declared bytes are inflated
    raw = gzip.decompress(path.read_bytes())
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(gzip.compress(raw + bytes(64 * 2**20), compresslevel=1))
    np.testing.assert_array_equal(
        np.asanyarray(inflate_nifti(padded).dataobj), np.asanyarray(theirs.dataobj)
    )
    # a wrong CRC in the trailer is still caught
    bad = bytearray(path.read_bytes())
    bad[-8] ^= 0xFF
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(zlib.error):
        inflate_nifti(tmp_path / "crc.nii.gz")
    (tmp_path / "plain.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 40))
    assert inflate_nifti(tmp_path / "plain.gz") is None  # left to nibabel and its messages


@pytest.mark.parametrize("shape", [(1, 32, 32, 12), (1, 40, 28, 12)])
def test_batched_device_rotation_equals_per_scan_rotation(shape):
    """The GPU path's batched rotation gives what the data loader's per-scan rotation gives, for
    each angle of the set, on square and non-square slices."""
    rng = torch.Generator().manual_seed(0)
    img = torch.rand(shape, generator=rng)
    img[:, 5:12, 3:20, :] = 1.0
    angles = (-20, -10, -5, 5, 10, 20)
    batch = BatchAxialRotation(angles_deg=angles)
    out = batch.rotate(torch.stack([img] * len(angles)), torch.tensor(angles, dtype=torch.float64))
    for i, angle in enumerate(angles):
        ref = RandDiscreteAxialRotated("image", angles_deg=(angle,)).set_random_state(0)(
            {"image": img}
        )["image"]
        torch.testing.assert_close(out[i], torch.as_tensor(ref), rtol=0, atol=1e-5)


def test_batched_rotation_draws_the_set_and_reseeds():
    rotate = BatchAxialRotation(angles_deg=(-20, 5, 10), seed=1)
    drawn = rotate.draw(300)
    assert set(drawn.tolist()) == {-20.0, 5.0, 10.0}
    rotate.set_random_state(seed=4)
    first = rotate.draw(8)
    rotate.set_random_state(seed=4)
    torch.testing.assert_close(rotate.draw(8), first)
    some = BatchAxialRotation(angles_deg=(10,), prob=0.5, seed=0).draw(400)
    assert 120 < int((some == 0).sum()) < 280 and set(some.tolist()) == {0.0, 10.0}
    x = torch.rand(2, 1, 20, 20, 8)
    out = rotate(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="batch, channel"):
        rotate(torch.rand(1, 20, 20, 8))


@pytest.mark.parametrize(
    "name",
    [
        "cip_ct-64_chest.nii.gz",
        "cip_ct-64_chest_LAS.nii.gz",
        "niivue-images_CT_AVM.nii.gz",
        "totalsegmentator_example_ct_sm.nii.gz",
        "bkoz-3d-image-classification_mosmed_preproc_volume0.nii.gz",
    ],
)
def test_reversed_axes_reader_gives_the_same_oriented_volume(real_ct, name, tmp_path):
    """Reading the voxels as (z, y, x) with a permuted affine (no transposing copy) and
    reorienting gives exactly the volume and affine MONAI's own NibabelReader gives, for real
    files in several orientations, gzipped or not."""
    import gzip

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    from transforms.readers import FastNiftiReader

    path = real_ct / name
    plain = tmp_path / name.removesuffix(".gz")
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    for source in (path, plain):
        results = []
        for reader in (FastNiftiReader(reverse_axes=True), "NibabelReader"):
            chain = Compose(
                [
                    LoadImaged("image", reader=reader, image_only=True, dtype=None),
                    EnsureChannelFirstd("image"),
                    Orientationd("image", axcodes="LAS", labels=None),
                ]
            )
            results.append(chain({"image": str(source)})["image"])
        ours, monai = results
        assert ours.shape == monai.shape and ours.dtype == monai.dtype
        torch.testing.assert_close(ours.as_tensor(), monai.as_tensor(), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(monai.affine), atol=1e-6)


def _devices_mode():
    """A dispatch mode that records ``op:device`` of every tensor each ATen op sees."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for a in [*args, *(kwargs or {}).values()]:
                if isinstance(a, torch.Tensor):
                    self.seen.add(f"{func.__name__}:{a.device.type}")
            return func(*args, **(kwargs or {}))

    return Devices()


def test_batched_rotation_builds_its_affine_where_the_batch_is():
    """On a GPU the rotation must not build its matrices on the host and copy them over (a
    synchronisation per step): run on the `meta` device, no ATen op sees a CPU tensor."""
    rotate = BatchAxialRotation(angles_deg=(-20, 5, 10), seed=1)
    images = torch.empty(2, 1, 20, 24, 8, device="meta")
    angles = torch.empty(2, dtype=torch.float64, device="meta")
    with _devices_mode() as mode:
        out = rotate.rotate(images, angles)
    assert out.shape == images.shape and out.device.type == "meta"
    assert mode.seen and not [s for s in mode.seen if s.endswith(":cpu")], mode.seen


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.13])
@pytest.mark.parametrize("shape", [(20, 24, 8), (17, 17, 17)])
def test_batch_zoom_equals_scipy_affine_transform(factor, shape):
    """The zoom against scipy: voxel i samples c + (i - c) / f, trilinear, zeros outside."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape)
    ours = BatchAugmentation.zoom(
        torch.from_numpy(volume)[None, None], torch.tensor([factor], dtype=torch.float64)
    )[0, 0].numpy()
    centre = (np.array(shape) - 1) / 2
    expected = ndimage.affine_transform(
        volume, np.full(3, 1 / factor), offset=centre - centre / factor, order=1,
        mode="grid-constant", cval=0.0,
    )  # fmt: skip
    np.testing.assert_allclose(ours, expected, atol=1e-9)


def test_batch_augmentation_steps_do_what_they_say():
    x = torch.rand(6, 1, 12, 10, 8, dtype=torch.float64) * 0.5 + 0.25
    assert BatchAugmentation()(x) is x  # all off: untouched
    torch.testing.assert_close(BatchAugmentation(flip_prob=1.0)(x), x.flip(3), rtol=0, atol=0)
    half = BatchAugmentation(flip_prob=0.5, seed=0)(x)
    flipped = [bool(torch.equal(h, v.flip(2))) for h, v in zip(half, x, strict=True)]
    assert all(f or torch.equal(h, v) for f, h, v in zip(flipped, half, x, strict=True))
    shifted = BatchAugmentation(intensity_shift=0.05, clip_range=None, seed=1)(x) - x
    per_scan = shifted.flatten(1)
    assert torch.allclose(per_scan, per_scan[:, :1].expand_as(per_scan))  # one shift per scan
    assert per_scan.abs().max() <= 0.05 and per_scan[:, 0].std() > 0
    contrast = BatchAugmentation(contrast=0.2, clip_range=None, seed=2)(x)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(contrast.mean(dim=(1, 2, 3, 4), keepdim=True), mean)
    factor = ((contrast - mean) / (x - mean)).flatten(1)
    assert torch.allclose(factor, factor[:, :1].expand_as(factor), atol=1e-6)
    assert ((factor[:, 0] - 1).abs() <= 0.2).all()
    clipped = BatchAugmentation(contrast=1.0, intensity_shift=1.0, seed=3)(x)
    assert clipped.min() >= 0 and clipped.max() <= 1


@pytest.mark.parametrize("shape", [(2, 1, 12, 10, 6), (1, 2, 7, 9, 1), (3, 1, 4, 4, 3)])
def test_in_plane_blur_equals_scipy(shape):
    """Differential: the kernel augmentation's blur against scipy's Gaussian (one voxel in x
    and y, none across slices, edges repeated), on sizes down to fewer voxels than taps."""
    volume = np.random.default_rng(0).random(shape)
    ours = BatchAugmentation.in_plane_blur(torch.from_numpy(volume)).numpy()
    expected = np.stack([
        [ndimage.gaussian_filter(v, (1, 1, 0), mode="nearest", truncate=3.0) for v in scan]
        for scan in volume
    ])  # fmt: skip
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_kernel_augmentation_sharpens_and_blurs_by_its_drawn_amount():
    x = torch.rand(8, 1, 16, 16, 6, dtype=torch.float64) * 0.5 + 0.25
    augment = BatchAugmentation(kernel=1.0, clip_range=None, seed=4)
    params = augment.draw(8)
    amounts = params["kernel"]
    assert set(params) == {"kernel"} and amounts.abs().max() <= 1.0
    assert (amounts > 0).any() and (amounts < 0).any()  # both ways
    out = augment.apply(x, params)
    detail = x - BatchAugmentation.in_plane_blur(x)
    torch.testing.assert_close(out, x + amounts.view(-1, 1, 1, 1, 1) * detail)
    energy = lambda v: (v - BatchAugmentation.in_plane_blur(v)).square().sum(dim=(1, 2, 3, 4))  # noqa: E731
    sharper = energy(out) > energy(x)
    assert torch.equal(sharper, amounts > 0)  # sharpened scans gain fine detail, blurred lose it
    assert torch.equal(out[:, :, :, :, 0], augment.apply(x[..., :1], params)[..., 0])  # per slice


def test_batch_augmentation_is_seeded_and_reseeds():
    x = torch.rand(4, 1, 16, 16, 8)
    make = lambda: BatchAugmentation(flip_prob=0.5, scale=0.1, contrast=0.2, seed=7)  # noqa: E731
    a, b = make(), make()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    first = a(x)
    a.set_random_state(seed=7)
    b.set_random_state(seed=8)
    torch.testing.assert_close(a(x), make()(x), rtol=0, atol=0)
    assert not torch.equal(b(x), first)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip_prob": 1.5},
        {"scale": -0.1},
        {"scale": 0.9},
        {"contrast": 2},
        {"intensity_shift": -1},
        {"kernel": -0.5},
        {"kernel": 3.0},
    ],  # fmt: skip
)
def test_batch_augmentation_refuses_values_out_of_range(kwargs):
    with pytest.raises(ValueError, match="must be in"):
        BatchAugmentation(**kwargs)


def test_batch_augmentation_draws_and_builds_where_the_batch_is():
    """As the rotation: on the `meta` device no ATen op sees a CPU tensor (on a GPU each would
    be a copy and a synchronisation per step)."""
    augment = BatchAugmentation(
        flip_prob=0.5, scale=0.1, contrast=0.2, intensity_shift=0.05, kernel=0.5
    )
    images = torch.empty(2, 1, 20, 24, 8, device="meta")
    params = {k: torch.empty_like(v, device="meta") for k, v in augment.draw(2).items()}
    assert set(params) == {"flip", "zoom", "kernel", "contrast", "shift"}
    with _devices_mode() as mode:
        out = augment.apply(images, params)
    assert out.shape == images.shape and out.device.type == "meta"
    assert mode.seen and not [s for s in mode.seen if s.endswith(":cpu")], mode.seen


def test_lung_mask_finds_the_generators_lungs_and_the_box_keeps_them():
    """Against the generator's own lung masks (16 scans, two sizes, both classes, lungs with
    dense findings among them): the box always holds >= 99% of the lung voxels and at most
    half of the scan; the mask overlaps the lungs (Dice >= 0.7)."""
    from app.data.synth import generate_scan
    from transforms.lung import lung_box, lung_mask

    for shape in ((128, 128, 40), (96, 96, 32)):
        for seed in range(4):
            for label in (0, 1):
                scan = generate_scan(label, seed, shape=shape, difficulty=0.3)
                truth, mask = scan.lung_mask, lung_mask(scan.volume)
                assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) >= 0.7
                start, end = lung_box(scan.volume)
                box = tuple(slice(a, b) for a, b in zip(start, end, strict=True))
                assert truth[box].sum() >= 0.99 * truth.sum()
                assert np.prod(np.subtract(end, start)) <= 0.5 * np.prod(shape)


def test_crop_to_lungs_keeps_world_coordinates_and_leaves_a_scan_without_lungs_whole():
    from monai.data import MetaTensor

    from app.data.synth import generate_scan
    from transforms.lung import CropToLungsd, lung_box

    scan = generate_scan(1, 3, shape=(96, 96, 32))
    image = MetaTensor(torch.as_tensor(scan.volume)[None], affine=torch.as_tensor(scan.affine))
    out = CropToLungsd("image")({"image": image})["image"]
    start, end = lung_box(scan.volume)
    assert tuple(out.shape[1:]) == tuple(np.subtract(end, start))
    np.testing.assert_allclose(  # the cropped first voxel is where it was in the world
        np.asarray(out.affine) @ [0, 0, 0, 1], scan.affine @ [*start, 1], atol=1e-4
    )
    assert torch.equal(out[0], image[0, start[0] : end[0], start[1] : end[1], start[2] : end[2]])
    head = np.full((64, 64, 20), -1000.0, np.float32)
    head[16:48, 16:48] = 40.0  # soft tissue in air: no lung
    whole = MetaTensor(torch.as_tensor(head)[None])
    assert torch.equal(CropToLungsd("image")({"image": whole})["image"], whole)


def test_lung_crop_preprocessing_gives_the_network_size(tmp_path):
    """preprocessing with lung_crop: the same output size, more of it lung."""
    from conftest import nifti

    from app.data.synth import generate_scan

    scan = generate_scan(1, 1, shape=(96, 96, 32))
    path = nifti(tmp_path / "s.nii.gz", scan.volume.astype(np.int16), scan.affine)
    plain, cropped = (
        eval_chain(spatial_size=[48, 48, 24]),
        eval_chain(spatial_size=[48, 48, 24], lung_crop=True),
    )
    a, b = plain({"image": str(path)})["image"], cropped({"image": str(path)})["image"]
    assert a.shape == b.shape == (1, 48, 48, 24)
    lung_level = 0.15  # -850 HU in the [-1000, 400] window, about 0.11
    assert (b < lung_level).float().mean() < (a < lung_level).float().mean()  # less outside air


def test_the_left_right_flip_mirrors_the_patient(tmp_path):
    """Against the preprocessing of the mirrored scan: flipping a preprocessed batch along
    LEFT_RIGHT_DIM equals preprocessing the scan with its stored x (R->L) axis reversed; the
    axis it flipped before (2) is the anterior-posterior one."""
    from conftest import nifti

    from transforms.augment import LEFT_RIGHT_DIM

    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 300, size=(40, 40, 12)).astype(np.int16)
    volume[2:8, 15:20, :] = 400  # a block on the patient's right (LAS: x toward left)
    chain = eval_chain(spatial_size=[40, 40, 12])
    plain = chain({"image": str(nifti(tmp_path / "a.nii.gz", volume))})["image"][None]
    mirror = chain({"image": str(nifti(tmp_path / "b.nii.gz", volume[::-1].copy()))})["image"][None]
    torch.testing.assert_close(BatchAugmentation(flip_prob=1.0)(plain), mirror)
    torch.testing.assert_close(plain.flip(LEFT_RIGHT_DIM), mirror)
    assert not torch.allclose(plain.flip(2), mirror)


def test_lung_only_blanks_what_is_outside_the_lungs_and_keeps_the_findings():
    """Against the generator's own masks (12 abnormal scans, with and without confounders): the
    voxels lung_only keeps hold >= 95% of every scan's lesion voxels and >= 90% of its lung, and
    it blanks most of the rest; tensors and arrays alike; a scan without lungs is left as is."""
    from monai.data import MetaTensor

    from app.data.synth import generate_scan
    from transforms.lung import CropToLungsd, lung_mask, outside_lungs

    for seed in range(6):
        for confounders in (0.0, 1.0):
            scan = generate_scan(1, seed, shape=(96, 96, 32), difficulty=0.7,
                                 confounders=confounders)  # fmt: skip
            volume = scan.volume.astype(np.float32)
            kept = ~outside_lungs(lung_mask(volume), volume)
            assert (kept & scan.lesion_mask).sum() >= 0.95 * scan.lesion_mask.sum()
            assert (kept & scan.lung_mask).sum() >= 0.9 * scan.lung_mask.sum()
            assert (kept & ~scan.lung_mask).sum() < 0.5 * (~scan.lung_mask).sum()
    image = MetaTensor(torch.as_tensor(scan.volume)[None], affine=torch.as_tensor(scan.affine))
    out = CropToLungsd("image", crop=False, outside=-1000.0)({"image": image})["image"]
    assert out.shape == image.shape and out.dtype == image.dtype
    spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)  # the mask CropToLungsd makes
    blank = torch.as_tensor(outside_lungs(lung_mask(scan.volume, spacing=spacing), scan.volume))
    assert bool((out[0][blank] == -1000).all()) and torch.equal(out[0][~blank], image[0][~blank])
    assert int((image[0][blank] != -1000).sum()) > 0  # the input itself is left untouched
    # a plain array has no spacing: its mask takes a 350-mm field of view (find_lungs)
    as_array = CropToLungsd("image", crop=False, outside=-1000.0)({"image": np.asarray(image)})
    unknown = outside_lungs(lung_mask(scan.volume), scan.volume)
    assert bool((as_array["image"][0][unknown] == -1000).all())
    np.testing.assert_array_equal(as_array["image"][0][~unknown], scan.volume[~unknown])
    head = np.full((1, 64, 64, 20), -1000.0, np.float32)
    head[0, 16:48, 16:48] = 40.0
    same = CropToLungsd("image", outside=-1000.0)({"image": head})["image"]
    np.testing.assert_array_equal(same, head)


def test_lung_only_preprocessing_shows_the_network_lungs_only(tmp_path):
    from conftest import nifti

    from app.data.synth import generate_scan

    scan = generate_scan(1, 1, shape=(96, 96, 32))
    path = nifti(tmp_path / "s.nii.gz", scan.volume.astype(np.int16), scan.affine)
    crop = eval_chain(spatial_size=[48, 48, 24], lung_crop=True)({"image": str(path)})["image"]
    only = eval_chain(spatial_size=[48, 48, 24], lung_crop=True, lung_only=True)(
        {"image": str(path)}
    )["image"]
    assert only.shape == crop.shape
    tissue = 0.5  # above -300 HU: chest wall, mediastinum, bone
    assert (only > tissue).float().mean() < 0.4 * (crop > tissue).float().mean()


def _chest(shape, gradient_hu=0.0, shift_hu=0.0, blobs=()):
    """An HU phantom: air around a soft-tissue body holding two ellipsoidal lungs at -850 HU,
    denser toward the back by up to ``gradient_hu`` (gravity) and by ``shift_hu`` everywhere
    (expiration), with +200 HU balls of radius 2 voxels at ``blobs``; returns it and its lungs."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    nx, ny, nz = shape
    volume = np.full(shape, -1000.0, np.float32)
    body = ((x - nx / 2) / (0.45 * nx)) ** 2 + ((y - ny / 2) / (0.4 * ny)) ** 2 < 1
    volume[body] = 40.0
    lungs = np.zeros(shape, bool)
    for cx in (0.3 * nx, 0.7 * nx):
        lungs |= (((x - cx) / (0.15 * nx)) ** 2 + ((y - ny / 2) / (0.3 * ny)) ** 2
                  + ((z - nz / 2) / (0.45 * nz)) ** 2) < 1  # fmt: skip
    volume[lungs] = -850.0 + shift_hu + gradient_hu * (y[lungs] / ny)
    for bx, by, bz in blobs:
        ball = (x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2 <= 4
        volume[ball & lungs] += 200.0
    return volume, lungs


def _exact_flatten(volume, mask, spacing, sigma_mm):
    """The flattening written plainly (full resolution, no coarse grid): the reference."""
    from transforms.lung import FLATTEN_ABOVE_HU, FLATTEN_LEVEL_HU

    sigma = [sigma_mm / s for s in spacing]

    def background(keep):
        values = ndimage.gaussian_filter(np.where(keep, volume, 0).astype(np.float32), sigma)
        return values / np.maximum(ndimage.gaussian_filter(keep.astype(np.float32), sigma), 1e-3)

    second = background(mask & (volume < background(mask) + FLATTEN_ABOVE_HU))
    out = volume.astype(np.float32).copy()
    out[mask] = volume[mask] - second[mask] + FLATTEN_LEVEL_HU
    return out


@pytest.mark.parametrize(
    "spacing", [(4.0, 4.0, 8.0), (2.5, 2.5, 6.0), (1.5, 1.5, 5.0), (1.2, 0.8, 5.0)]
)
def test_lung_flattening_equals_the_full_resolution_convolution(spacing):
    """Against the plain full-resolution normalised convolution, on a chest of 240 x 200 x 220
    mm at four spacings: the coarse grid the background is estimated on (2 to 6 voxels a cell
    where voxels are under 5 mm) moves no lung voxel by more than 1 HU (0.12 HU seen); on the
    voxel grid itself, the same numbers; axis flips commute."""
    from transforms.lung import flatten_lungs

    shape = tuple(round(mm / s) for mm, s in zip((240, 200, 220), spacing, strict=True))
    finding = (int(0.3 * shape[0]), shape[1] // 2, shape[2] // 2)
    volume, lungs = _chest(shape, gradient_hu=250, shift_hu=100, blobs=[finding])
    volume += np.random.default_rng(0).normal(0, 20, volume.shape).astype(np.float32)
    ours = flatten_lungs(volume, lungs, spacing, 20.0)
    exact = _exact_flatten(volume, lungs, spacing, 20.0)
    np.testing.assert_array_equal(ours[~lungs], volume[~lungs])
    tolerance = 1.0 if min(spacing) < 5.0 else 1e-2
    assert float(np.abs(ours - exact)[lungs].max()) <= tolerance
    flipped = flatten_lungs(
        volume[::-1, :, ::-1].copy(), lungs[::-1, :, ::-1].copy(), spacing, 20.0
    )
    np.testing.assert_allclose(flipped[::-1, :, ::-1], ours, atol=tolerance)


def test_lung_flattening_removes_dependent_density_and_expiration_and_keeps_findings():
    """On a phantom with a 250-HU gravity gradient and 100 HU of expiration: after flattening,
    the lung away from the finding varies by under 40% of what it did (edges keep some), sits at the flattened level,
    and differs from the flattened phantom without the gradient and the expiration by a tenth of
    what the two differed by (median; the largest difference by 15%, at the lung's edges);
    the finding keeps >= 80% of its +200 HU over its surroundings."""
    from transforms.lung import FLATTEN_LEVEL_HU, flatten_lungs

    spacing = (3.0, 3.0, 6.0)
    blob = (19, 28, 10)
    plain, lungs = _chest((64, 56, 20), blobs=[blob])
    dense, _ = _chest((64, 56, 20), gradient_hu=250, shift_hu=100, blobs=[blob])
    x, y, z = np.meshgrid(*(np.arange(n) for n in plain.shape), indexing="ij")
    near = (x - blob[0]) ** 2 + (y - blob[1]) ** 2 + (z - blob[2]) ** 2 <= 25
    background = lungs & ~near
    flat_dense = flatten_lungs(dense, lungs, spacing, 20.0)
    flat_plain = flatten_lungs(plain, lungs, spacing, 20.0)
    assert flat_dense[background].std() < 0.4 * dense[background].std()
    assert abs(float(np.median(flat_dense[background])) - FLATTEN_LEVEL_HU) < 10
    before, after = np.abs(dense - plain)[lungs], np.abs(flat_dense - flat_plain)[lungs]
    assert np.median(after) < 0.1 * np.median(before) and after.max() < 0.15 * before.max()
    ring = lungs & near & ((x - blob[0]) ** 2 + (y - blob[1]) ** 2 + (z - blob[2]) ** 2 > 9)
    assert flat_dense[blob] - np.median(flat_dense[ring]) >= 0.8 * 200


def test_crop_to_lungs_flattens_on_the_affines_spacing_and_refuses_what_it_cannot_use():
    """CropToLungsd(flatten_mm=...): the flattening of the cropped scan with its lung mask and
    the spacing its affine says (a float32 MetaTensor on the same grid); a scan without lungs
    left whole; an array without an affine and a bad sigma refused."""
    from monai.data import MetaTensor

    from app.data.synth import generate_scan
    from transforms.lung import CropToLungsd, flatten_lungs, lung_box, lung_mask

    scan = generate_scan(1, 2, shape=(96, 96, 32), difficulty=0.7, confounders=1.0)
    affine = np.diag([-2.0, 3.0, 7.0, 1.0])
    image = MetaTensor(torch.as_tensor(scan.volume)[None], affine=torch.as_tensor(affine))
    out = CropToLungsd("image", flatten_mm=20.0)({"image": image})["image"]
    mask = lung_mask(scan.volume, spacing=(2.0, 3.0, 7.0))  # the affine's spacing
    start, end = lung_box(scan.volume, mask=mask)
    box = tuple(slice(a, b) for a, b in zip(start, end, strict=True))
    cropped = scan.volume[box].astype(np.float32)
    expected = flatten_lungs(cropped, mask[box], (2.0, 3.0, 7.0), 20.0)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(out[0]), expected, atol=1e-3)
    plain = CropToLungsd("image")({"image": image})["image"]
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(plain.affine))
    assert not np.allclose(np.asarray(out[0]), cropped)  # it did flatten
    head = np.full((64, 64, 20), -1000.0, np.float32)
    head[16:48, 16:48] = 40.0
    whole = MetaTensor(torch.as_tensor(head)[None])
    assert torch.equal(CropToLungsd("image", flatten_mm=20.0)({"image": whole})["image"], whole)
    with pytest.raises(TypeError, match="spacing"):
        CropToLungsd("image", flatten_mm=20.0)({"image": np.asarray(image)})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="flatten_mm"):
            CropToLungsd("image", flatten_mm=bad)
    # a header claiming micrometre voxels: one background cell per axis, not a padded giant
    tiny = MetaTensor(torch.as_tensor(scan.volume)[None], affine=torch.eye(4) * 1e-4)
    out = CropToLungsd("image", flatten_mm=20.0)({"image": tiny})["image"]
    assert out.shape[1:] == tuple(np.subtract(end, start)) and bool(torch.isfinite(out).all())


def test_lung_flattening_preprocessing_sees_through_expiration(tmp_path):
    """The preprocessing with lung_flatten_mm: a scan and the same scan 120 HU denser in its
    lungs (expiration) reach the network nearly alike (the lung voxels' mean difference under
    a fifth of what it is without flattening)."""
    from conftest import nifti

    from app.data.synth import generate_scan
    from transforms.lung import lung_mask

    scan = generate_scan(1, 4, shape=(96, 96, 32), difficulty=0.7)
    denser = scan.volume.astype(np.float32)
    denser[lung_mask(denser)] += 120
    paths = [
        nifti(tmp_path / "a.nii.gz", scan.volume.astype(np.int16), scan.affine),
        nifti(tmp_path / "b.nii.gz", denser.astype(np.int16), scan.affine),
    ]
    gaps = {}
    for flatten in (0.0, 20.0):
        chain = eval_chain(spatial_size=[48, 48, 24], lung_crop=True, lung_flatten_mm=flatten)
        a, b = (chain({"image": str(p)})["image"] for p in paths)
        assert a.shape == (1, 48, 48, 24)
        lung = a < 0.3  # below about -580 HU: the lungs in the window
        gaps[flatten] = float((b - a)[lung].abs().mean())
    assert gaps[20.0] < 0.2 * gaps[0.0], gaps


@pytest.mark.parametrize("bad", [1e-9, 1e-7, 0.0, float("nan"), float("inf"), 1e9])
# MONAI's reorientation multiplies the infinite affine (inverse.py): understood, it is the input
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_flattening_work_is_bounded_whatever_the_header_says(bad):
    """A header's spacing sets neither time nor memory (issue 31: 1e-7 mm slices ran past 600 s,
    1e-9 mm needed a 30 GiB kernel): a spacing no CT has is replaced by the one the lung mask
    uses (plausible_spacing), on every axis and in CropToLungsd, and flatten_lungs called with
    it directly gives what it gives with that spacing."""
    import tracemalloc

    from monai.data import MetaTensor

    from transforms.lung import CropToLungsd, find_lungs, flatten_lungs, plausible_spacing

    volume, lungs = _chest((64, 56, 20), gradient_hu=250, blobs=[(19, 28, 10)])
    fallback = plausible_spacing(None, volume.shape)
    assert plausible_spacing((1.0, 1.0, bad), volume.shape) == fallback
    for spacing in [(1.0, 1.0, bad), (bad, bad, bad), (bad, 1.0, 3.0)]:
        tracemalloc.start()
        out = flatten_lungs(volume, lungs, spacing, 20.0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 50 * volume.nbytes  # the volume's size bounds it, not the header
        np.testing.assert_array_equal(out, flatten_lungs(volume, lungs, fallback, 20.0))
    affine = torch.diag(torch.tensor([1.0, 1.0, bad, 1.0]))
    image = MetaTensor(torch.as_tensor(volume)[None], affine=affine)
    out = CropToLungsd("image", flatten_mm=20.0)({"image": image})["image"]
    assert bool(torch.isfinite(out).all())
    assert find_lungs(volume, spacing=(1.0, 1.0, bad)).spacing == fallback


def test_the_flattening_kernel_is_clamped_to_its_axis():
    """A plausible spacing with a sigma far wider than the scan: the background is each axis'
    mean (what the Gaussian tends to), computed with a kernel no wider than the volume (an
    unclamped one of this sigma holds millions of taps)."""
    import tracemalloc

    from transforms.lung import _background

    rng = np.random.default_rng(0)
    volume = rng.normal(-800, 30, (6, 5, 40)).astype(np.float32)
    keep = np.ones(volume.shape, bool)
    tracemalloc.start()
    background = _background(volume, keep, 2e5, (0.05, 0.05, 5.0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(background, volume.mean(), atol=0.5)
    assert peak < 1 << 20
