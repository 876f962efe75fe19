"""A single model's temperature and threshold, chosen on its validation split and recorded in its
checkpoint (issue 30: "a single model's operating point is chosen on nothing")."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import ct_volume, nifti

from app.training.operating_point import MIN_PER_CLASS, choose, record_operating_point


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_choose_takes_youdens_j_and_fits_a_temperature():
    """Overconfident scores (logits about 3.6x too large): the threshold (on the scaled scale)
    maps back to a cut that reaches the best Youden's J scikit-learn's ROC curve finds, the
    temperature is > 2, and sensitivity and specificity are those of that cut with Wilson
    intervals."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    raw_logits = 8 * (rng.normal(-1.2, 1.0, 80) + 2.2 * labels)
    probs = 1 / (1 + np.exp(-raw_logits))
    point = choose(probs, labels)
    assert point["chosen"] and point["temperature"] > 2.0  # 8 / 2.2 = 3.6 when calibrated
    cut = _logit(point["threshold"]) * point["temperature"]
    called = raw_logits >= cut
    sens, spec = called[labels == 1].mean(), (~called)[labels == 0].mean()
    fpr, tpr, _ = roc_curve(labels, raw_logits, drop_intermediate=False)
    assert sens + spec - 1 == pytest.approx(max(tpr - fpr), abs=1e-9)
    assert point["sensitivity"][0] == pytest.approx(sens)
    assert point["specificity"][0] == pytest.approx(spec)
    assert point["sensitivity"][1] < point["sensitivity"][0] <= point["sensitivity"][2]
    assert point["scans"] == 80 and point["normal"] == point["abnormal"] == 40


def test_a_perfectly_separated_split_keeps_a_threshold_that_labels_its_scans():
    """A validation split the model separates perfectly (what tests/test_readme.py's run met):
    the fitted temperature would fall to its bound (0.05) and the threshold, rounded to 4
    decimals, to 0: every scan called abnormal. Now the threshold labels those scans as the cut
    does, and no temperature below 1 is taken."""
    labels = np.repeat([0, 1], 12)
    raw_logits = np.r_[np.linspace(-16, -3, 12), np.linspace(2, 9, 12)]
    point = choose(1 / (1 + np.exp(-raw_logits)), labels)
    assert point["chosen"] and point["temperature"] >= 1.0 and 0 < point["threshold"] < 1
    scaled = 1 / (1 + np.exp(-raw_logits / point["temperature"]))
    assert ((scaled >= point["threshold"]) == labels.astype(bool)).all()
    assert "separates perfectly" in point["method"]


def test_the_cut_is_the_middle_of_the_best_ones():
    """Perfectly separated scores (normal logits up to -1, abnormal from 3): the cut is 1,
    halfway, not 3 (the lowest abnormal score, where the highest best cut sits); of two equally
    good runs of cuts, the middle of the wider."""
    from app.training.operating_point import youden_midpoint

    labels = np.array([0, 0, 0, 1, 1, 1])
    assert youden_midpoint(np.array([-5.0, -3.0, -1.0, 3.0, 4.0, 6.0]), labels) == 1.0
    # J = 2/3 for thresholds between the scores -2 and 0, and between 1 and 8: the wider
    logits = np.array([-4.0, -2.0, 1.0, 0.0, 8.0, 9.0])
    cut = youden_midpoint(logits, np.array([0, 0, 0, 1, 1, 1]))
    called = logits >= cut
    assert called[3:].mean() + (~called[:3]).mean() - 1 == pytest.approx(2 / 3)
    assert cut == pytest.approx(4.5)  # the middle of 1..8


def test_a_validation_split_too_small_keeps_half_and_says_so():
    labels = np.array([0] * (MIN_PER_CLASS - 1) + [1] * 30)
    point = choose(np.linspace(0.1, 0.9, len(labels)), labels)
    assert not point["chosen"] and point["threshold"] == 0.5 and point["temperature"] == 1.0
    assert f"fewer than {MIN_PER_CLASS} of a class" in point["method"]


