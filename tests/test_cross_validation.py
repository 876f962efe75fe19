"""Cross-validation: the folds, the fold runs, the summary, out-of-fold threshold and temperature."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import bundle_run_args, synth_dataset

from app.data.datalist import find_items, make_split
from app.errors import DataError
from app.evaluation.metrics import fit_temperature, logits_of, nll
from app.training.cross_validation import choose_threshold


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory):
    return synth_dataset(tmp_path_factory.mktemp("cv") / "d", 6, (64, 64, 16), seed=3)


def _train_two_folds(data, out) -> int:
    """app.train's exit status for a 2-fold CV of one epoch at 48^3 on the CPU."""
    from app.train import main

    return main(["--data", str(data), "--output", str(out), "--folds", "2", "--epochs", "1",
                 "--spatial-size", "48", "48", "48", "--device", "cpu", "--no-progress"])  # fmt: skip


def test_folds_partition_the_data_stratified_and_seeded(cv_data):
    items = find_items(cv_data)
    folds = [make_split(items, train_fraction=0.7, seed=5, folds=3, fold=k) for k in range(3)]
    validated = [str(i["image"]) for f in folds for i in f["validation"]]
    assert sorted(validated) == sorted(str(i["image"]) for i in items)  # each scan once
    for f in folds:
        assert [int(i["label"]) for i in f["validation"]].count(1) == 2  # 6 per class / 3
        train = {str(i["image"]) for i in f["training"]}
        assert not train & {str(i["image"]) for i in f["validation"]}
        assert len(train) == 8
    again = make_split(list(reversed(items)), train_fraction=0.7, seed=5, folds=3, fold=1)
    assert again == folds[1]  # the order the items come in does not matter
    other = make_split(items, train_fraction=0.7, seed=6, folds=3, fold=1)
    assert other["validation"] != folds[1]["validation"]
    with pytest.raises(DataError, match="fold 3 of 3"):
        make_split(items, train_fraction=0.7, seed=5, folds=3, fold=3)
    with pytest.raises(DataError, match="at least 7 scans of each class"):
        make_split(items, train_fraction=0.7, seed=5, folds=7, fold=0)


def test_threshold_is_youdens_j_or_reaches_the_target_sensitivity():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    probs = np.clip(rng.normal(0.4, 0.15, 80) + 0.2 * labels, 0, 1)
    threshold, method = choose_threshold(probs, labels)
    assert method == "Youden's J"

    def j(t):
        pred = probs >= t
        return pred[labels == 1].mean() + (~pred[labels == 0]).mean() - 1

    assert j(threshold) == pytest.approx(max(j(t) for t in np.unique(probs)))
    # the target-sensitivity threshold against a brute force: tests/test_evaluate.py


