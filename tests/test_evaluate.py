"""python -m app.evaluate: metrics against scikit-learn, CI coverage by simulation, the files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import synth_dataset
from scipy.stats import norm

from app.evaluation.metrics import auc_with_ci, binary_metrics, expected_calibration_error, wilson


def fixed_predictions():
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(37, int), np.ones(23, int)]
    probs = 1 / (1 + np.exp(-(rng.normal(0, 1.2, 60) + 1.5 * labels - 0.3)))
    return probs, labels


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_metrics_equal_scikit_learn(threshold):
    from sklearn import metrics as sk

    probs, labels = fixed_predictions()
    m = binary_metrics(probs, labels, threshold=threshold, n_resamples=200)
    predicted = (probs >= threshold).astype(int)
    assert m.roc_auc.value == pytest.approx(sk.roc_auc_score(labels, probs), abs=1e-12)
    assert m.accuracy.value == pytest.approx(sk.accuracy_score(labels, predicted), abs=1e-12)
    assert m.sensitivity.value == pytest.approx(sk.recall_score(labels, predicted), abs=1e-12)
    assert m.specificity.value == pytest.approx(
        sk.recall_score(labels, predicted, pos_label=0), abs=1e-12
    )
    assert m.ppv.value == pytest.approx(sk.precision_score(labels, predicted), abs=1e-12)
    assert m.npv.value == pytest.approx(
        sk.precision_score(labels, predicted, pos_label=0), abs=1e-12
    )
    assert m.brier == pytest.approx(sk.brier_score_loss(labels, probs), abs=1e-12)
    tn, fp, fn, tp = sk.confusion_matrix(labels, predicted).ravel()
    assert m.confusion == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert (m.n, m.n_positive, m.n_negative) == (60, 23, 37)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (7, 10), (10, 10), (45, 60)])
def test_wilson_interval_is_the_textbook_formula(k, n):
    """scipy's Wilson interval against the formula written out (z = 1.95996...)."""
    z = norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    e = wilson(k, n)
    assert e.value == pytest.approx(p)
    assert e.low == pytest.approx(max(0.0, centre - half), abs=1e-9)
    assert e.high == pytest.approx(min(1.0, centre + half), abs=1e-9)
    assert math.isnan(wilson(0, 0).value)


def test_auc_interval_covers_the_true_auc_95_percent_of_the_time():
    """500 simulated test sets (50 normal, 50 abnormal; scores N(0,1) and N(1.2,1): true AUC
    Phi(1.2 / sqrt 2) = 0.802): the 95% interval holds the true AUC in 92-98% of them."""
    rng = np.random.default_rng(123)
    d = 1.2
    true_auc = norm.cdf(d / math.sqrt(2))
    labels = np.r_[np.zeros(50, int), np.ones(50, int)]
    hits, widths = 0, []
    for i in range(500):
        scores = rng.normal(0, 1, 100) + d * labels
        e = auc_with_ci(scores, labels, n_resamples=1000, seed=i)
        hits += e.low <= true_auc <= e.high
        widths.append(e.high - e.low)
    coverage = hits / 500
    print(f"coverage {coverage:.3f}, mean width {np.mean(widths):.3f}")
    assert 0.92 <= coverage <= 0.98
    assert 0.1 < np.mean(widths) < 0.25  # an interval, not the whole [0, 1]


def test_auc_interval_is_seeded():
    probs, labels = fixed_predictions()
    a, b = auc_with_ci(probs, labels, seed=3), auc_with_ci(probs, labels, seed=3)
    assert (a.low, a.high) == (b.low, b.high) and a.low < a.value < a.high


