"""app.infer and the Classifier API: checkpoints, the command line, reports, output folders,
what a model says about itself; the input checks are in tests/test_input_checks.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SETTINGS, ct_volume, nifti, synth_dataset

from app.infer import main as infer_main
from app.inference.checkpoints import load_checkpoint
from app.inference.classifier import CheckpointError, Classifier
from nets.cnn3d import CNN3D

# --- bad inputs: each one is reported with a one-line reason -------------------------------------


def test_checkpoint_without_settings_is_unusable(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(CNN3D(filters=(4, 4, 8, 8), dense_units=8).state_dict(), path)
    with pytest.raises(CheckpointError, match="settings"):
        load_checkpoint(path)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"network": {}, "run_info": TINY_SETTINGS, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    assert (
        infer_main([str(tmp_path), "--checkpoint", str(path), "--output", str(tmp_path / "o")]) == 2
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, says",
    [
        pytest.param(lambda good: bytes(range(256)) * 16, "neither the zip", id="random-bytes"),
        pytest.param(lambda good: good[: len(good) // 2], "not a readable", id="cut-short"),
        pytest.param(lambda good: b"\x80\x02" + bytes(200), "cannot be parsed", id="bad-pickle"),
        pytest.param(lambda good: b"", "neither the zip", id="empty"),
    ],
)
def test_a_damaged_checkpoint_is_called_damaged_not_malicious(
    checkpoint, tmp_path, content, says, capsys
):
    """Random bytes, a file cut short, an unparsable pickle: "not a PyTorch checkpoint", never
    "holds Python objects that loading would execute" (issue 31: --init said so of random
    bytes); the same through app.train --init, one line, exit 2."""
    from app.train import main as train_main

    path = tmp_path / "bad.pt"
    path.write_bytes(content(checkpoint.read_bytes()))
    with pytest.raises(CheckpointError, match=says) as exc:
        load_checkpoint(path)
    assert "would execute" not in str(exc.value)
    data = synth_dataset(tmp_path / "d", 2, (48, 48, 8))
    args = ["--data", str(data), "--output", str(tmp_path / "R"), "--init", str(path),
            "--spatial-size", "48", "48", "48", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "would execute" not in err and "Traceback" not in err, err


# --- the command line -----------------------------------------------------------------------------


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def test_cli_mixed_folder_report_and_saliency(real_ct, tmp_path, checkpoint, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in (
        "cip_ct-64_chest.nii.gz",
        "cip_ct-64_chest_LAS.nii.gz",
        "totalsegmentator_example_ct_sm.nii.gz",
        "niivue-images_CT_AVM.nii.gz",
    ):
        shutil.copy(real_ct / name, folder / name)
    shutil.copytree(real_ct / "cip_ct-64_dicom", folder / "dicom")
    (folder / "empty.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    code = infer_main(
        [
            str(folder),
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--report",
            "--saliency",
            "--no-progress",
        ]
    )
    assert code == 1  # one input failed, the rest are classified
    rows = read_rows(out)
    assert len(rows) == 6
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["empty.nii.gz"]["error"] and not by_name["empty.nii.gz"]["prob_abnormal"]
    for name in ("cip_ct-64_chest.nii.gz", "cip_ct-64_chest_LAS.nii.gz", "dicom"):
        assert 0 <= float(by_name[name]["prob_abnormal"]) <= 1
    # the same scan stored LAS, LPS and as DICOM gets the same probability
    probs = {
        float(by_name[n]["prob_abnormal"])
        for n in ("cip_ct-64_chest.nii.gz", "cip_ct-64_chest_LAS.nii.gz", "dicom")
    }
    assert max(probs) - min(probs) < 1e-5
    avm = by_name["niivue-images_CT_AVM.nii.gz"]  # uint8 x 2.2: values 0..563, not HU
    assert "not CT in Hounsfield units" in avm["error"] and not avm["prob_abnormal"]
    assert json.loads((out / "predictions.json").read_text())[0].keys() >= {
        "path",
        "prob_abnormal",
        "label",
        "warnings",
        "error",
    }
    html = (out / "report.html").read_text()
    # 4 classified scans, each with a montage and a saliency map; the 2 failed rows have none
    assert html.count("<tr class=") == 6 and html.count("data:image/png;base64,") == 8
    # the report names the model (checkpoint, threshold) and the date; pictures open full size
    assert (
        f"<b>Model:</b> {checkpoint}" in html and "threshold" in html and "<b>Date:</b> 20" in html
    )
    assert html.count('tabindex="0"') == 8 and "img:focus" in html
    assert len(list((out / "saliency").glob("*.png"))) == 4
    assert "percent confident that CT scan is normal" in capsys.readouterr().out


def test_cli_interrupted_run_completes_each_input_once(tmp_path, checkpoint):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(4):
        nifti(folder / f"s{i}.nii.gz", ct_volume(seed=i))
    out = tmp_path / "out"
    assert (
        infer_main(
            [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
        )
        == 0
    )
    full = read_rows(out)
    # simulate a kill: two rows done, the third half-written
    lines = (out / "predictions.csv").read_text().splitlines(keepends=True)
    (out / "predictions.csv").write_text("".join(lines[:3]) + lines[3][:10])
    assert (
        infer_main(
            [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
        )
        == 0
    )
    again = read_rows(out)
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in full)
    assert {r["path"]: r["prob_abnormal"] for r in again} == {
        r["path"]: r["prob_abnormal"] for r in full
    }


def test_cli_usage_errors(tmp_path, checkpoint):
    assert infer_main([str(tmp_path / "missing"), "--checkpoint", str(checkpoint)]) == 2
    (tmp_path / "empty").mkdir()
    assert (
        infer_main(
            [
                str(tmp_path / "empty"),
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert (
        infer_main(
            [str(tmp_path), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "inside")]
        )
        == 2
    )
    assert (
        infer_main(
            [
                str(tmp_path / "empty"),
                "--checkpoint",
                str(tmp_path / "nope.pt"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_python_api_predict(real_ct, checkpoint):
    clf = Classifier.load(checkpoint, device="cpu")
    pred = clf.predict(real_ct / "cip_ct-64_chest.nii.gz")
    assert pred.ok and 0.0 < pred.prob_abnormal < 1.0 and "percent confident" in pred.sentence()
    # the label follows the threshold on both sides of this scan's probability
    for threshold, label in (
        (pred.prob_abnormal - 1e-3, "abnormal"),
        (pred.prob_abnormal + 1e-3, "normal"),
    ):
        other = Classifier.load(checkpoint, device="cpu", threshold=threshold)
        assert other.predict(real_ct / "cip_ct-64_chest.nii.gz").label == label
    assert clf.predict(real_ct / "cip_ct-64_dicom").prob_abnormal == pytest.approx(
        pred.prob_abnormal, abs=1e-6
    )


def _screenshot(chromium: str, page: Path, tmp_path: Path) -> np.ndarray:
    """``page`` rendered by headless Chromium at 1200x900, as an RGB array."""
    import subprocess

    from PIL import Image

    shot = tmp_path / f"{page.parent.name}-shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)


def _banner_rows(rgb: np.ndarray) -> np.ndarray:
    """Rows of a screenshot that are mostly the reports' red banner (#b00020)."""
    red = (rgb[..., 0] > 140) & (rgb[..., 1] < 40) & (rgb[..., 2] < 60)
    return np.nonzero(red.mean(axis=1) > 0.5)[0]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, generated_model, real_ct):
    """The report opens offline in a real browser and is not blank; for a model trained on
    generated scans it is led by the red banner that says so (issue 21)."""
    import os

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed here (apt-get install chromium)")
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(real_ct / "cip_ct-64_chest.nii.gz", folder)
    (folder / "empty.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    assert (
        infer_main(
            [
                str(folder),
                "--checkpoint",
                str(generated_model),
                "--output",
                str(out),
                "--report",
                "--saliency",
                "--no-progress",
            ]
        )
        == 1
    )
    rgb = _screenshot(chromium, out / "report.html", tmp_path)
    pixels = rgb.mean(axis=2)
    assert pixels.std() > 10  # text, table and images: far from a blank page
    assert (pixels < 100).mean() > 0.01  # dark pixels: the CT montages and text
    rows = _banner_rows(rgb)
    assert len(rows) >= 10 and rows.min() < 300, (len(rows), rows[:5])
    # the evaluation report of the same model: the banner too, and its plots
    from conftest import synth_dataset

    from app.evaluate import evaluate

    test = synth_dataset(tmp_path / "test", 3, (64, 64, 16), seed=77)
    evaluate(test, generated_model, tmp_path / "E", device="cpu", n_resamples=200)
    rgb = _screenshot(chromium, tmp_path / "E" / "report.html", tmp_path)
    # generated test scans too: no red banner about real scans, a note that the figures
    # describe generated scans (issue 35)
    assert len(_banner_rows(rgb)) == 0
    page = (tmp_path / "E" / "report.html").read_text()
    assert "these test scans are generated too" in page and "mean little" not in page
    assert rgb.mean(axis=2).std() > 10


