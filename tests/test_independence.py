"""Independence of a test set, checked by content (issue 31): a test scan the model trained or
validated on is found whatever its path (a relative path recorded from another folder, a copy,
a hard link, a checkpoint copied out of its run folder, an exported bundle), and where nothing
can be compared the evaluation says "unknown", never true."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import synth_dataset

from app.errors import UsageError
from app.evaluation.workflow import evaluate

SMALL = ["--spatial-size", "48", "48", "48", "--device", "cpu", "--no-progress"]
QUICK = {"device": "cpu", "n_resamples": 200}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A run trained from a relative path (``--data synth``, as a user types it) in ``work``."""
    from app.train import main as train_main

    work = tmp_path_factory.mktemp("work")
    synth_dataset(work / "synth", 4, (48, 48, 16), seed=21)
    before = os.getcwd()
    os.chdir(work)
    try:
        assert train_main(["--data", "synth", "--output", "run", "--epochs", "1", *SMALL]) == 0
    finally:
        os.chdir(before)
    return work


@pytest.fixture(scope="module")
def new_scans(tmp_path_factory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("new") / "test", 3, (48, 48, 16), seed=77)


def _trained_scans(work: Path) -> list[Path]:
    return sorted((work / "synth").rglob("*.nii.gz"))


def _copies(work: Path, dest: Path, link: bool) -> Path:
    """A labelled test folder of copies (or hard links) of the training data, renamed."""
    for i, scan in enumerate(_trained_scans(work)):
        target = dest / scan.parent.name / f"renamed-{i}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        (os.link if link else shutil.copy)(scan, target)
    return dest


def test_split_records_the_folder_relative_paths_were_given_in(work, tmp_path, monkeypatch):
    from app.readback import read_split

    recorded = json.loads((work / "run" / "split.json").read_text())
    assert recorded["base"] == str(work)
    assert all(not Path(i["image"]).is_absolute() for i in recorded["training"])
    monkeypatch.chdir(tmp_path)  # read from elsewhere: the same files
    split = read_split(work / "run" / "split.json")
    assert all(Path(i["image"]).is_file() for i in split["training"] + split["validation"])
    assert Path(split["record"]["dataset_dir"]) == work / "synth"


def test_training_scans_by_a_relative_path_are_found_from_another_folder(
    work, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"8 of the 8 test scans were used by the model"):
        evaluate(work / "synth", work / "run", **QUICK)
    result = evaluate(work / "synth", work / "run", allow_overlap=True, **QUICK)
    assert result.independent is False and result.overlap["scans"] == 8
    # the baseline finds the training scans too (it became null when paths were cwd-relative)
    assert result.baseline is not None and result.baseline["trained_on"] >= 4


@pytest.mark.parametrize("link", [False, True], ids=["copies", "hard-links"])
def test_copies_and_hard_links_of_training_scans_are_found_by_content(work, tmp_path, link):
    test = _copies(work, tmp_path / "test", link)
    with pytest.raises(UsageError, match=r"same content"):
        evaluate(test, work / "run", **QUICK)


def test_a_checkpoint_copied_out_of_its_run_folder_still_knows_its_scans(work, new_scans, tmp_path):
    alone = tmp_path / "alone" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(work / "run" / "best_model.pt", alone)
    with pytest.raises(UsageError, match=r"same content"):
        evaluate(_copies(work, tmp_path / "test", False), alone, **QUICK)
    result = evaluate(new_scans, alone, tmp_path / "E", **QUICK)
    assert result.independent is True
    summary = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert summary["independent"] is True and "by content" in summary["independence"]
    # no split.json beside it: no baseline, and metrics.json says why
    assert summary["baseline"] is None and "not recorded" in summary["baseline_note"]


def test_an_exported_bundle_carries_the_hashes_and_nothing_of_the_paths(work, new_scans, tmp_path):
    from app.export import main as export_main

    bundle = tmp_path / "bundle"
    assert (
        export_main(["--checkpoint", str(work / "run"), "--output", str(bundle), "--no-onnx"]) == 0
    )
    record = json.loads((bundle / "configs" / "training_scans.json").read_text())
    assert (
        len(record["scan_sha256"]["training"]) + len(record["scan_sha256"]["validation"]) == 8 * 64
    )
    assert "scan_sha256" not in (bundle / "configs" / "inference.yaml").read_text()
    assert str(work) not in (bundle / "configs" / "training_scans.json").read_text()
    with pytest.raises(UsageError, match=r"same content"):
        evaluate(_copies(work, tmp_path / "test", True), bundle, **QUICK)
    assert evaluate(new_scans, bundle, **QUICK).independent is True
    # without its record the bundle cannot tell: unknown, never true
    (bundle / "configs" / "training_scans.json").unlink()
    assert evaluate(new_scans, bundle, **QUICK).independent == "unknown"


def test_nothing_to_compare_is_unknown_in_metrics_console_and_report(
    checkpoint, new_scans, tmp_path, capsys
):
    """conftest's checkpoint records no hashes and has no split.json beside it."""
    from app.evaluate import main

    args = ["--data", str(new_scans), "--checkpoint", str(checkpoint), "--output",
            str(tmp_path / "E"), "--device", "cpu", "--bootstrap", "200", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "INDEPENDENCE UNKNOWN: the model records no content hashes" in printed
    summary = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert summary["independent"] == "unknown"
    page = (tmp_path / "E" / "report.html").read_text()
    assert "INDEPENDENCE UNKNOWN" in page and "(independence unknown)" in page


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"scan_sha256": {"training": "zz", "validation": ""}}', "hexadecimal"),
        ('{"scan_sha256": {"training": ""}}', "'training' and 'validation'"),
        ('{"scan_sha256": {"training": "", "validation": ""}, "x": 1}', "one key"),
        ('{"scan_sha256": "$print(1)"}', "config syntax"),
        ("[1, 2", "cannot be read"),
    ],
)
def test_a_bundles_hash_record_is_data_checked_before_use(work, tmp_path, content, match):
    """configs/training_scans.json comes from outside: its content is checked, never run."""
    from app.inference.checkpoints import CheckpointError, load_checkpoint

    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    shutil.copy(work / "run" / "best_model.pt", bundle / "models" / "model.pt")
    import torch
    import yaml

    data = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save(data["network"], bundle / "models" / "model.pt")
    (bundle / "configs" / "metadata.json").write_text("{}")
    (bundle / "configs" / "inference.yaml").write_text(
        yaml.safe_dump({"run_settings": {**data["run_info"]}})
    )
    (bundle / "configs" / "training_scans.json").write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bundle / "models" / "model.pt")
