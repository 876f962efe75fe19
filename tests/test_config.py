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


def _code_tokens(path):
    """Number and string tokens of a module's code (docstrings and comments left out); numbers
    as floats, with their sign."""
    import io
    import tokenize

    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    out: list = []
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.STRING:
            before = tokens[i - 1].type if i else tokenize.NEWLINE
            if before in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.DEDENT):
                continue  # a docstring
            out.append(tok.string.strip("\"'"))
        elif tok.type == tokenize.NUMBER:
            try:
                value = float(tok.string.replace("_", ""))
            except ValueError:  # complex or hex literals: not settings
                continue
            negative = i and tokens[i - 1].type == tokenize.OP and tokens[i - 1].string == "-"
            out.append(-value if negative else value)
    return out


def test_no_config_value_is_restated_in_the_app_or_transforms():
    """Every setting once: the configs' non-trivial values appear in no code of app/ or
    transforms/ (a network class may keep the spec's numbers as its defaults, as MONAI's do)."""
    from pathlib import Path

    from app.cli import config_values

    values = config_values("common.yaml", "train.yaml")
    sequences = [
        [float(v) for v in values[key]]
        for key in ("spatial_size", "hu_window", "rotation_angles_deg", "filters")
    ]
    singles = {
        str(values["axcodes"]),
        float(values["learning_rate"]),
        float(values["lr_decay_rate"]),
        float(values["lr_decay_steps"]),
        "best_model.pt",
    }
    repo = Path(__file__).resolve().parent.parent
    offenders = []
    for path in sorted([*(repo / "app").rglob("*.py"), *(repo / "transforms").rglob("*.py")]):
        tokens = _code_tokens(path)
        for seq in sequences:
            for i in range(len(tokens) - len(seq) + 1):
                if tokens[i : i + len(seq)] == seq:
                    offenders.append(f"{path.name}: {seq}")
        offenders += [f"{path.name}: {t!r}" for t in tokens if t in singles]
    allowed = {"run_folder.py: 'best_model.pt'"}  # the one definition of the run folder's files
    assert sorted(set(offenders) - allowed) == []
