"""Severity grading (CT-0..CT-4): the ordinal heads and losses against their definitions, the
grade figures against scikit-learn, the graded generator, hostile settings, and the whole path
(training, app.infer, app.evaluate, an exported bundle) on a tiny graded data set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, bundle_run_args

from app.data.datalist import find_items, load_datalist
from app.data.synth import SEVERITY_GRADES, generate_scan, write_dataset
from app.errors import DataError
from app.evaluation.severity import quadratic_weighted_kappa, severity_metrics
from app.model_settings import SettingsError, validate_settings
from app.runtime.ordinal import SeverityViewd, grade_probabilities, grades_of, median_grade
from app.training.severity import OrdinalLoss
from nets.cnn3d import CNN3D, CumulativeLogits

GRADES = [name for name, _ in SEVERITY_GRADES.values()]


def test_softmax_head_reads_out_the_softmax_above_each_boundary():
    """Differential: P(grade > k) from the head's cumulative logits equals the sum of the
    softmax of its class logits above k, computed directly."""
    head = CumulativeLogits(5, "softmax")
    z = torch.randn(7, 5, dtype=torch.float64) * 3
    cumulative = torch.sigmoid(head(z))
    direct = torch.softmax(z, dim=1).flip(1).cumsum(1).flip(1)[:, 1:]
    torch.testing.assert_close(cumulative, direct)
    probs = grade_probabilities(cumulative)
    torch.testing.assert_close(probs, torch.softmax(z, dim=1))


def test_coral_head_is_one_score_and_falling_offsets():
    head = CumulativeLogits(5, "coral")
    score = torch.tensor([[0.3], [-2.0]])
    out = head(score)
    assert out.shape == (2, 4)
    torch.testing.assert_close(out - score, head.offsets.expand(2, 4))
    assert torch.all(head.offsets[:-1] > head.offsets[1:])  # rank-consistent at the start


@pytest.mark.parametrize("head", ["coral", "softmax"])
def test_a_severity_network_gives_grades_minus_one_logits_and_scripts(head):
    net = CNN3D(filters=[4, 4, 4, 4], dense_units=8, grades=5, ordinal_head=head).eval()
    x = torch.rand(2, 1, 48, 48, 48)
    out = net(x)
    assert out.shape == (2, 4)
    torch.testing.assert_close(torch.jit.script(net)(x), out)
    assert CNN3D(filters=[4, 4, 4, 4], dense_units=8).eval()(x).shape == (2, 1)  # binary: one


@pytest.mark.parametrize("bad", [{"grades": 2}, {"head": "ordinal"}])
def test_the_head_refuses_what_it_cannot_be(bad):
    with pytest.raises(ValueError):
        CumulativeLogits(bad.get("grades", 5), bad.get("head", "coral"))


def test_grade_probabilities_are_a_distribution_and_the_median_its_middle():
    rng = np.random.default_rng(0)
    cumulative = torch.from_numpy(rng.random((200, 4)))  # not falling: made to
    probs = grade_probabilities(cumulative)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(200, dtype=torch.float64))
    grade = median_grade(probs).numpy()
    cdf = probs.cumsum(dim=1).numpy()
    for g, row in zip(grade, cdf, strict=True):
        assert row[g] >= 0.5 - 1e-9 and (g == 0 or row[g - 1] < 0.5)
    falling = torch.sort(cumulative, dim=1, descending=True).values  # CORAL's rule agrees
    assert np.array_equal(
        grades_of(grade_probabilities(falling).numpy()), (falling > 0.5).sum(dim=1).numpy()
    )


def test_severity_view_keeps_p_abnormal_and_adds_the_grades():
    cumulative = torch.tensor([[0.9, 0.7, 0.2, 0.1], [0.1, 0.05, 0.01, 0.0]])
    out = SeverityViewd(keys="pred")({"pred": cumulative})
    torch.testing.assert_close(out["pred"], cumulative[:, :1])
    assert out["grade"].argmax(dim=1).tolist() == [2, 0]
    one = SeverityViewd(keys="pred")({"pred": torch.tensor([0.3])})  # binary: untouched
    assert set(one) == {"pred"}


def test_coral_loss_is_the_mean_binary_cross_entropy_of_each_boundary():
    logits = torch.randn(6, 4, dtype=torch.float64)
    grades = torch.tensor([0, 1, 2, 3, 4, 2])
    targets = (grades[:, None] > torch.arange(4)[None, :]).double()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    ours = OrdinalLoss("coral")(logits, grades.double().view(-1, 1))
    torch.testing.assert_close(ours, expected.float())


def test_softmax_loss_is_the_cross_entropy_of_the_class_logits():
    z = torch.randn(6, 5, dtype=torch.float64)
    grades = torch.tensor([0, 1, 2, 3, 4, 2])
    cumulative = CumulativeLogits(5, "softmax")(z)
    ours = OrdinalLoss("softmax")(cumulative, grades.double().view(-1, 1))
    torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(z, grades).float())


def test_grade_weights_weigh_each_grade_alike():
    logits = torch.zeros(4, 4)
    loss = OrdinalLoss("coral", [1.0, 0.0, 0.0, 0.0, 3.0])
    only_first = loss(logits, torch.tensor([[0.0], [0.0], [1.0], [2.0]]))
    assert only_first == pytest.approx(OrdinalLoss("coral")(logits[:1], torch.zeros(1, 1)))


def test_quadratic_weighted_kappa_equals_scikit_learn():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(1)
    for _ in range(20):
        true = rng.integers(0, 5, 40)
        pred = np.clip(true + rng.integers(-2, 3, 40), 0, 4)
        expected = cohen_kappa_score(true, pred, weights="quadratic", labels=range(5))
        assert quadratic_weighted_kappa(true, pred, 5) == pytest.approx(expected, abs=1e-12)


def test_severity_metrics_on_perfect_and_on_shuffled_grades():
    true = np.repeat(np.arange(5), 8)
    perfect = np.eye(5)[true] * 0.9 + 0.02
    figures = severity_metrics(true, perfect, GRADES, confidence=0.95, n_resamples=200, seed=0)
    assert figures["quadratic_weighted_kappa"]["value"] == 1.0
    assert figures["mean_absolute_error"]["value"] == 0.0
    assert figures["confusion"] == (np.eye(5, dtype=int) * 8).tolist()
    assert all(row["roc_auc"]["value"] == 1.0 for row in figures["per_grade"])
    shuffled = perfect[np.random.default_rng(2).permutation(len(true))]
    worse = severity_metrics(true, shuffled, GRADES, confidence=0.95, n_resamples=200, seed=0)
    kappa = worse["quadratic_weighted_kappa"]
    assert kappa["value"] < 0.5 and kappa["low"] <= kappa["value"] <= kappa["high"]
    assert worse["mean_absolute_error"]["value"] > 0.5


@pytest.mark.parametrize("burden", [0.05, 0.3, 0.6, 0.9])
def test_the_generator_involves_the_share_of_lung_it_is_asked_for(burden):
    scan = generate_scan(1, 7, shape=(64, 64, 24), difficulty=0.3, burden=burden)
    assert scan.lesion_mask is not None
    share = (scan.lesion_mask & scan.lung_mask).sum() / scan.lung_mask.sum()
    assert share == pytest.approx(burden, abs=0.02)
    assert not (scan.lesion_mask & ~scan.lung_mask).any()
    involved = scan.volume[scan.lesion_mask].mean()
    assert involved > scan.volume[scan.lung_mask & ~scan.lesion_mask].mean() + 200  # denser


def test_a_graded_dataset_holds_each_grade_within_its_range(tmp_path):
    items = write_dataset(tmp_path, 2, (48, 48, 16), seed=3, difficulty=0.3, masks=True,
                          severity=True)  # fmt: skip
    assert sorted({int(str(i["label"])) for i in items}) == [0, 1, 2, 3, 4]
    for item in items:
        path = Path(str(item["image"]))
        grade = int(str(item["label"]))
        assert path.parent.name == GRADES[grade]
        mask = np.asarray(nib.load(tmp_path / "masks" / path.name).dataobj) > 0
        low, high = SEVERITY_GRADES[grade][1]
        scan = nib.load(path).get_fdata()
        lungish = (scan < -500).sum()  # the lungs and the air around: a loose upper bound
        assert mask.sum() == 0 if grade == 0 else 0 < mask.sum() < lungish + mask.sum()
        assert low <= high
    found = find_items(tmp_path, class_names=GRADES)
    assert sorted(int(str(i["label"])) for i in found) == sorted(
        int(str(i["label"])) for i in items
    )


def test_datalist_grades_are_checked_against_the_task(tmp_path):
    scan = tmp_path / "a.nii.gz"
    scan.write_bytes(b"x")
    listed = tmp_path / "list.csv"
    listed.write_text("image,label\na.nii.gz,4\n")
    assert load_datalist(listed, grades=5)[0]["label"] == 4
    with pytest.raises(DataError, match="not 0 or 1"):
        load_datalist(listed)  # a binary run: grade 4 is refused
    listed.write_text("image,label\na.nii.gz,5\n")
    with pytest.raises(DataError, match="a grade from 0 to 4"):
        load_datalist(listed, grades=5)


@pytest.mark.parametrize(
    "bad",
    [
        {"grades": 5},  # two names for five grades
        {"grades": 1},
        {"grades": 99, "class_names": [f"g{k}" for k in range(99)]},
        {"grades": 3, "class_names": ["a", "b", "b"]},
        {"grades": 3, "class_names": ["a", "b", "c"], "ordinal_head": "$print(1)"},
        {"grades": 3, "class_names": ["a", "b", "c"], "ordinal_head": "probit"},
        {"grades": "5", "class_names": GRADES},
    ],
)
def test_a_checkpoint_with_hostile_grade_settings_is_refused(bad):
    with pytest.raises(SettingsError):
        validate_settings({**TINY_SETTINGS, **bad}, "hostile.pt")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_severity_end_to_end_train_infer_evaluate_export(tmp_path):
    """A tiny graded set through app.train --task severity, app.infer, app.evaluate and an
    exported bundle: every row carries a grade and a distribution over the five grades; the
    bundle's rows equal app.infer's; metrics.json holds the grade figures and the burden
    baseline's; the model card says what the model is."""
    from app.evaluate import main as evaluate_main
    from app.export import main as export_main
    from app.infer import main as infer_main
    from app.train import main as train_main

    data = tmp_path / "data"
    write_dataset(data, 4, (64, 64, 16), seed=5, difficulty=0.2, severity=True)
    test = tmp_path / "test"
    write_dataset(test, 2, (64, 64, 16), seed=105, difficulty=0.2, severity=True)
    run = tmp_path / "run"
    options = ["--epochs", "2", "--spatial-size", "48", "48", "48", "--device", "cpu",
               "--set", "filters=[4, 4, 8, 8]", "--set", "dense_units=8", "--no-progress"]  # fmt: skip
    assert train_main(["--data", str(data), "--task", "severity", "--output", str(run),
                       *options]) == 0  # fmt: skip
    overrides = json.loads((run / "overrides.json").read_text())
    assert overrides["__task__"] == "severity"
    out = tmp_path / "out"
    infer = [str(test / "CT-4"), "--checkpoint", str(run), "--output", str(out), "--report",
             "--saliency"]  # fmt: skip
    assert infer_main(infer) == 0
    rows = _rows(out / "predictions.csv")
    report = (out / "report.html").read_text()
    assert all(f"<br>{row['grade']}<br><small" in report for row in rows)
    for row in rows:  # the saliency picture names the grade in its title (PNG metadata)
        from PIL import Image

        title = Image.open(out / "saliency" / (Path(row["path"]).name.split(".")[0] + ".png"))
        assert f"severity {row['grade']}" in title.text.get("Title", "")
    assert len(rows) == 2
    for row in rows:
        probs = [float(p) for p in row["grade_probs"].split(";")]
        assert len(probs) == 5 and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["grade"] == GRADES[int(grades_of([probs])[0])]
        assert row["label"] in ("normal", "abnormal")
        assert float(row["prob_abnormal"]) == pytest.approx(1 - probs[0], abs=2e-6)
    evaluated = tmp_path / "eval"
    assert evaluate_main(["--data", str(test), "--checkpoint", str(run), "--output",
                          str(evaluated), "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((evaluated / "metrics.json").read_text())
    severity = metrics["severity"]
    assert severity["grades"] == GRADES and np.array(severity["confusion"]).sum() == 10
    for key in ("quadratic_weighted_kappa", "mean_absolute_error", "accuracy"):
        e = severity[key]
        assert e["low"] <= e["value"] <= e["high"]
    assert len(severity["per_grade"]) == 5
    assert "quadratic_weighted_kappa" in severity["baseline"]
    page = (evaluated / "report.html").read_text()
    kappa = severity["quadratic_weighted_kappa"]["value"]
    assert "Severity grades" in page and f"<td class=num>{kappa:.3f}</td>" in page
    assert metrics["model"]["task"] == "severity"
    assert metrics["metrics"]["n_positive"] == 8  # the binary view: any grade is abnormal
    bundle = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(run), "--output", str(bundle), "--no-onnx"]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    assert "Severity" in meta["task"]
    assert "A severity model of grades CT-0, CT-1" in (bundle / "docs" / "README.md").read_text()
    import subprocess
    import sys

    bout = tmp_path / "bout"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", *bundle_run_args(test / "CT-4", bout)],
        check=True, capture_output=True, cwd=bundle,
    )  # fmt: skip
    theirs = {r["path"]: r for r in _rows(bout / "predictions.csv")}
    for row in rows:
        other = theirs[row["path"]]
        assert other["grade"] == row["grade"] and other["label"] == row["label"]
        assert np.allclose(
            [float(p) for p in other["grade_probs"].split(";")],
            [float(p) for p in row["grade_probs"].split(";")],
            atol=1e-5,
        )


