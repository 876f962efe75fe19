from __future__ import annotations

from app.config import load_config, parse_set_options
from nets.cnn3d import CNN3D


def test_config_builds_the_app_objects():
    parser = load_config("inference.yaml")
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, CNN3D)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 1_351_873
    resize = [
        t
        for t in parser.get_parsed_content("preprocessing").transforms
        if type(t).__name__ == "Resized"
    ]
    assert tuple(resize[0].resizer.spatial_size) == (128, 128, 64)


def test_overrides_reach_the_objects():
    parser = load_config(
        "inference.yaml",
        overrides={"filters": [4, 4, 8, 8], "dense_units": 8, "spatial_size": [48, 48, 48]},
    )
    net = parser.get_parsed_content("network_def")
    assert net.features[3].conv.out_channels == 8
    resize = [
        t
        for t in parser.get_parsed_content("preprocessing").transforms
        if type(t).__name__ == "Resized"
    ]
    assert tuple(resize[0].resizer.spatial_size) == (48, 48, 48)


def test_set_options_are_yaml_values():
    assert parse_set_options(["epochs=3", "spatial_size=[48, 48, 48]", "name=abc"]) == {
        "epochs": 3,
        "spatial_size": [48, 48, 48],
        "name": "abc",
    }