def test_the_recorded_point_is_what_every_reader_uses(tmp_path, checkpoint):
    """record_operating_point on a run of 24 validation scans: best_model.pt carries threshold,
    temperature and the record; app.infer's Classifier, the exported bundle's config and the
    model card use them; the probability is sigmoid(logit / T)."""
    from app.bundle.export import bundle_inference_config
    from app.inference.checkpoints import load_model, pick_device
    from app.inference.classifier import Classifier
    from app.run_folder import BEST_MODEL, SPLIT

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / BEST_MODEL)
    items = []
    for i in range(2 * MIN_PER_CLASS + 4):
        vol = ct_volume(seed=i)
        if i % 2:
            vol[10:30, 12:28, 5:15] += 400  # denser: the random net's output moves with it
        path = nifti(tmp_path / f"s{i}.nii.gz", vol)
        items.append({"image": str(path), "label": i % 2})
    (run / SPLIT).write_text(json.dumps({"training": items[:2], "validation": items}))
    point = record_operating_point(run)
    assert point["chosen"] and point["scans"] == len(items)
    network, settings = load_model(run / BEST_MODEL)
    assert settings["threshold"] == point["threshold"]
    assert settings["temperature"] == pytest.approx(point["temperature"])
    assert settings["operating_point"]["sensitivity"] == point["sensitivity"]
    clf = Classifier.load(run, device="cpu", precision="fp32")
    assert clf.threshold == point["threshold"]
    plain = {k: v for k, v in settings.items() if k not in ("threshold", "temperature")}
    raw = Classifier(network, plain, pick_device("cpu"), precision="fp32")
    for item in items[:4]:
        p, q = clf.predict(item["image"]).prob_abnormal, raw.predict(item["image"]).prob_abnormal
        expected = 1 / (1 + math.exp(-_logit(q) / point["temperature"]))
        assert p == pytest.approx(expected, abs=1e-5)
    assert "sensitivity" in clf.card.describe() and "validation split" in clf.card.describe()
    config = bundle_inference_config(settings)
    assert config["temperature"] == pytest.approx(point["temperature"])
    assert config["threshold"] == point["threshold"]


@pytest.mark.parametrize(
    "bad",
    [
        {"chosen": "yes"},
        {"method": "x"},
        {"chosen": True, "extra": 1},
        {"chosen": True, "sensitivity": [2.0, 0.0, 1.0]},
        {"chosen": True, "sensitivity": [0.5, 0.4]},
        {"chosen": True, "scans": -1},
        {"chosen": True, "method": {"nested": "$import os"}},
        {"chosen": True, "temperature": float("nan")},
        # cut short: chosen, but without what the console prints (it raised KeyError there)
        {"chosen": True, "method": "x", "scans": 20, "normal": 10, "abnormal": 10},
        {"chosen": False, "method": "x"},
        "chosen",
    ],
)
def test_a_checkpoints_operating_point_is_data_and_checked(bad):
    from conftest import TINY_SETTINGS

    from app.model_settings import SettingsError, validate_settings

    with pytest.raises(SettingsError, match="operating_point"):
        validate_settings({**TINY_SETTINGS, "operating_point": bad}, "x.pt")
    for temperature in (0.0, -1.0, "2", float("inf"), True):
        with pytest.raises(SettingsError, match="temperature"):
            validate_settings({**TINY_SETTINGS, "temperature": temperature}, "x.pt")


def test_training_records_the_point_and_prints_it(tiny_data, tmp_path, capsys):
    """app.train ends with the threshold line; a validation split this small keeps 0.5 and
    says so in the checkpoint and on the console."""
    from conftest import TINY

    from app.inference.checkpoints import load_model
    from app.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--data", str(tiny_data), "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    _, settings = load_model(out / "best_model.pt")
    assert settings["operating_point"]["chosen"] is False and settings["threshold"] == 0.5
    assert "threshold 0.5 (none: the validation split holds" in printed, printed
    assert torch.load(out / "best_model.pt", weights_only=True)["run_info"]["temperature"] == 1.0
