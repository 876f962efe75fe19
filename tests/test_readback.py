"""Files the app wrote, read back as outside data (issue 19): hostile keys and values never run
and are refused naming the file; a resume keeps its split; a fold is finished by its record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import synth_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.readback import (
    ReadBackError,
    check_overrides,
    read_calibration,
    read_cv_summary,
    read_split,
)
from app.train import main as train_main

SMALL = ["--spatial-size", "48", "48", "48", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("rb") / "d", 6, (64, 64, 16), seed=4)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished one-epoch run (seed 11)."""
    run = tmp_path_factory.mktemp("run") / "R"
    args = ["--data", str(data), "--output", str(run), "--epochs", "1", "--seed", "11", *SMALL]
    assert train_main(args) == 0
    return run


@pytest.fixture(scope="module")
def cv_folder(data, tmp_path_factory) -> Path:
    """A finished 2-fold cross-validation of one epoch per fold."""
    out = tmp_path_factory.mktemp("cv") / "cv"
    args = ["--data", str(data), "--output", str(out), "--folds", "2", "--epochs", "1", *SMALL]
    assert train_main(args) == 0
    return out


def resume_with(trained: Path, tmp_path: Path, payload: dict, capsys) -> tuple:
    """A copy of ``trained`` whose overrides.json gained ``payload``, resumed: (run folder,
    its files before, exit status, stderr)."""
    run = tmp_path / "R"
    shutil.copytree(trained, run)
    saved = json.loads((run / "overrides.json").read_text())
    (run / "overrides.json").write_text(json.dumps({**saved, **payload}))
    before = snapshot(run)
    code = train_main(["--output", str(run), "--resume", "--epochs", "2", *SMALL])
    return run, before, code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def payloads(canary: Path, outside: Path) -> list:
    touch = f"$open({str(canary)!r}, 'w').close()"
    return [
        pytest.param({"loss#_target_": "os.system", "loss#command": f"touch {canary}"}, id="id-path-key"),
        pytest.param({"initialize#4#path": str(outside)}, id="write-outside"),
        pytest.param({"loss::_target_": "os.system"}, id="double-colon-key"),
        pytest.param({"_target_": "os.system"}, id="target-key"),
        pytest.param({"$x": 1}, id="expression-key"),
        pytest.param({"@seed": 1}, id="reference-key"),
        pytest.param({"no_such_id": 1}, id="unknown-key"),
        pytest.param({"dropout": touch}, id="expression-value"),
        pytest.param({"dropout": {"_target_": "os.system", "command": f"touch {canary}"}}, id="target-value"),
        pytest.param({"epochs": ["$1"]}, id="nested-expression"),
        pytest.param({"dataset_dir": "%configs/train.yaml#loss"}, id="macro-value"),
        pytest.param({"epochs": "3"}, id="wrong-type"),
        pytest.param({"epochs": [[[[1]]]]}, id="too-deep"),
        pytest.param({"__recipe__": "../../etc/passwd"}, id="recipe-path"),
    ]  # fmt: skip


CANARY = Path("/tmp/ctclassify-canary-readback")
OUTSIDE = Path("/tmp/ctclassify-outside-readback.json")


@pytest.mark.parametrize("payload", payloads(CANARY, OUTSIDE))
def test_resume_refuses_every_hostile_key_and_value_in_overrides(
    trained, tmp_path, payload, capsys
):
    """A run folder's overrides.json with an id-path key (MONAI's parser would build
    ``loss`` as ``os.system("touch ...")``), a key writing outside the run, syntax in a key or
    value, a wrong type: --resume exits 2 naming the file and key; nothing runs or changes."""
    CANARY.unlink(missing_ok=True)
    OUTSIDE.unlink(missing_ok=True)
    run, before, code, err = resume_with(trained, tmp_path, payload, capsys)
    assert code == 2, err
    key = next(iter(payload))
    assert "overrides.json" in err and key.split("#")[0].split("::")[0] in err
    assert not CANARY.exists() and not OUTSIDE.exists()
    assert snapshot(run) == before


def test_cross_validation_resume_refuses_a_fold_payload(cv_folder, data, tmp_path, capsys):
    """A fold's overrides.json is read when a plain ``--folds K`` continues the folder."""
    CANARY.unlink(missing_ok=True)
    out = tmp_path / "cv"
    shutil.copytree(cv_folder, out)
    fold = out / "fold-0"
    saved = json.loads((fold / "overrides.json").read_text())
    saved.update({"loss#_target_": "os.system", "loss#command": f"touch {CANARY}"})
    (fold / "overrides.json").write_text(json.dumps(saved))
    (fold / "finished.json").unlink()  # not finished: the fold is resumed
    args = ["--data", str(data), "--output", str(out), "--folds", "2", "--epochs", "2", *SMALL]
    assert train_main(args) == 2
    assert "fold-0/overrides.json: key 'loss#_target_'" in capsys.readouterr().err
    assert not CANARY.exists()


