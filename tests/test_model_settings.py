"""Settings from checkpoints and bundles are data: config syntax anywhere is refused, never run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_SETTINGS

from app.inference.classifier import CheckpointError, Classifier
from app.model_settings import SettingsError, validate_settings
from nets.cnn3d import CNN3D


def payload(marker: Path) -> str:
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or 0.3"


def hostile_settings(marker: Path) -> list:
    """(id, settings) pairs, each hiding config syntax in another place."""
    code = payload(marker)
    cases = {
        "top-level-expression": {"dropout": code},
        "nested-in-list": {"filters": [code, 4, 8, 8]},
        "class-name": {"class_names": ["normal", code]},
        "reference": {"dense_units": "@dense_units"},
        "macro": {"hu_window": "%configs/common.yaml#hu_window"},
        "target-dict": {"filters": {"_target_": "os.system", "command": f"touch {marker}"}},
        "nested-dict": {"training_data": {"source": code}},
        "unknown-field": {"notes": {"deep": [[code]]}},
        "requires-key": {"bn_eps": {"_requires_": code}},
        "leading-space": {"axcodes": f"  {code}"},
    }
    return [(name, {**copy.deepcopy(TINY_SETTINGS), **change}) for name, change in cases.items()]


CASE_IDS = [name for name, _ in hostile_settings(Path("m"))]


def write_checkpoint(path: Path, settings: dict) -> Path:
    torch.manual_seed(0)
    net = CNN3D(filters=[4, 4, 8, 8], dense_units=8)
    torch.save({"network": net.state_dict(), "run_info": settings}, path)
    return path


def write_bundle(root: Path, settings: dict) -> Path:
    """An exported bundle's layout with ``settings`` as its ``run_settings``."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    config = {"network_def": {"_target_": "scripts.nets.cnn3d.CNN3D"}, "run_settings": settings}
    (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    torch.save(
        CNN3D(filters=[4, 4, 8, 8], dense_units=8).state_dict(), root / "models" / "model.pt"
    )
    return root


@pytest.fixture
def scans(tmp_path) -> Path:
    from conftest import ct_volume, nifti

    folder = tmp_path / "scans"
    folder.mkdir()
    nifti(folder / "a.nii.gz", ct_volume((48, 48, 20)))
    return folder


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("carrier", ["checkpoint", "bundle"])
def test_config_syntax_anywhere_is_refused_and_never_runs(tmp_path, scans, carrier, case, capsys):
    from app.export import main as export_main
    from app.infer import main as infer_main

    marker = tmp_path / "pwned"
    settings = dict(hostile_settings(marker))[case]
    if carrier == "checkpoint":
        source = write_checkpoint(tmp_path / "evil.pt", settings)
    else:
        source = write_bundle(tmp_path / "evil_bundle", settings)
    out = tmp_path / "out"
    code = infer_main([str(scans), "--checkpoint", str(source), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "never evaluated" in err and str(source) in err, err
    with pytest.raises(CheckpointError, match="refused"):
        Classifier.load(source, device="cpu")
    assert export_main(["--checkpoint", str(source), "--output", str(tmp_path / "b")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    assert not (out / "predictions.csv").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        pytest.param("spatial_size", "128", "a list of 3", id="size-string"),
        pytest.param("spatial_size", [128, 128], "a list of 3", id="size-two"),
        pytest.param("spatial_size", [128, 128, True], "an integer", id="size-bool"),
        pytest.param("filters", [4, 4.5, 8, 8], "an integer", id="filters-float"),
        pytest.param("filters", [4] * 9, "a list of 1 to 8", id="filters-long"),
        pytest.param("hu_window", [400, -1000], "low < high", id="window-reversed"),
        pytest.param("hu_window", [float("nan"), 400], "a number", id="window-nan"),
        pytest.param("axcodes", "LAL", "one of L/R", id="axcodes-repeat"),
        pytest.param("axcodes", "XYZ", "one of L/R", id="axcodes-letters"),
        pytest.param("dropout", 1.0, "a number in", id="dropout-one"),
        pytest.param("threshold", 2, "a number in", id="threshold-range"),
        pytest.param("class_names", ["a"], "a list of 2", id="one-class"),
        pytest.param("class_names", ["ok", "<script>"], "a short name", id="class-markup"),
        pytest.param("dense_units", 10**9, "an integer in", id="huge-dense"),
        pytest.param("norm", "layer", "one of batch, group", id="norm-unknown"),
        pytest.param("norm", ["group"], "one of batch, group", id="norm-list"),
        pytest.param("lung_flatten_mm", "20", "a number in", id="flatten-string"),
        pytest.param("lung_flatten_mm", -1.0, "a number in", id="flatten-negative"),
        pytest.param("lung_flatten_mm", float("nan"), "a number in", id="flatten-nan"),
        pytest.param("lung_flatten_mm", 1e6, "a number in", id="flatten-huge"),
    ],
)
def test_wrong_types_and_ranges_name_the_file_and_field(tmp_path, field, value, message):
    path = write_checkpoint(tmp_path / "bad.pt", {**TINY_SETTINGS, field: value})
    with pytest.raises(CheckpointError) as info:
        Classifier.load(path, device="cpu")
    assert str(path) in str(info.value) and repr(field) in str(info.value)
    assert message in str(info.value)


def test_valid_settings_come_back_as_new_plain_values():
    settings = {**TINY_SETTINGS, "axcodes": "las", "spatial_size": (48, 48, 48), "extra": [1]}
    checked = validate_settings(settings, "x.pt")
    assert checked["axcodes"] == "LAS" and checked["spatial_size"] == [48, 48, 48]
    assert "extra" not in checked
    assert checked["filters"] is not settings["filters"]


def test_aliases_that_multiply_a_list_are_bounded():
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(7)
    )
    loaded = yaml.safe_load(text)  # 10 * 8**7 values if walked naively
    with pytest.raises(SettingsError, match="values in all|nested deeper"):
        validate_settings({**TINY_SETTINGS, "notes": loaded}, "bomb.yaml")


def test_norm_is_read_from_the_checkpoint_and_older_ones_mean_batch(tmp_path):
    """A checkpoint names its blocks' normalisation; one written before the setting existed
    holds BatchNorm; weights of another normalisation do not fit and say so."""
    from nets.cnn3d import CNN3D

    assert "norm" not in TINY_SETTINGS  # as checkpoints of earlier versions
    old = Classifier.load(write_checkpoint(tmp_path / "old.pt", TINY_SETTINGS), device="cpu")
    assert old.settings["norm"] == "batch"
    assert isinstance(old.network.features[0].bn, torch.nn.BatchNorm3d)
    torch.manual_seed(0)
    net = CNN3D(filters=[4, 4, 8, 8], dense_units=8, norm="group")
    path = tmp_path / "group.pt"
    torch.save({"network": net.state_dict(), "run_info": {**TINY_SETTINGS, "norm": "group"}}, path)
    loaded = Classifier.load(path, device="cpu")
    assert isinstance(loaded.network.features[0].bn, torch.nn.GroupNorm)
    x = torch.rand(1, 1, 48, 48, 48)
    torch.testing.assert_close(loaded.network(x), net.eval()(x))
    mismatch = write_checkpoint(tmp_path / "mismatch.pt", {**TINY_SETTINGS, "norm": "group"})
    with pytest.raises(CheckpointError, match="do not fit"):
        Classifier.load(mismatch, device="cpu")
