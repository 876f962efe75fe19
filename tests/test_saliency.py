"""Saliency on the input scan's own grid (NIfTI), and the pointing game against known lesions."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import eval_chain

from app.data.synth import generate_scan, save_scan
from app.inference.saliency import pointing_game, summarise_pointing, to_input_grid


def _stored(scan, path, axcodes):
    """The generated scan stored in another orientation (same world positions)."""
    img = nib.Nifti1Image(scan.volume, scan.affine)
    if axcodes != "LAS":
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        img = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes)))
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("axcodes", ["LAS", "RAS", "PIR"])
@pytest.mark.parametrize("lung_crop", [False, True])
def test_a_map_of_the_network_input_lands_on_the_scans_own_voxels(tmp_path, axcodes, lung_crop):
    """The preprocessed image itself, carried back to the input grid, is the input's windowed
    intensity again (inside the crop): orientation, turn, resize and crop are undone."""
    scan = generate_scan(1, 4, shape=(80, 72, 24))
    path = _stored(scan, tmp_path / "s.nii.gz", axcodes)
    chain = eval_chain(spatial_size=[64, 64, 24], lung_crop=lung_crop)
    network_input = chain({"image": str(path)})["image"][0].numpy()
    back, affine = to_input_grid(network_input, path, "LAS", lung_crop=lung_crop)
    stored = nib.load(str(path))
    np.testing.assert_allclose(affine, stored.affine)
    assert back.shape == stored.shape
    expected = np.clip((np.asarray(stored.dataobj, np.float32) + 1000) / 1400, 0, 1)
    inside = back > 0
    assert inside.mean() > (0.2 if lung_crop else 0.99)
    correlation = np.corrcoef(back[inside], expected[inside])[0, 1]
    assert correlation > 0.9


def test_pointing_game_counts_hits_lung_share_and_chance():
    lungs = np.zeros((20, 20, 10), bool)
    lungs[2:18, 2:18, :] = True
    lesions = np.zeros_like(lungs)
    lesions[5:7, 5:7, 4:6] = True
    saliency = np.zeros(lungs.shape)
    saliency[6, 7, 5] = 1.0  # one voxel off the lesion: inside the 2-voxel tolerance
    hit = pointing_game(saliency, lesions, lungs)
    assert hit["hit"] and hit["in_lungs"] == 1.0
    assert 0 < hit["chance"] < 0.1
    saliency = np.zeros(lungs.shape)
    saliency[15, 15, 2] = 1.0
    saliency[0, 0, 0] = 1.0  # half the mass outside the lungs
    miss = pointing_game(saliency, lesions, lungs)
    assert not miss["hit"] and miss["in_lungs"] == 0.5
    summary = summarise_pointing([hit, miss])
    assert summary["hit_rate"] == 0.5 and summary["scans"] == 2


def test_generated_lesion_masks_mark_the_findings_and_change_no_scan(tmp_path):
    abnormal = generate_scan(1, 9, shape=(64, 64, 20))
    normal = generate_scan(0, 9, shape=(64, 64, 20))
    assert abnormal.lesion_mask.any() and not normal.lesion_mask.any()
    assert (abnormal.lesion_mask & ~abnormal.lung_mask).sum() == 0  # findings are in the lungs
    inside = abnormal.volume[abnormal.lesion_mask].mean()
    lung = abnormal.volume[abnormal.lung_mask & ~abnormal.lesion_mask].mean()
    assert inside > lung + 100  # denser than the lung around them
    save_scan(abnormal, tmp_path / "a.nii.gz")
    again = generate_scan(1, 9, shape=(64, 64, 20))
    assert np.array_equal(again.volume, abnormal.volume)


def test_app_infer_writes_saliency_nifti_on_the_input_grid_and_pointing_game(tmp_path, checkpoint):
    """--saliency: saliency/NAME.nii.gz shares the input's affine and shape, and equals (carried
    to the network's grid) the montage's overlay; the pointing game runs on the generator's
    lesion masks (a tiny set: the figure itself is studies/log.md's)."""
    from app.data.cli import main as data_main
    from app.infer import main as infer_main
    from app.inference.classifier import Classifier

    data = tmp_path / "d"
    assert data_main(["synth", str(data), "--per-class", "2", "--shape", "64", "64", "24",
                      "--seed", "3", "--masks", "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "out"
    assert infer_main([str(data / "CT-23"), "--checkpoint", str(checkpoint), "--output", str(out),
                       "--saliency", "--no-progress", "--precision", "fp32"]) == 0  # fmt: skip
    maps = sorted((out / "saliency").glob("*.nii.gz"))
    assert len(maps) == 2 and len(list((out / "saliency").glob("*.png"))) == 2
    clf = Classifier.load(checkpoint, device="cpu", precision="fp32")
    results = []
    for scan_path in sorted((data / "CT-23").glob("*.nii.gz")):
        written = next(m for m in maps if m.name.startswith(scan_path.name.split(".")[0]))
        saliency, scan = nib.load(str(written)), nib.load(str(scan_path))
        np.testing.assert_allclose(saliency.affine, scan.affine, atol=1e-5)
        assert saliency.shape == scan.shape
        pred = next(clf.predict_many([str(scan_path)], keep_images=True))
        overlay = clf.saliency(pred.image) * pred.prob_abnormal
        expected, _ = to_input_grid(overlay, scan_path, "LAS")
        np.testing.assert_allclose(np.asarray(saliency.dataobj), expected, atol=1e-5)
        lesions = np.asarray(nib.load(str(data / "masks" / scan_path.name)).dataobj) > 0
        lungs = generate_scan(1, 0, shape=(64, 64, 24)).lung_mask  # shape only
        results.append(pointing_game(np.asarray(saliency.dataobj), lesions, lungs | lesions))
    summary = summarise_pointing(results)
    assert summary["scans"] == 2 and 0 <= summary["hit_rate"] <= 1 and 0 < summary["chance"] < 1


def test_the_shipped_network_points_at_the_generated_lesions(tmp_path):
    """The default saliency (smoothed input gradient) of the packaged pretrained network, carried
    to each scan's grid: its maximum lies in a lesion (dilated 2 voxels) on most of 6 generated
    abnormal scans, far above chance; Grad-CAM of the last block, coarse, does worse."""
    from app.inference.classifier import Classifier
    from app.training.pretrained import packaged_weights
    from transforms.lung import lung_mask

    clf = Classifier.load(packaged_weights()[0], device="cpu", precision="fp32")
    s = clf.settings
    chain = eval_chain(spatial_size=s["spatial_size"], lung_crop=s["lung_crop"])
    results: dict[str, list] = {"gradient": [], "gradcam": []}
    for seed in range(6):
        scan = generate_scan(1, 100 + seed, shape=(96, 96, 32), difficulty=0.7)
        path = tmp_path / f"s{seed}.nii.gz"
        save_scan(scan, path)
        image = chain({"image": str(path)})["image"]
        lungs = lung_mask(scan.volume.astype(np.float32)) | scan.lesion_mask
        for method in results:
            back, _ = to_input_grid(clf.saliency(image, method=method), path, "LAS", True)
            results[method].append(pointing_game(back, scan.lesion_mask, lungs))
    gradient, gradcam = (summarise_pointing(results[m]) for m in ("gradient", "gradcam"))
    print(gradient, gradcam)
    assert gradient["hit_rate"] >= 4 / 6 and gradient["hit_rate"] > 2 * gradient["chance"]
    assert gradient["in_lungs"] > 0.5 and gradient["hit_rate"] > gradcam["hit_rate"]