def test_bf16_precision_stays_close_to_fp32(real_ct, checkpoint):
    fp32 = Classifier.load(checkpoint, device="cpu", precision="fp32").predict(
        real_ct / "cip_ct-64_chest.nii.gz"
    )
    bf16 = Classifier.load(checkpoint, device="cpu", precision="bf16").predict(
        real_ct / "cip_ct-64_chest.nii.gz"
    )
    assert abs(fp32.prob_abnormal - bf16.prob_abnormal) < 0.05
    with pytest.raises(Exception, match="precision"):
        Classifier.load(checkpoint, device="cpu", precision="int8")


# --- what the model is and where it does not apply -------------------------------------------------


def test_generated_data_model_on_real_scans_says_so(real_ct, tmp_path, generated_model, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(real_ct / "totalsegmentator_example_ct_sm.nii.gz", folder / "abdomen.nii.gz")
    shutil.copy(real_ct / "cip_ct-64_chest_LAS.nii.gz", folder / "chest.nii.gz")
    out = tmp_path / "out"
    code = infer_main(
        [str(folder), "--checkpoint", str(generated_model), "--output", str(out), "--report"]
    )
    assert code == 0
    page = (out / "report.html").read_text()  # led by the banner (issue 21)
    assert page.index('class="banner">The model was trained on generated scans') < page.index(
        "<table>"
    )
    printed = capsys.readouterr().out
    banner = printed.splitlines()[0]
    assert (
        banner.startswith("model: ")
        and "trained on 6 generated scans (3 normal, 3 abnormal)" in banner
    )
    assert "validation at epoch 1: accuracy" in banner
    assert "warning: this model was trained on generated scans" in printed
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    abdomen, chest = rows["abdomen.nii.gz"]["warnings"], rows["chest.nii.gz"]["warnings"]
    assert rows["abdomen.nii.gz"]["prob_abnormal"] and rows["chest.nii.gz"]["prob_abnormal"]
    assert "trained on generated scans" in abdomen and "trained on generated scans" in chest
    assert "little or no lung" in abdomen and "little or no lung" not in chest
    assert "far from the training scans'" in abdomen  # 3 mm slices; the training scans' 15 mm
    assert "2 with warnings" in printed


def test_generated_scans_get_no_generated_warning(tmp_path, generated_model):
    from conftest import synth_dataset

    data = synth_dataset(tmp_path / "more", 1, (64, 64, 16), seed=9)
    clf = Classifier.load(generated_model, device="cpu")
    for pred in clf.predict_many(sorted(data.rglob("*.nii.gz"))):
        assert pred.ok and not any("generated" in w for w in pred.warnings), pred.warnings
        assert not any("lung" in w or "far from the training" in w for w in pred.warnings), (
            pred.warnings
        )


def test_model_caveats_name_chance_level_and_unknown_metrics(checkpoint):
    clf = Classifier.load(checkpoint, device="cpu")
    assert any("validation metrics are unknown" in c for c in clf.caveats())
    weak = {**TINY_SETTINGS, "validation": {"epoch": 1, "val_acc": 0.5, "val_specificity": 0.0}}
    other = Classifier(clf.network, weak, torch.device("cpu"))
    notes = " ".join(other.caveats())
    assert "little better than chance" in notes and "specificity 0.00" in notes
    good = {**TINY_SETTINGS, "validation": {"epoch": 4, "val_acc": 0.9, "val_auc": 0.95}}
    assert Classifier(clf.network, good, torch.device("cpu")).caveats() == []


def test_default_checkpoint_is_named_as_the_newest_run(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "runs" / "a" / "best_model.pt")
    (tmp_path / "scans").mkdir()
    nifti(tmp_path / "scans" / "s.nii.gz", ct_volume())
    assert infer_main(["scans", "--output", "out", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "runs/a/best_model.pt" in printed and "newest run under runs/" in printed


# --- output folders: one model each, failed inputs retried, usual file modes -----------------------


def test_output_folder_of_another_model_or_threshold_is_refused(tmp_path, checkpoint, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "s.nii.gz", ct_volume())
    out = tmp_path / "out"
    base = [str(folder), "--output", str(out), "--no-progress"]
    assert infer_main([*base, "--checkpoint", str(checkpoint)]) == 0
    before = (out / "predictions.csv").read_bytes()
    assert infer_main([*base, "--checkpoint", str(checkpoint), "--threshold", "0.7"]) == 2
    assert "threshold differ" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    net = CNN3D(filters=TINY_SETTINGS["filters"], dense_units=TINY_SETTINGS["dense_units"])
    torch.save({"network": net.state_dict(), "run_info": TINY_SETTINGS}, other)
    assert infer_main([*base, "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint, sha256 differ" in err and "--overwrite" in err
    assert (out / "predictions.csv").read_bytes() == before
    assert infer_main([*base, "--checkpoint", str(other), "--overwrite"]) == 0
    assert json.loads((out / "model.json").read_text())["checkpoint"] == str(other.resolve())
    assert len(read_rows(out)) == 1


def test_rerun_retries_inputs_that_failed(tmp_path, checkpoint, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "good.nii.gz", ct_volume())
    (folder / "later.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    command = [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
    assert infer_main(command) == 1
    assert {Path(r["path"]).name: bool(r["error"]) for r in read_rows(out)} == {
        "good.nii.gz": False,
        "later.nii.gz": True,
    }
    nifti(folder / "later.nii.gz", ct_volume(seed=4))  # the user fixes the file
    assert infer_main(command) == 0
    assert "1 that failed before are retried" in capsys.readouterr().out
    rows = read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == ["good.nii.gz", "later.nii.gz"]
    assert all(r["prob_abnormal"] and not r["error"] for r in rows)
    assert len(json.loads((out / "predictions.json").read_text())) == 2


def test_outputs_share_the_usual_file_mode(tmp_path, checkpoint):
    import os
    import stat

    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "s.nii.gz", ct_volume())
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        command = [str(folder), "--checkpoint", str(checkpoint), "--output", str(out)]
        assert infer_main([*command, "--report", "--no-progress"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert set(modes) >= {"predictions.csv", "predictions.json", "report.html", "model.json"}
    assert set(modes.values()) == {0o644}, modes


# --- DICOM headers are bounded before any pixel is read --------------------------------------------


def test_prefetched_preparation_keeps_order_and_bounds_lookahead():
    """app.infer prepares scans in a background thread: results come in input order whatever
    each scan's time, at most `ahead` scans are prepared before the consumer asks for them, and a
    consumer that stops early leaves the rest unread."""
    import threading
    import time as _time

    from app.inference.reading import batched, prefetched

    started: list[int] = []
    consumed = 0
    most_ahead = 0
    lock = threading.Lock()

    def prepare(i):
        nonlocal most_ahead
        with lock:
            started.append(i)
            most_ahead = max(most_ahead, len(started) - consumed)
        _time.sleep(0.02 * (i % 3))  # uneven preparation times
        return {"i": i, "thread": threading.current_thread().name}

    out = []
    for r in prefetched(prepare, list(range(12)), ahead=3):
        out.append(r["i"])
        consumed += 1
        assert r["thread"].startswith("ctclassify-read")
    assert out == list(range(12))
    assert most_ahead <= 4  # the `ahead` in flight, plus the one being handed over
    assert [len(b) for b in batched(({"i": i} for i in range(5)), 2)] == [2, 2, 1]
    assert list(prefetched(prepare, [], ahead=3)) == []

    started.clear()
    stream = prefetched(prepare, list(range(50)), ahead=3)
    next(stream)
    stream.close()
    assert len(started) <= 5  # the rest of the 50 were never read


def test_predictions_csv_of_an_older_version_gains_the_fold_column_and_resumes(tmp_path):
    """A predictions.csv written before the fold_probs column: reopened, it is rewritten with
    every column (rows kept, failed ones dropped for retry) and appends whole rows."""
    import csv

    from app.runtime.writer import COLUMNS, PredictionCSV, prediction_row

    path = tmp_path / "predictions.csv"
    path.write_text(
        "path,prob_abnormal,label,warnings,error,seconds\n"
        "a.nii.gz,0.250000,normal,,,0.100\n"
        "b.nii.gz,,,,unreadable,0.010\n"
    )
    log = PredictionCSV(path, keep=lambda r: not r["error"])
    log.append(prediction_row("c.nii.gz", 0.75, "abnormal", fold_probs=[0.7, 0.8]))
    log.close()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert [r["path"] for r in rows] == ["a.nii.gz", "c.nii.gz"]
    assert rows[0]["fold_probs"] == "" and rows[1]["fold_probs"] == "0.700000;0.800000"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", None),
        ("0.5;0.25", [0.5, 0.25]),
        ("0.5;nan", None),
        ("0.5;1.5", None),
        ("-0.1", None),
        ("0.5;x", None),
        ("__import__('os')", None),
        (";".join(["0.5"] * 101), None),
        ("inf", None),
    ],
)
def test_fold_probabilities_read_back_from_a_file_are_checked_data(text, expected):
    from app.runtime.writer import parse_fold_probs

    assert parse_fold_probs(text) == expected


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("prob_abnormal", "abc", id="probability-text"),
        pytest.param("prob_abnormal", "nan", id="probability-nan"),
        pytest.param("prob_abnormal", "7", id="probability-range"),
        pytest.param("label", "", id="no-label"),
        pytest.param("label", "$__import__('os')", id="label-expression"),
        pytest.param("seconds", "x", id="seconds-text"),
        pytest.param("fold_probs", "0.2;zz", id="fold-probs"),
    ],
)
def test_a_corrupted_row_of_predictions_csv_is_retried(tmp_path, checkpoint, field, value, capsys):
    """A row that is not a whole result is never counted as done (and never crashes the
    report): the rerun classifies that input again and the file holds valid rows only."""
    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "a.nii.gz", ct_volume())
    nifti(folder / "b.nii.gz", ct_volume(seed=3))
    out = tmp_path / "out"
    command = [str(folder), "--checkpoint", str(checkpoint), "--output", str(out),
               "--no-progress", "--report"]  # fmt: skip
    assert infer_main(command) == 0
    rows = read_rows(out)
    rows[0][field] = value
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert infer_main(command) == 0
    assert "1 that failed before are retried" in capsys.readouterr().out
    again = read_rows(out)
    assert len(again) == 2 and all(0 <= float(r["prob_abnormal"]) <= 1 for r in again)


def test_an_output_of_another_ensemble_is_refused(tmp_path, checkpoint, capsys):
    """A cross-validation ensemble has a content digest (fold weights and calibration) in
    model.json: another ensemble in the same folder path does not continue its predictions."""
    from app.inference.model_card import ensemble_digest

    cv = tmp_path / "cv"
    for k in range(2):
        (cv / f"fold-{k}").mkdir(parents=True)
        shutil.copy(checkpoint, cv / f"fold-{k}" / "best_model.pt")
    calibration = {"threshold": 0.5, "temperature": 1.0, "threshold_calibrated": 0.5}
    (cv / "cv_calibration.json").write_text(json.dumps(calibration))
    first = ensemble_digest(cv)
    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "a.nii.gz", ct_volume())
    out = tmp_path / "out"
    command = [str(folder), "--checkpoint", str(cv), "--output", str(out), "--no-progress"]
    assert infer_main(command) == 0
    assert json.loads((out / "model.json").read_text())["sha256"] == first
    (cv / "cv_calibration.json").write_text(json.dumps({**calibration, "temperature": 2.0}))
    assert ensemble_digest(cv) != first
    assert infer_main(command) == 2
    assert "another model or setting" in capsys.readouterr().err
    assert infer_main([*command, "--saliency", "--overwrite"]) == 2  # before any work
    assert "--saliency needs one network" in capsys.readouterr().err


def test_test_time_augmentation_averages_the_scan_and_its_mirror(tmp_path, checkpoint, capsys):
    """--tta: P(abnormal) is the mean of the scan's and its left-right mirror's (each classified
    as a file of its own), the spread their standard deviation, in its own output folder."""

    volume = ct_volume(seed=5)
    scan = nifti(tmp_path / "scan.nii.gz", volume)
    mirror = nifti(tmp_path / "mirror.nii.gz", volume[::-1].copy())
    clf = Classifier.load(checkpoint, device="cpu", precision="fp32")
    p, q = clf.predict(scan).prob_abnormal, clf.predict(mirror).prob_abnormal
    assert clf.predict(scan).tta_spread is None
    clf.tta = True
    both = clf.predict(scan)
    assert both.prob_abnormal == pytest.approx((p + q) / 2, abs=2e-6)
    assert p != q and both.tta_spread == pytest.approx(abs(p - q) / 2, abs=2e-6)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(scan, folder / "scan.nii.gz")
    out = tmp_path / "out"
    command = [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--no-progress"]
    assert infer_main([*command, "--tta", "--precision", "fp32"]) == 0
    row = read_rows(out)[0]
    assert float(row["tta_spread"]) == pytest.approx(abs(p - q) / 2, abs=2e-6)
    assert json.loads((out / "predictions.json").read_text())[0]["tta_spread"] is not None
    assert infer_main([*command, "--precision", "fp32"]) == 2  # without --tta: another model
    assert "another model or setting" in capsys.readouterr().err


def test_report_montages_name_the_scan_its_probability_and_orientation(
    tmp_path, checkpoint, montage_titles
):
    """Issue 21: a montage said neither which scan nor what the model gave it."""
    folder = tmp_path / "in"
    folder.mkdir()
    nifti(folder / "patient_7.nii.gz", ct_volume())
    out = tmp_path / "out"
    args = [str(folder), "--checkpoint", str(checkpoint), "--output", str(out), "--report"]
    assert infer_main([*args, "--no-progress"]) == 0
    row = read_rows(out)[0]
    shown = f"patient_7.nii.gz: P(abnormal) {100 * float(row['prob_abnormal']):.2f}% -> "
    assert montage_titles == [shown + row["label"]], montage_titles
    assert (out / "montages").is_dir() and len(list((out / "montages").glob("*.png"))) == 1