def test_calibration_error():
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    # two bins: 0.25 holds 4 scans with 1 abnormal (exact), 0.95 holds 4 with 3 (0.2 off)
    probs = np.array([0.25, 0.25, 0.25, 0.95, 0.95, 0.25, 0.95, 0.95])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0 + 0.5 * 0.2)
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    assert expected_calibration_error(p, (rng.uniform(0, 1, 20000) < p).astype(int)) < 0.02


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        ([0.1, 0.2], [0, 1, 1], "equal 1D"),
        ([0.1, 0.2], [0, 2], "0 \\(normal\\) or 1"),
        ([0.1, 1.2], [0, 1], "\\[0, 1\\]"),
        ([0.1, float("nan")], [0, 1], "\\[0, 1\\]"),
    ],
)
def test_bad_predictions_are_refused(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(np.array(probs), np.array(labels))


def test_one_class_gives_no_auc_but_the_rest():
    m = binary_metrics(np.array([0.2, 0.7, 0.9]), np.array([1, 1, 1]), n_resamples=200)
    assert math.isnan(m.roc_auc.value) and m.roc_auc.text() == "n/a"
    assert m.sensitivity.value == pytest.approx(2 / 3) and math.isnan(m.specificity.value)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    return synth_dataset(tmp_path_factory.mktemp("eval") / "test", 6, (48, 48, 20), seed=9)


def test_evaluate_writes_every_file_naming_model_and_data(test_set, checkpoint, tmp_path, capsys):
    from app.evaluate import FILES, main

    (test_set / "CT-0" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "E"
    args = [
        "--data",
        str(test_set),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--bootstrap",
        "200",
        "--no-progress",
    ]
    try:
        rc = main(args)
    finally:
        (test_set / "CT-0" / "broken.nii.gz").unlink()
    assert rc == 1  # one scan failed: listed, left out of the metrics
    printed = capsys.readouterr().out
    assert "roc_auc" in printed and "1 failed" in printed
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["failed"] == 1 and summary["metrics"]["n"] == 12
    assert summary["model"]["checkpoint"].endswith("model.pt")
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and sum(1 for r in rows if r["error"]) == 1
    page = (out / "report.html").read_text()
    assert str(test_set) in page and "model.pt" in page and "ROC-AUC" in page
    assert page.count("data:image/png;base64,") == 3
    # an evaluation is not replaced without --overwrite
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_evaluate_from_python_matches_the_files_and_escapes_paths(checkpoint, tmp_path):
    """The Python API returns the same metrics as the files; a path with HTML in it is text."""
    from app.evaluate import evaluate

    root = synth_dataset(tmp_path / "<b>set</b>", 4, (48, 48, 20), seed=2)
    result = evaluate(root, checkpoint, tmp_path / "E", device="cpu", n_resamples=200)
    table = {r["metric"]: r for r in result.table()}
    summary = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert table["roc_auc"]["value"] == summary["metrics"]["roc_auc"]["value"]
    assert result.metrics.n == 8 and result.failed == 0
    page = (tmp_path / "E" / "report.html").read_text()
    assert "<b>set</b>" not in page and "&lt;b&gt;set&lt;/b&gt;" in page


def test_evaluate_refuses_unlabelled_data_and_bad_values(checkpoint, tmp_path, capsys):
    from app.evaluate import main

    (tmp_path / "empty").mkdir()
    base = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "E"), "--device", "cpu"]
    assert main(["--data", str(tmp_path / "empty"), *base]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--threshold", "1.5", *base]) == 2
    assert main(["--data", str(tmp_path), "--bootstrap", "5", *base]) == 2
    assert not (tmp_path / "E").exists()


@pytest.mark.parametrize(
    "matrix", [[[39, 21], [22, 38]], [[45, 15], [29, 31]], [[0, 0], [0, 5]], [[0, 0], [0, 0]]]
)
def test_confusion_counts_read_on_their_cells(matrix):
    """Every count's text contrasts with its cell: white on dark blue, black on light (a count
    near the smallest one of a matrix was once white on a near-white cell)."""
    from app.evaluation.plots import confusion_colours

    cells, text = confusion_colours(np.array(matrix))
    for i in range(2):
        for j in range(2):
            luminance = float(cells[i, j, :3] @ np.array([0.2126, 0.7152, 0.0722]))
            ink = 1.0 if text[i][j] == "white" else 0.0
            assert abs(luminance - ink) > 0.4, (matrix, i, j, luminance, text[i][j])