def test_a_severity_run_refuses_binary_folders_and_cross_validation(tmp_path, capsys):
    """MosMed's binary folders (CT-0, CT-23) hold one grade of CT-0..CT-4: refused in one line
    before a run folder exists; --folds with --task severity is refused too."""
    from conftest import synth_dataset

    from app.train import main as train_main

    data = synth_dataset(tmp_path / "binary", 2, (32, 32, 8))
    run = tmp_path / "run"
    assert train_main(["--data", str(data), "--task", "severity", "--output", str(run)]) == 2
    assert "at least two grades" in capsys.readouterr().err and not run.exists()
    folds = ["--data", str(data), "--task", "severity", "--folds", "2", "--output", str(run)]
    assert train_main(folds) == 2
    assert "cross-validation is for binary runs" in capsys.readouterr().err


def test_the_graded_demo_data_hold_the_demos_count_over_five_grades(tmp_path, monkeypatch):
    """`app.train --demo --task severity` trains on graded demo data: as many scans as the
    demo's, spread over CT-0..CT-4, in a cache folder of their own."""
    from app.training.recipes import DEMO_CONFIG, demo_dataset

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / DEMO_CONFIG).write_text(
        "demo_data: {per_class: 5, shape: [32, 32, 8], seed: 3, difficulty: 0.3}\n"
    )
    monkeypatch.setenv("CTCLASSIFY_CACHE", str(tmp_path / "cache"))
    graded = demo_dataset(configs, progress=False, severity=True)
    binary = demo_dataset(configs, progress=False)
    assert graded != binary
    assert sorted(p.name for p in graded.iterdir() if p.is_dir()) == GRADES
    assert len(list(graded.rglob("*.nii.gz"))) == len(list(binary.rglob("*.nii.gz"))) == 10


def test_the_burden_baseline_scores_only_scans_whose_lung_it_found():
    """A test set where the lung mask found lung in no scan gets no burden figures (not a
    crash on an empty set); otherwise only the scans with lung are scored."""
    from app.evaluation.workflow import _graded_baseline

    rows = [{"true_label": g} for g in (0, 1, 2, 3, 4, 4)]
    settings = {"confidence": 0.95, "n_resamples": 200, "seed": 0}
    assert _graded_baseline(GRADES, rows, [-1] * 6, settings) is None
    figures = _graded_baseline(GRADES, rows, [0, 1, 2, 3, 4, -1], settings)
    assert figures is not None and figures["scans"] == 5
    assert figures["quadratic_weighted_kappa"]["value"] == 1.0
