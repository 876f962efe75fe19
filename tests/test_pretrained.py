"""Starting weights (app.train --init): the packaged network pretrained on generated scans, and
any checkpoint of app.train; refused when damaged, unsafe or of another network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_SETTINGS, synth_dataset

from app.model_settings import MODEL_DEFAULTS
from app.training import pretrained
from app.training.pretrained import InitWeightsError, initialize_network
from nets.cnn3d import CNN3D

ARCH = {k: TINY_SETTINGS.get(k) for k in ("in_channels", "filters", "dense_units")}


def tiny_net(seed: int) -> CNN3D:
    torch.manual_seed(seed)
    return CNN3D(filters=TINY_SETTINGS["filters"], dense_units=TINY_SETTINGS["dense_units"])


def save(path: Path, net: torch.nn.Module, **settings) -> Path:
    torch.save({"network": net.state_dict(), "run_info": {**TINY_SETTINGS, **settings}}, path)
    return path


def test_weights_of_a_checkpoint_replace_the_initialisation(tmp_path):
    source, target = tiny_net(1), tiny_net(2)
    path = save(tmp_path / "best_model.pt", source)
    assert not torch.equal(target.features[0].conv.weight, source.features[0].conv.weight)
    initialize_network(target, str(tmp_path), ARCH)  # a run folder names its best_model.pt
    for (name, mine), theirs in zip(
        target.state_dict().items(), source.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name
    assert pretrained.describe(str(path)) == {
        "name": "best_model.pt",
        "sha256": pretrained.sha256_of(path),
    }
    assert initialize_network(target, "", ARCH) is target and pretrained.describe("") is None


def test_another_network_is_refused_naming_what_differs(tmp_path):
    path = save(tmp_path / "w.pt", tiny_net(1))
    with pytest.raises(InitWeightsError, match=r"filters \[4, 4, 8, 8\] there, \[8, 8, 16, 16\]"):
        initialize_network(CNN3D(filters=[8, 8, 16, 16], dense_units=8), str(path), {
            **ARCH, "filters": [8, 8, 16, 16]})  # fmt: skip
    # settings that agree but weights that do not (a hand-edited file): refused by shape
    with pytest.raises(InitWeightsError, match="do not fit"):
        initialize_network(CNN3D(filters=[8, 8, 16, 16], dense_units=8), str(path), {})


@pytest.mark.parametrize("damage", ["nan", "pickle", "missing", "truncated", "no-settings"])
def test_damaged_or_unsafe_weights_are_refused(tmp_path, damage):
    path = tmp_path / "w.pt"
    net = tiny_net(1)
    if damage == "nan":
        state = net.state_dict()
        state["features.0.conv.weight"][0, 0, 0, 0, 0] = float("nan")
        torch.save({"network": state, "run_info": TINY_SETTINGS}, path)
    elif damage == "pickle":
        # an object beside the weights: loading it would run its class's code
        state = {"network": net.state_dict(), "run_info": TINY_SETTINGS}
        torch.save({**state, "x": argparse.Namespace(a=1)}, path)
    elif damage == "truncated":
        save(path, net)
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "no-settings":
        torch.save({"network": net.state_dict()}, path)
    with pytest.raises(InitWeightsError, match=r"--init"):
        initialize_network(tiny_net(2), str(path), ARCH)


def test_packaged_weights_must_match_their_recorded_digest(tmp_path, monkeypatch):
    weights, record = tmp_path / "generated.pt", tmp_path / "generated.json"
    monkeypatch.setattr(pretrained, "packaged_weights", lambda: (weights, record))
    with pytest.raises(InitWeightsError, match="missing"):
        pretrained.resolve("generated")
    save(weights, tiny_net(1))
    record.write_text(json.dumps({"sha256": pretrained.sha256_of(weights)}))
    net = initialize_network(tiny_net(2), "generated", ARCH)
    assert torch.equal(net.features[0].conv.weight, tiny_net(1).features[0].conv.weight)
    assert pretrained.describe("generated")["name"] == "generated"
    save(weights, tiny_net(3))  # replaced after the record was made
    with pytest.raises(InitWeightsError, match="does not match the SHA-256"):
        initialize_network(tiny_net(2), "generated", ARCH)
    record.write_text("{not json")
    with pytest.raises(InitWeightsError, match="unreadable"):
        pretrained.resolve("generated")


def test_the_shipped_weights_fit_the_small_data_recipe():
    """nets/weights/generated.pt: its digest is the recorded one, it loads without unpickling
    objects, holds finite weights, and starts the small-data recipe's network."""
    from app.config import load_config
    from app.training.recipes import recipe_file

    weights, record = pretrained.packaged_weights()
    assert json.loads(record.read_text())["sha256"] == pretrained.sha256_of(weights)
    assert weights.stat().st_size < 8e6  # a few MB: shipped in the package
    parser = load_config("train.yaml", recipe_file("small-data"))
    net = parser.get_parsed_content("network_def")
    settings = {k: parser.get_parsed_content(k) for k in pretrained.ARCHITECTURE}
    initialize_network(net, "generated", settings)
    state = torch.load(weights, weights_only=True)["network"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # the input the weights were pretrained on is the recipe's (the lung crop, the flattening)
    shipped = {**MODEL_DEFAULTS, **json.loads(record.read_text())["settings"]}
    for key in pretrained.INPUT:
        assert shipped[key] == parser.get_parsed_content(key), key


def test_train_init_records_its_start_and_refuses_a_misfit(tmp_path, capsys):
    from test_train import TINY

    from app.train import main as train_main

    data = synth_dataset(tmp_path / "d", 4, (48, 48, 12), seed=5)
    first, second = tmp_path / "A", tmp_path / "B"
    assert train_main(["--data", str(data), "--output", str(first), *TINY, "--epochs", "1"]) == 0
    args = ["--data", str(data), "--output", str(second), *TINY, "--epochs", "1"]
    assert train_main([*args, "--init", str(first), "--lr", "1e-12"]) == 0
    # the network trained is the one loaded: with a negligible step its weights stay A's
    mine = torch.load(second / "best_model.pt", weights_only=True)["network"]
    theirs = torch.load(first / "best_model.pt", weights_only=True)["network"]
    for name, value in theirs.items():
        if name.endswith("weight"):
            torch.testing.assert_close(mine[name], value, atol=1e-6, rtol=0)
    info = torch.load(second / "best_model.pt", weights_only=True)["run_info"]["init_weights"]
    assert info == {
        "name": "best_model.pt",
        "sha256": pretrained.sha256_of(first / "best_model.pt"),
    }
    capsys.readouterr()
    misfit = ["--set", "dense_units=16", "--overwrite"]
    assert train_main([*args, "--init", str(first), *misfit]) == 2
    err = capsys.readouterr().err
    assert "dense_units" in err and "Traceback" not in err


def test_pretrain_writes_weights_that_start_a_recipe_run(tmp_path, monkeypatch):
    """python -m app.pretrain on a tiny configuration: data, run, weights and their record (the
    SHA-256 of the file, no folder of this machine); the weights load as --init generated; a
    second run reuses the data and the finished run and writes the same record."""
    from app import pretrain
    from app.training import pretraining

    tiny = {**pretraining.pretrain_settings(), "per_class": 3, "in_plane": [48],
            "slices": [12, 12], "epochs": 1}  # fmt: skip
    monkeypatch.setattr(pretraining, "pretrain_settings", lambda: dict(tiny))
    work, out = tmp_path / "work", tmp_path / "weights"
    assert pretrain.main(["--work", str(work), "--out", str(out), "--no-progress"]) == 0
    weights, record = out / "generated.pt", out / "generated.json"
    text = record.read_text()
    assert json.loads(text)["sha256"] == pretrained.sha256_of(weights)
    assert str(tmp_path) not in text and json.loads(text)["pretraining"]["scans"] == 6
    assert len(list((work / "data").rglob("*.nii.gz"))) == 6
    monkeypatch.setattr(pretrained, "packaged_weights", lambda: (weights, record))
    from app.config import load_config
    from app.training.recipes import recipe_file

    parser = load_config("train.yaml", recipe_file("small-data"), overrides=tiny["settings"])
    settings = {k: parser.get_parsed_content(k) for k in pretrained.ARCHITECTURE}
    initialize_network(parser.get_parsed_content("network_def"), "generated", settings)
    assert pretrain.main(["--work", str(work), "--out", str(out), "--no-progress"]) == 0
    assert record.read_text() == text


def test_the_small_data_recipe_starts_from_the_packaged_weights(tmp_path, capsys):
    """--recipe small-data as shipped starts from nets/weights/generated.pt and records it; a
    changed network is refused with the way out; --init '' trains from random weights."""
    from test_train import TINY

    from app.train import main as train_main

    data = synth_dataset(tmp_path / "d", 3, (48, 48, 12), seed=6)
    tiny = [a for a in TINY if a not in ("--spatial-size", "48")]  # the recipe's own size
    run = tmp_path / "R"
    args = ["--data", str(data), "--recipe", "small-data", *tiny, "--epochs", "1"]
    assert train_main([*args, "--output", str(run)]) == 0
    info = torch.load(run / "best_model.pt", weights_only=True)["run_info"]["init_weights"]
    weights, _ = pretrained.packaged_weights()
    assert info == {"name": "generated", "sha256": pretrained.sha256_of(weights)}
    capsys.readouterr()
    narrow = ["--set", "filters=[4, 4, 4, 4]", "--output", str(tmp_path / "N")]
    assert train_main([*args, *narrow]) == 2
    assert "--init '' starts from random weights" in capsys.readouterr().err
    assert train_main([*args, *narrow, "--overwrite", "--init", ""]) == 0
    info = torch.load(tmp_path / "N" / "best_model.pt", weights_only=True)["run_info"]
    assert info.get("init_weights") is None


def test_a_resume_keeps_its_start_record_without_the_init_file(tmp_path):
    from test_train import TINY

    from app.train import main as train_main

    data = synth_dataset(tmp_path / "d", 4, (48, 48, 12), seed=5)
    first, second = tmp_path / "A", tmp_path / "B"
    assert train_main(["--data", str(data), "--output", str(first), *TINY, "--epochs", "1"]) == 0
    args = ["--data", str(data), "--output", str(second), *TINY]
    assert train_main([*args, "--epochs", "1", "--init", str(first / "best_model.pt")]) == 0
    record = torch.load(second / "best_model.pt", weights_only=True)["run_info"]["init_weights"]
    (first / "best_model.pt").unlink()  # the starting weights are gone: the resume needs none
    assert train_main(["--output", str(second), "--resume", *TINY[2:], "--epochs", "3"]) == 0
    again = torch.load(second / "best_model.pt", weights_only=True)["run_info"]["init_weights"]
    assert again == record and record["name"] == "best_model.pt"


@pytest.mark.parametrize("head", ["softmax", "coral"])
def test_a_severity_network_starts_from_binary_weights_with_a_fresh_read_out(tmp_path, head):
    """`--task severity --init generated`: every weight the binary network has is taken; the
    severity read-out (CORAL's offsets; a softmax head's last layer, one row per grade) keeps
    its initial values."""
    source = tiny_net(1)
    path = save(tmp_path / "best_model.pt", source)
    torch.manual_seed(2)
    target = CNN3D(filters=TINY_SETTINGS["filters"], dense_units=TINY_SETTINGS["dense_units"],
                   grades=5, ordinal_head=head)  # fmt: skip
    before = {k: v.clone() for k, v in target.state_dict().items()}
    initialize_network(target, str(path), {**ARCH, "grades": 5, "ordinal_head": head})
    theirs = source.state_dict()
    fresh = {"ordinal.offsets"} | ({"head.5.weight", "head.5.bias"} if head == "softmax" else set())
    for name, mine in target.state_dict().items():
        expected = before[name] if name in fresh else theirs[name]
        assert torch.equal(mine, expected), name
    assert MODEL_DEFAULTS["ordinal_head"] == "softmax"