# every key and value hypothesis can make from config syntax, nesting and wrong types
HOSTILE_TEXT = st.sampled_from(
    ["$1", " $x", "@seed", "%a.yaml#b", "_target_", "a#b", "a::b", "x", "", "é" * 5000]
)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=3),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["epochs", "seed", "dropout", "dataset_dir", "device", "spatial_size", "progress", "loss",
     "loss#_target_", "initialize#4#path", "a::b", "_target_", "_requires_", "$e", "@seed",
     "%m", "__demo__", "__recipe__", "unknown_id", "x" * 200]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_overrides_property_refused_or_plain(saved):
    """Whatever a file holds: refused naming the file, or every accepted key is one of
    app.train's settings (or a run marker) and every value is free of config syntax and passes
    its setting's range check."""
    from app.model_settings import find_config_syntax
    from app.training.settings import SETTING_CHECKS

    try:
        out = check_overrides(saved, "R/overrides.json", SETTING_CHECKS, {}, {"device": {"$ok"}})
    except ReadBackError as exc:
        assert str(exc).startswith("R/overrides.json")
        return
    for key, value in out.items():
        assert key in ("__demo__", "__recipe__") or key in SETTING_CHECKS
        assert find_config_syntax(value) is None
        assert not isinstance(value, dict)
        if key in SETTING_CHECKS:
            assert SETTING_CHECKS[key](value) == value


@settings(max_examples=200, deadline=None)
@given(value=VALUES)
def test_calibration_summary_and_split_readers_refuse_or_check(value, tmp_path_factory):
    """cv_calibration.json, cv_summary.json and split.json with any JSON value: a
    ReadBackError naming the file, or checked values (numbers in range, 0/1 labels)."""
    folder = tmp_path_factory.mktemp("h")
    for name, reader in (
        ("cv_calibration.json", read_calibration),
        ("cv_summary.json", read_cv_summary),
        ("split.json", read_split),
    ):
        path = folder / name
        path.write_text(json.dumps(value))
        try:
            out = reader(path)
        except ReadBackError as exc:
            assert str(path) in str(exc)
            continue
        if name == "cv_calibration.json":
            assert 0 <= out["threshold"] <= 1 and out["temperature"] > 0
        if name == "split.json":
            assert all(i["label"] in (0, 1) for i in out["training"] + out["validation"])


