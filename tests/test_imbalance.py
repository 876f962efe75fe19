"""Imbalanced cohorts (issue 34): class weighting in the loss, MONAI's weighted sampler, both
chosen by a setting and recorded in the checkpoint; balanced accuracy and PR-AUC in the
evaluation, against scikit-learn's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synth_dataset

from app.training.imbalance import make_loss, make_sampler


def _items(normal: int, abnormal: int) -> list[dict]:
    return [{"image": f"n{i}", "label": 0} for i in range(normal)] + [
        {"image": f"a{i}", "label": 1} for i in range(abnormal)
    ]


def test_pos_weight_weighs_each_class_equally_in_the_loss():
    """On a 1:3 split the loss is BCE with the abnormal terms times normal/abnormal (1/3 here):
    the same as the formula written out, and each class's summed weight equal."""
    items = _items(30, 90)
    loss = make_loss("pos_weight", items)
    assert float(loss.pos_weight) == pytest.approx(30 / 90)
    logits = torch.randn(120, 1)
    labels = torch.tensor([[float(i["label"])] for i in items])
    p = torch.sigmoid(logits)
    by_hand = -(loss.pos_weight * labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    assert float(loss(logits, labels)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(loss.pos_weight) * 90 == pytest.approx(30)
    assert make_loss("none", items).pos_weight is None


def test_the_weighted_sampler_draws_each_class_about_equally_and_is_seeded():
    """1 abnormal scan to 9 normal: over 50 epochs of 100 draws, abnormal scans are 0.5 of the
    draws (within 0.05), where shuffling gives 0.1; the same seed draws the same scans."""
    items = _items(90, 10)
    dataset = list(range(100))
    sampler = make_sampler("weighted", dataset, items, seed=3)
    draws = [i for _ in range(50) for i in sampler]
    assert len(draws) == 5000
    share = np.mean([items[i]["label"] for i in draws])
    assert abs(share - 0.5) < 0.05, share
    again = make_sampler("weighted", dataset, items, seed=3)
    assert list(again) == draws[:100]
    assert make_sampler("shuffle", dataset, items, seed=3) is None


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda: make_loss("pos_weight", _items(5, 0)), "both classes"),
        (lambda: make_sampler("weighted", [0] * 5, _items(5, 0), 0), "both classes"),
        (lambda: make_loss("inverse", _items(5, 5)), "class_weighting must be one of"),
        (lambda: make_sampler("balanced", [0] * 10, _items(5, 5), 0), "sampler must be one of"),
    ],
)
def test_impossible_choices_are_one_line(call, says):
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        call()


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    """A 2:6 generated training set (two normal scans of eight)."""
    data = synth_dataset(tmp_path_factory.mktemp("imb") / "data", 6, (48, 48, 16), seed=4)
    for path in sorted((data / "CT-0").glob("*.nii.gz"))[2:]:
        path.unlink()
    return data


def test_the_choices_are_recorded_in_the_checkpoint_and_read_back(imbalanced, tmp_path, capsys):
    from app.inference.classifier import Classifier
    from app.train import main as train_main

    run = tmp_path / "run"
    args = ["--data", str(imbalanced), "--output", str(run), "--epochs", "1", "--device", "cpu",
            "--spatial-size", "48", "48", "48", "--set", "filters=[4, 4, 8, 8]",
            "--set", "dense_units=8", "--set", "train_fraction=0.75", "--no-progress",
            "--class-weighting", "pos_weight", "--sampler", "weighted"]  # fmt: skip
    assert train_main(args) == 0, capsys.readouterr().err
    settings = Classifier.load(run, device="cpu").settings
    assert settings["class_weighting"] == "pos_weight" and settings["sampler"] == "weighted"
    bad = ["--data", str(imbalanced), "--output", str(tmp_path / "bad"), "--epochs", "1",
           "--set", "sampler=balanced", "--no-progress"]  # fmt: skip
    assert train_main(bad) == 2
    err = capsys.readouterr().err
    assert "sampler" in err and len(err.strip().splitlines()) == 1


def test_balanced_accuracy_and_pr_auc_are_scikit_learns():
    from sklearn.metrics import average_precision_score, balanced_accuracy_score

    from app.evaluation.metrics import binary_metrics

    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(60), np.ones(15)].astype(int)  # 1:4
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    m = binary_metrics(probs, labels, threshold=0.5, n_resamples=500)
    predicted = (probs >= 0.5).astype(int)
    assert m.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert m.pr_auc.value == pytest.approx(average_precision_score(labels, probs))
    for e in (m.balanced_accuracy, m.pr_auc):
        assert e.low < e.value < e.high
    names = [r["metric"] for r in m.rows()]
    assert "balanced_accuracy" in names and "pr_auc" in names
    for seed in range(20):  # the vectorised statistic against scikit-learn, ties included
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, int(rng.integers(4, 60)))
        labels[:2] = [0, 1]
        probs = np.round(rng.uniform(0, 1, len(labels)), int(rng.integers(0, 3)))
        got = binary_metrics(probs, labels, threshold=0.5, n_resamples=100).pr_auc.value
        assert got == pytest.approx(average_precision_score(labels, probs), abs=1e-12)
