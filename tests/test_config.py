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
    evaluation = config_values("evaluate.yaml")["evaluation"]
    sequences = [
        [float(v) for v in values[key]]
        for key in ("spatial_size", "hu_window", "rotation_angles_deg", "filters")
    ]
    singles = {
        str(values["axcodes"]),
        float(values["learning_rate"]),
        float(values["lr_decay_rate"]),
        float(values["lr_decay_steps"]),
        float(evaluation["bootstrap_resamples"]),
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


#: every command line, by module
CLI_MODULES = (
    "app.train",
    "app.infer",
    "app.evaluate",
    "app.export",
    "app.pretrain",
    "app.data.cli",
)
#: numeric defaults that are properties of the machine, not settings
MACHINE_DEFAULTS = {("python -m app.data synth", "--workers")}  # the CPU cores


def _numeric_cli_defaults() -> dict[tuple[str, str], float]:
    """(program, option) -> default, for every option of every command line (subcommands
    too) whose default is a number."""
    import argparse
    import importlib

    out = {}
    for module in CLI_MODULES:
        parser = importlib.import_module(module).build_parser()
        parsers = [parser] + [
            sub
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for sub in action.choices.values()
        ]
        for each in parsers:
            for action in each._actions:
                default = action.default
                if isinstance(default, int | float) and not isinstance(default, bool):
                    name = action.option_strings[0] if action.option_strings else action.dest
                    out[(each.prog, name)] = default
    return out


def _shifted(value):
    """Every number of a YAML tree changed (booleans kept)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value + 3
    if isinstance(value, dict):
        return {k: _shifted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shifted(v) for v in value]
    return value


def test_every_numeric_cli_default_comes_from_the_configs(tmp_path, monkeypatch):
    """Every number once: with every number of the configs changed, every numeric default of
    every command line changes with it (none is written in the code)."""
    import shutil

    import yaml

    import app.cli
    from app.config import CONFIG_DIR

    before = _numeric_cli_defaults()
    assert ("python -m app.evaluate", "--bootstrap") in before
    assert ("python -m app.data synth", "--difficulty") in before
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    for file in configs.rglob("*.yaml"):
        file.write_text(yaml.safe_dump(_shifted(yaml.safe_load(file.read_text()))))
    monkeypatch.setattr(app.cli, "CONFIG_DIR", configs)
    app.cli.config_values.cache_clear()
    try:
        after = _numeric_cli_defaults()
    finally:
        app.cli.config_values.cache_clear()
    written_in_code = sorted(
        f"{prog} {option} = {value}"
        for (prog, option), value in before.items()
        if (prog, option) not in MACHINE_DEFAULTS and after[(prog, option)] == value
    )
    assert written_in_code == []


def test_model_settings_are_what_builds_the_model_and_what_training_records():
    """``MODEL_SETTINGS`` (what a checkpoint must carry to rebuild its model) is exactly the ids
    the network and the preprocessing are built from, and training records each of them."""
    import re

    import yaml

    from app.config import CONFIG_DIR
    from app.model_settings import MODEL_SETTINGS

    common = yaml.safe_load((CONFIG_DIR / "common.yaml").read_text())
    built_from = {
        ref
        for section in ("network_def", "preprocessing")
        for value in common[section].values()
        for ref in re.findall(r"@(\w+)", str(value))
    } - {"image_key"}  # the datalist key, not a property of the model
    assert set(MODEL_SETTINGS) == built_from
    train = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())
    recorded = train["run_info"]["settings"]
    assert set(MODEL_SETTINGS) <= set(recorded)
    assert all(recorded[k] == f"@{k}" for k in MODEL_SETTINGS)