def test_temperature_scaling_lowers_the_negative_log_likelihood():
    """Overconfident logits (3x too large): the fitted temperature is near 3 and the NLL falls."""
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, 2000)
    labels = (rng.uniform(size=2000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    logits = 3 * true_logits
    t = fit_temperature(logits, labels)
    assert 2.5 < t < 3.5
    assert nll(logits, labels, t) < nll(logits, labels) - 0.05
    calibrated = fit_temperature(true_logits, labels)
    assert 0.85 < calibrated < 1.15  # already calibrated: left near 1
    assert np.isfinite(logits_of(np.array([0.0, 1.0]))).all()


def test_cross_validation_writes_folds_summary_and_calibration_and_resumes(cv_data, tmp_path):
    from app.train import main

    out = tmp_path / "cv"
    args = [
        "--data",
        str(cv_data),
        "--output",
        str(out),
        "--folds",
        "3",
        "--epochs",
        "2",
        "--spatial-size",
        "48",
        "48",
        "48",
        "--device",
        "cpu",
        "--no-progress",
        "--seed",
        "2",
    ]
    # one fold first (an array job), then the rest: the summary waits for all three
    assert main([*args, "--fold", "1"]) == 0
    assert (out / "fold-1" / "best_model.pt").exists() and not (out / "fold-0").exists()
    assert not (out / "cv_summary.json").exists()
    fold1 = (out / "fold-1" / "best_model.pt").read_bytes()
    assert main(args) == 0
    assert (out / "fold-1" / "best_model.pt").read_bytes() == fold1  # finished: kept
    for name in (
        "cv_summary.csv",
        "cv_summary.json",
        "cv_curves.png",
        "oof_predictions.csv",
        "cv_calibration.json",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert set(summary["mean_sd"]) >= {"val_acc", "val_auc"}
    oof = (out / "oof_predictions.csv").read_text().strip().splitlines()
    assert len(oof) == 1 + 12  # every scan once, by the model that did not train on it
    calibration = json.loads((out / "cv_calibration.json").read_text())
    assert 0 <= calibration["threshold"] <= 1 and calibration["temperature"] > 0
    from app.readback import read_cv_summary

    base = read_cv_summary(out / "cv_summary.json")["baseline"]  # beside the CNN, out of fold
    assert base["scans"] == 12
    assert base["difference"]["value"] == pytest.approx(
        base["model_auc"]["value"] - base["baseline_auc"]["value"]
    )
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-12
    # the same command again: nothing retrained, the same figures
    before = (out / "cv_summary.json").read_text()
    assert main(args) == 0
    assert (out / "cv_summary.json").read_text() == before
    # checked independently of the code that made the folds: every scan of the data folder is
    # validated by exactly one fold, never by a fold that trained on it, 2 per class per fold
    # (labels from the class folders), and its out-of-fold row is that fold model's prediction
    import csv

    from app.inference.classifier import Classifier

    scans = {str(p): int(p.parent.name != "CT-0") for p in cv_data.rglob("*.nii.gz")}
    with (out / "oof_predictions.csv").open() as f:
        oof_rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in oof_rows) == sorted(scans)
    for k in range(3):
        split = json.loads((out / f"fold-{k}" / "split.json").read_text())
        validated = {i["image"] for i in split["validation"]}
        assert not validated & {i["image"] for i in split["training"]}
        assert validated | {i["image"] for i in split["training"]} == set(scans)
        assert sorted(scans[p] for p in validated) == [0, 0, 1, 1]
        assert {r["path"] for r in oof_rows if r["fold"] == str(k)} == validated
        model = Classifier.load(out / f"fold-{k}", device="cpu")
        row = next(r for r in oof_rows if r["fold"] == str(k))
        assert float(row["prob_abnormal"]) == pytest.approx(
            model.predict(row["path"]).prob_abnormal, abs=1e-6
        )
        assert int(row["label"]) == scans[row["path"]]


def test_cross_validation_folder_is_one_model_the_mean_of_its_folds(cv_data, tmp_path, capsys):
    """Classifier.load(CV folder): the mean of the folds' temperature-scaled probabilities, at
    the out-of-fold threshold on that scale; app.infer and app.evaluate take the folder too."""
    import math

    from app.evaluate import evaluate
    from app.inference.classifier import Classifier

    out = tmp_path / "cv"
    assert _train_two_folds(cv_data, out) == 0
    printed = capsys.readouterr().out
    calibration = json.loads((out / "cv_calibration.json").read_text())
    ensemble = Classifier.load(out, device="cpu", precision="fp32")
    assert ensemble.threshold == calibration["threshold_calibrated"]
    # one threshold, printed the same way by app.train, app.infer and app.evaluate (issue 21:
    # training printed 0.489, before the temperature; inference used 0.496311)
    shown = f"threshold {ensemble.threshold:g}"
    assert ensemble.threshold == round(ensemble.threshold, 4)
    assert f"{shown} on P(abnormal) as app.infer" in printed, printed
    assert "cross-validation, mean over the folds" in ensemble.describe()
    assert ": 2 fold models, each trained on 6 generated scans" in ensemble.describe()
    scan = str(next((cv_data / "CT-23").glob("*.nii.gz")))
    members = []
    for k in range(2):
        p = Classifier.load(out / f"fold-{k}", device="cpu", precision="fp32").predict(scan)
        z = math.log(p.prob_abnormal / (1 - p.prob_abnormal))
        members.append(1 / (1 + math.exp(-z / calibration["temperature"])))
    predicted = ensemble.predict(scan)
    assert predicted.prob_abnormal == pytest.approx(sum(members) / 2, abs=2e-6)
    assert predicted.fold_probs == pytest.approx(members, abs=2e-6)  # each fold's, scaled
    from app.errors import UsageError

    with pytest.raises(UsageError, match="12 of the 12 test scans were used by the model"):
        evaluate(cv_data, out, tmp_path / "E", device="cpu", n_resamples=200)
    result = evaluate(
        cv_data, out, tmp_path / "E", device="cpu", n_resamples=200, allow_overlap=True
    )
    assert result.overlap == {
        "scans": 12,
        "used_for": "6 in fold 0 training, 6 in fold 0 validation",
    }
    assert json.loads((tmp_path / "E" / "metrics.json").read_text())["independent"] is False
    assert "NOT INDEPENDENT: 12 test scans" in (tmp_path / "E" / "report.html").read_text()
    # the density baseline, fitted on the ensemble's training scans (all 12), beside it
    assert result.baseline is not None and result.baseline["trained_on"] == 12
    rows = {r["metric"]: r for r in result.table()}
    assert rows["roc_auc - baseline"]["value"] == pytest.approx(
        result.metrics.roc_auc.value - rows["baseline roc_auc"]["value"]
    )
    assert "Against its baseline" in (tmp_path / "E" / "report.html").read_text()
    assert result.metrics.n == 12 and result.metrics.threshold == ensemble.threshold
    _check_ensemble_evaluation(result, cv_data, out, calibration["temperature"], tmp_path / "E")
    # app.infer: each fold's probability in predictions.json, their mean the ensemble's
    from app.infer import main as infer_main

    capsys.readouterr()
    assert infer_main([str(cv_data), "--checkpoint", str(out), "--output", str(tmp_path / "I"),
                       "--no-progress", "--device", "cpu", "--report"]) == 0  # fmt: skip
    assert shown in capsys.readouterr().out.splitlines()[0]  # the model line app.infer prints
    assert f"<dd>{ensemble.threshold:g} " in (tmp_path / "E" / "report.html").read_text()
    rows = json.loads((tmp_path / "I" / "predictions.json").read_text())
    assert len(rows) == 12
    for row in rows:
        assert len(row["fold_probs"]) == 2
        assert row["prob_abnormal"] == pytest.approx(sum(row["fold_probs"]) / 2, abs=2e-6)
    assert "folds " in (tmp_path / "I" / "report.html").read_text()
    from app.inference.classifier import CheckpointError

    canary = tmp_path / "canary"
    for key, value in (
        ("temperature", f"$open({str(canary)!r}, 'w')"),
        ("threshold_method", f"$open({str(canary)!r}, 'w')"),
        ("loss#_target_", "os.system"),
        ("threshold", float("nan")),
    ):
        (out / "cv_calibration.json").write_text(json.dumps({**calibration, key: value}))
        with pytest.raises(CheckpointError, match=f"cv_calibration.json: key '{key}'"):
            Classifier.load(out, device="cpu")
        assert not canary.exists()
    (out / "cv_calibration.json").write_text(json.dumps(calibration))
    assert Classifier.load(out, device="cpu").threshold == ensemble.threshold


def test_cross_validation_exports_as_one_bundle_that_equals_app_infer(cv_data, tmp_path):
    """app.export --checkpoint CV: one bundle whose network averages the folds; under
    `monai.bundle run` with MONAI alone (the app cannot be imported) it gives app.infer's
    ensemble probabilities to 1e-5, and app.infer reads the bundle back as the same ensemble."""
    import csv
    import os
    from pathlib import Path

    from test_bundle import BLOCKER

    from app.bundle.export import monai_bundle
    from app.export import main as export_main
    from app.infer import main as infer_main

    cv, bundle = tmp_path / "cv", tmp_path / "bundle"
    assert _train_two_folds(cv_data, cv) == 0
    assert export_main(["--checkpoint", str(cv), "--output", str(bundle), "--no-onnx"]) == 0
    assert (bundle / "models" / "model.ts").is_file()  # MONAI scripted the ensemble itself
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{bundle}"}
    proc = monai_bundle(
        bundle_run_args(
            cv_data, tmp_path / "B", "--precision", "fp32", "--device", "$torch.device('cpu')"
        ),
        cwd=bundle,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for source, out in ((cv, "A"), (bundle, "C")):
        assert (
            infer_main(
                [
                    str(cv_data),
                    "--checkpoint",
                    str(source),
                    "--output",
                    str(tmp_path / out),
                    "--precision",
                    "fp32",
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )

    def probabilities(folder):
        with (folder / "predictions.csv").open() as f:
            return {Path(r["path"]).name: float(r["prob_abnormal"]) for r in csv.DictReader(f)}

    ensemble = probabilities(tmp_path / "A")
    assert len(ensemble) == 12
    for other in (probabilities(tmp_path / "B"), probabilities(tmp_path / "C")):
        assert other.keys() == ensemble.keys()
        assert max(abs(other[k] - ensemble[k]) for k in ensemble) <= 1e-5


def _check_ensemble_evaluation(result, data, cv_folder, temperature, out):
    """app.evaluate on a CV folder: each fold model's ROC-AUC equals scikit-learn's on that
    fold model run alone; 'before temperature' is the ensemble of the unscaled fold models,
    'after' the ensemble app.evaluate reports; predictions.csv has a column per fold."""
    import csv

    from sklearn.metrics import brier_score_loss, roc_auc_score

    from app.evaluation.metrics import expected_calibration_error
    from app.inference.classifier import Classifier

    items = find_items(data)
    paths, labels = [str(i["image"]) for i in items], np.array([int(i["label"]) for i in items])
    raw = np.array(
        [
            [
                p.prob_abnormal
                for p in Classifier.load(cv_folder / f"fold-{k}", device="cpu").predict_many(paths)
            ]
            for k in range(2)
        ]
    ).T  # (scans, folds): what each fold model says on its own
    assert [f["fold"] for f in result.folds] == [0, 1]
    for k, fold in enumerate(result.folds):
        assert fold["roc_auc"].value == pytest.approx(roc_auc_score(labels, raw[:, k]), abs=1e-9)
        assert fold["roc_auc"].low <= fold["roc_auc"].value <= fold["roc_auc"].high
    unscaled = raw.mean(axis=1)
    before, after = result.calibration["before"], result.calibration["after"]
    assert result.calibration["temperature"] == pytest.approx(temperature)
    assert before["ece"] == pytest.approx(expected_calibration_error(unscaled, labels), abs=1e-4)
    assert before["brier"] == pytest.approx(brier_score_loss(labels, unscaled), abs=1e-5)
    assert after["ece"] == pytest.approx(result.metrics.ece, abs=1e-5)  # 6-decimal rounding
    assert after["brier"] == pytest.approx(result.metrics.brier, abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["calibration"]["before"]["ece"] == pytest.approx(before["ece"])
    assert [f["roc_auc"]["value"] for f in metrics["folds"]] == [
        f["roc_auc"].value for f in result.folds
    ]
    names = [r["metric"] for r in result.table()]
    assert {"fold 0 roc_auc", "fold 1 roc_auc", "ece before temperature"} <= set(names)
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        folds = [float(row["prob_fold_0"]), float(row["prob_fold_1"])]
        assert float(row["prob_abnormal"]) == pytest.approx(sum(folds) / 2, abs=2e-6)
    report = (out / "report.html").read_text()
    assert "Calibration: temperature" in report and "<th>each fold, %</th>" in report
    first = rows[0]
    spread = f"{100 * float(first['prob_fold_0']):.1f} / {100 * float(first['prob_fold_1']):.1f}"
    assert spread in report


def test_a_sensitivity_target_fitted_out_of_fold_shifts_for_the_ensemble_and_says_so():
    """Simulation: 5 fold models = true score + independent model noise. The threshold chosen
    for sensitivity 0.9 on single models' out-of-fold scores gives the mean of 5 models a
    higher sensitivity and a lower specificity on new scans (the shift the model card states);
    on single models it delivers the target."""
    from app.inference.model_card import ModelCard

    rng = np.random.default_rng(0)
    n, k = 4000, 5

    def scans():
        labels = rng.integers(0, 2, n)
        return labels, rng.normal(0, 1, n) + 1.5 * labels

    labels, truth = scans()
    oof = truth + rng.normal(0, 1, n)  # each scan by one fold model
    threshold, method = choose_threshold(oof, labels, target_sensitivity=0.9)
    new_labels, new_truth = scans()
    members = new_truth[:, None] + rng.normal(0, 1, (n, k))
    single = (members[new_labels == 1, 0] >= threshold).mean()
    ensemble = members.mean(axis=1)
    sensitivity = (ensemble[new_labels == 1] >= threshold).mean()
    specificity = (ensemble[new_labels == 0] < threshold).mean()
    single_spec = (members[new_labels == 0, 0] < threshold).mean()
    print(f"single {single:.3f}/{single_spec:.3f}, ensemble {sensitivity:.3f}/{specificity:.3f}")
    assert abs(single - 0.9) < 0.02  # single models: the target
    assert sensitivity > 0.93  # the mean of 5: more sensitive than promised ...
    card = ModelCard(
        {"ensemble": {"members": k, "temperature": 1.0, "threshold_method": method}},
        None,
        0.5,
        ["normal", "abnormal"],
    )
    assert any("sensitivity >= 0.9 on single fold models" in c for c in card.caveats())
    youden = ModelCard({"ensemble": {"members": k, "temperature": 1.0,
                                     "threshold_method": "Youden's J"}}, None, 0.5, ["n", "a"])  # fmt: skip
    assert not any("fold models' out-of-fold" in c for c in youden.caveats())