@pytest.mark.parametrize(
    "name, content, message",
    [
        pytest.param("cv_calibration.json", {"temperature": "$exec('x')"}, "key 'temperature'", id="calibration-expression"),
        pytest.param("cv_calibration.json", {"threshold_calibrated": 2.0}, "key 'threshold_calibrated'", id="calibration-range"),
        pytest.param("cv_calibration.json", {"x#_target_": "os.system"}, "key 'x#_target_'", id="calibration-key"),
        pytest.param("cv_summary.json", {"mean_sd": {"val_auc": {"mean": "$1", "sd": 0}}}, "key 'mean_sd'", id="summary-expression"),
        pytest.param("fold-0/finished.json", {"epoch": "$1", "reason": "x"}, "key 'epoch'", id="finished-expression"),
    ],
)  # fmt: skip
def test_infer_on_a_cv_folder_refuses_hostile_records(
    cv_folder, data, tmp_path, name, content, message, capsys
):
    """Each record app.infer/app.train read from a CV folder, made hostile: exit 2, the file
    and key named, no prediction written."""
    from app.infer import main as infer_main

    out = tmp_path / "cv"
    shutil.copytree(cv_folder, out)
    path = out / name
    before = json.loads(path.read_text())
    path.write_text(json.dumps({**before, **content}))
    if name.endswith("finished.json"):
        args = ["--data", str(data), "--output", str(out), "--folds", "2", "--epochs", "1"]
        code = train_main([*args, *SMALL])
    else:
        code = infer_main([str(data / "CT-0"), "--checkpoint", str(out), "--output",
                           str(tmp_path / "I"), "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert name.split("/")[-1] in err and message in err
    assert not (tmp_path / "I" / "predictions.csv").exists()


def test_metrics_csv_read_back_is_checked(trained, tmp_path):
    from app.run_folder import read_metrics

    good = read_metrics(trained / "metrics.csv")
    assert good and good[0]["epoch"] == 1
    path = tmp_path / "metrics.csv"
    for text, where in (
        ("epoch,val_acc\n1,$__import__('os')\n", "column 'val_acc'"),
        ("epoch,val_acc\nx,0.5\n", "column 'epoch'"),
        ("epoch,loss#_target_\n1,0.5\n", "column 'loss#_target_'"),
        ("epoch,val_acc\n1,nan\n", "column 'val_acc'"),
        ("epoch,val_acc\n1,0.5,7\n", "not one value per column"),
    ):
        path.write_text(text)
        with pytest.raises(ReadBackError, match=str(path)) as exc:
            read_metrics(path)
        assert where in str(exc.value)


def test_resume_on_another_seed_or_data_is_refused_naming_what_differs(
    trained, data, tmp_path, capsys
):
    """The split is recorded; a resume that would make another (seed, data) is refused."""
    from app.data.datalist import find_items, make_split

    split = read_split(trained / "split.json")
    assert split["record"]["seed"] == 11 and split["record"]["folds"] == 0
    expected = make_split(find_items(data), train_fraction=0.7, seed=11)
    assert [i["image"] for i in split["validation"]] == [
        str(i["image"]) for i in expected["validation"]
    ]
    run = tmp_path / "R"
    shutil.copytree(trained, run)
    before = snapshot(run)
    assert (
        train_main(["--output", str(run), "--resume", "--epochs", "2", "--seed", "12", *SMALL]) == 2
    )
    assert "seed 11 (recorded) vs 12 (now)" in capsys.readouterr().err
    assert snapshot(run) == before
    more = tmp_path / "d"
    shutil.copytree(data, more)
    shutil.copy(next((more / "CT-0").glob("*.nii.gz")), more / "CT-0" / "extra.nii.gz")
    args = ["--output", str(run), "--resume", "--epochs", "2", "--data", str(more)]
    assert train_main([*args, *SMALL]) == 2
    assert "data " in capsys.readouterr().err
    # the same data under the same path, one scan more: named as added
    saved = json.loads((run / "overrides.json").read_text())
    saved["dataset_dir"] = str(more)
    (run / "overrides.json").write_text(json.dumps(saved))
    text = (run / "split.json").read_text().replace(json.dumps(str(data))[1:-1], str(more))
    (run / "split.json").write_text(text)
    assert train_main(["--output", str(run), "--resume", "--epochs", "2", *SMALL]) == 2
    assert "1 scans added" in capsys.readouterr().err
    (run / "split.json").unlink()
    assert train_main(["--output", str(run), "--resume", "--epochs", "2", *SMALL]) == 2
    assert "split.json is missing" in capsys.readouterr().err


def test_cross_validation_with_another_k_is_refused(cv_folder, data, tmp_path, capsys):
    out = tmp_path / "cv"
    shutil.copytree(cv_folder, out)
    before = snapshot(out)
    args = ["--data", str(data), "--output", str(out), "--epochs", "1", *SMALL]
    assert train_main([*args, "--folds", "3"]) == 2
    assert "made with --folds 2" in capsys.readouterr().err
    assert train_main([*args, "--folds", "3", "--fold", "2"]) == 2  # a new fold of another K
    assert snapshot(out) == before


def test_a_fold_counts_as_finished_only_by_its_record(cv_folder, data, tmp_path, capsys):
    """A fold with best_model.pt but no finished record (a parallel job mid-training) is not
    summarised; the record is written when its training ends."""
    from app.run_folder import is_finished

    assert all(is_finished(cv_folder / f"fold-{k}") for k in range(2))
    out = tmp_path / "cv"
    shutil.copytree(cv_folder, out)
    for name in ("cv_summary.json", "cv_calibration.json"):
        (out / name).unlink()
    (out / "fold-1" / "finished.json").unlink()
    args = ["--data", str(data), "--output", str(out), "--folds", "2", "--epochs", "1", *SMALL]
    assert train_main([*args, "--fold", "0"]) == 0
    assert "folds still to run" in capsys.readouterr().out
    assert not (out / "cv_summary.json").exists()
    assert train_main(args) == 0  # fold-1 resumed: its record says done; the summary follows
    assert (out / "cv_summary.json").exists() and is_finished(out / "fold-1")


def test_too_many_folds_leave_no_folder_behind(data, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["--data", str(data), "--output", str(out), "--folds", "7", "--epochs", "1", *SMALL]
    assert train_main(args) == 2
    assert "7 folds need at least 7 scans of each class" in capsys.readouterr().err
    assert not out.exists()


def test_a_last_training_batch_of_one_scan_trains(data, tmp_path):
    """7 training scans in batches of 2 at 48^3 (one voxel per channel in the last block):
    BatchNorm cannot normalise a batch of one there; the last one-scan batch is dropped."""
    scans = sorted(data.rglob("*.nii.gz"))
    rows = [{"image": str(p), "label": int(p.parent.name != "CT-0")} for p in scans]
    normal = [r for r in rows if r["label"] == 0][:5]
    abnormal = [r for r in rows if r["label"] == 1][:4]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps(normal + abnormal))
    run = tmp_path / "R"
    args = ["--data", str(datalist), "--output", str(run), "--epochs", "1", "--batch-size", "2"]
    assert train_main([*args, *SMALL]) == 0
    assert len(read_split(run / "split.json")["training"]) == 7


def steering(outside: Path) -> list:
    """overrides.json values of the right kind that would steer a resumed run (issue 31)."""
    return [
        pytest.param({"cache": "disk", "cache_dir": str(outside)}, "cache_dir", id="cache-outside"),
        pytest.param({"is_not_rank0": True}, "is_not_rank0", id="internal-id"),
        pytest.param({"threshold": 0.01}, "threshold", id="threshold"),
        pytest.param({"class_names": ["abnormal", "normal"]}, "class_names", id="swapped-classes"),
        pytest.param({"filters": [4, 4, 8, 16]}, "filters", id="changed-filters"),
        pytest.param({"hu_window": [400, -1000]}, "hu_window", id="window-reversed"),
        pytest.param({"axcodes": "XYZ"}, "axcodes", id="axcodes"),
        pytest.param({"precision": "foo"}, "precision", id="precision"),
        pytest.param({"val_interval": 0}, "val_interval", id="val-interval-0"),
        pytest.param({"batch_size": 0}, "batch_size", id="batch-size-0"),
        pytest.param({"num_workers": -1}, "num_workers", id="workers-negative"),
        pytest.param({"lung_flatten_mm": 1e300}, "lung_flatten_mm", id="flatten-huge"),
        pytest.param({"split": None}, "split", id="split-null"),
        pytest.param({"device": "cpu"}, "device", id="device-text"),
        pytest.param({"resume": False}, "resume", id="resume"),
    ]  # fmt: skip


@pytest.mark.parametrize("payload, key", steering(Path("/tmp/ctclassify-outside-cache")))
def test_resume_refuses_values_that_would_steer_the_run_in_one_line(
    trained, tmp_path, payload, key, capsys
):
    """Each value is of a kind the file may hold, yet would write outside the run folder,
    discard an epoch, change what the checkpoints say the model is, or crash deep inside MONAI:
    one error line naming the key (exit 2), never a traceback; nothing written anywhere."""
    outside = Path("/tmp/ctclassify-outside-cache")
    shutil.rmtree(outside, ignore_errors=True)
    run, before, code, err = resume_with(trained, tmp_path, payload, capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert key in err
    assert not outside.exists() and snapshot(run) == before


@pytest.mark.parametrize(
    "args, key",
    [
        (["--spatial-size", "32", "32", "16"], "spatial_size"),
        (["--batch-size", "0"], "batch_size"),
        (["--workers", "-1"], "num_workers"),
        (["--set", "lung_flatten_mm=1e300"], "lung_flatten_mm"),
        (["--set", "hu_window=[400, -1000]"], "hu_window"),
        (["--set", "resume=false"], "resume"),
        (["--folds", "1"], "folds"),
    ],
)
def test_settings_out_of_range_on_the_command_line_are_one_line(data, tmp_path, args, key, capsys):
    """Checked before anything is made: one error line naming the setting, exit 2, no run
    folder (``--spatial-size 32 32 16`` ended in 'CNN3D needs at least 46 voxels' deep in
    MONAI)."""
    out = tmp_path / "R"
    small = [a for a in SMALL if a not in ("--spatial-size", "48")]
    code = train_main(["--data", str(data), "--output", str(out), "--epochs", "1", *small, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and key in err and err.startswith("error:"), err
    assert not out.exists()


def test_a_checkpoint_too_small_for_its_network_is_refused_in_one_line(tmp_path, capsys):
    """app.infer with a checkpoint whose spatial_size is [8, 8, 8]: one line, exit 2."""
    import torch
    from conftest import TINY_SETTINGS, ct_volume, nifti

    from app.infer import main as infer_main
    from nets.cnn3d import CNN3D

    net = CNN3D(filters=TINY_SETTINGS["filters"], dense_units=TINY_SETTINGS["dense_units"])
    path = tmp_path / "small.pt"
    torch.save({"network": net.state_dict(),
                "run_info": {**TINY_SETTINGS, "spatial_size": [8, 8, 8]}}, path)  # fmt: skip
    nifti(tmp_path / "a.nii.gz", ct_volume())
    code = infer_main([str(tmp_path / "a.nii.gz"), "--checkpoint", str(path), "--output",
                       str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "at least 46 voxels" in err, err
