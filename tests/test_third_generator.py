"""testdata/third_scans.py: the held-out generator the learning studies test on. Its figures
mean something only if its scans are what it says: LPS chests whose lungs the app finds, the
patient's back where the header says, findings inside the lungs and denser than them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from testdata import third_scans as third
from transforms.lung import lung_mask


def _write(out: Path, *extra: str) -> None:
    assert third.main([str(out), "--per-class", "1", *extra]) == 0


@pytest.mark.parametrize("strength", ["0", "1"])
def test_third_generator_writes_lps_chests_with_findings_in_the_lungs(tmp_path, strength):
    _write(tmp_path / "a", "--seed", "3", "--confounded", strength)
    normal = nib.load(tmp_path / "a" / "CT-0" / "t3_0_000.nii.gz")
    abnormal = nib.load(tmp_path / "a" / "CT-23" / "t3_1_000.nii.gz")
    mask_img = nib.load(tmp_path / "a" / "masks" / "t3_1_000.nii.gz")
    assert nib.aff2axcodes(abnormal.affine) == ("L", "P", "S")
    assert abnormal.get_data_dtype() == np.int16
    assert np.array_equal(mask_img.affine, abnormal.affine)
    assert not (tmp_path / "a" / "masks" / "t3_0_000.nii.gz").exists()
    for img in (normal, abnormal):
        ras = nib.as_closest_canonical(img)
        hu = np.asarray(ras.dataobj, np.float32)
        lungs = lung_mask(hu)
        assert 0.04 < lungs.mean() < 0.4
        # the vertebra (> 250 HU) lies behind the lungs: posterior is low y in RAS
        bone_y = np.argwhere(hu > 250)[:, 1].mean()
        lung_y = np.argwhere(lungs)[:, 1].mean()
        assert bone_y < lung_y
    hu = np.asarray(nib.as_closest_canonical(abnormal).dataobj, np.float32)
    lesion = np.asarray(nib.as_closest_canonical(mask_img).dataobj) > 0
    lungs = lung_mask(hu)
    assert lesion.sum() > 20
    assert (lesion & lungs).sum() >= 0.9 * lesion.sum()
    assert np.median(hu[lesion]) > np.median(hu[lungs & ~lesion]) + 50


def test_third_generator_is_seeded(tmp_path):
    _write(tmp_path / "a", "--seed", "5")
    _write(tmp_path / "b", "--seed", "5")
    _write(tmp_path / "c", "--seed", "6")
    a = np.asarray(nib.load(tmp_path / "a" / "CT-23" / "t5_1_000.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b" / "CT-23" / "t5_1_000.nii.gz").dataobj)
    c = np.asarray(nib.load(tmp_path / "c" / "CT-23" / "t6_1_000.nii.gz").dataobj)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_the_lung_mask_trusts_every_generators_chests(tmp_path):
    """The lung mask's doubts (the crop then keeps the whole scan) on none of the held-out
    generator's chests: its body meets the image's sides, and the air between its back and the
    table is enclosed by body and table (the table, a thin piece, encloses no lung)."""
    from transforms.lung import find_lungs

    _write(tmp_path / "a", "--seed", "5", "--per-class", "2",
           "--confounded", "1")  # fmt: skip
    for path in sorted((tmp_path / "a").glob("CT-*/*.nii.gz")):
        img = nib.as_closest_canonical(nib.load(path))
        hu = np.asarray(img.dataobj, np.float32)
        lungs = find_lungs(hu, spacing=img.header.get_zooms())
        assert lungs.doubts() == [], (path.name, lungs.doubts())
        assert not lungs.mask[:, : int(np.argwhere(hu > 250)[:, 1].min())].any()  # below the spine
