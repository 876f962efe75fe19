"""The command lines' shared pieces: help texts from the configs, sizes, progress bars."""

from __future__ import annotations

import argparse

import pytest
import yaml

from app.cli import count, show_progress
from app.config import CONFIG_DIR


def configs(*names: str) -> dict:
    values: dict = {}
    for name in names:
        values.update(yaml.safe_load((CONFIG_DIR / name).read_text()))
    return values


def test_train_help_shows_the_configs_defaults_and_the_demos(capsys):
    from app.train import build_parser

    help_text = " ".join(build_parser().format_help().split())
    base, demo = (
        configs("common.yaml", "train.yaml"),
        configs("common.yaml", "train.yaml", "recipes/small-data.yaml"),
    )
    for option, key in (
        ("epochs", "epochs"),
        ("batch-size", "batch_size"),
        ("patience", "patience"),
    ):
        assert f"(default {base[key]}; --demo: {demo[key]})" in help_text, option
    size = " ".join(map(str, base["spatial_size"]))
    assert f"(default {size}; --demo: {' '.join(map(str, demo['spatial_size']))})" in help_text
    assert "``" not in help_text and "--device" in help_text and "where to train" in help_text


def test_infer_help_shows_the_configs_defaults():
    from app.infer import build_parser

    values = configs("common.yaml", "inference.yaml")
    help_text = " ".join(build_parser().format_help().split())
    assert f"scans per forward pass (default {values['batch_size']})" in help_text
    # the help says what auto means, as resolve_precision decides it (tests/test_precision.py)
    assert "auto (default): bfloat16 autocast on CPUs with AVX512-BF16/AMX" in help_text
    assert "float16 on older GPUs" in help_text and "``" not in help_text
    args = build_parser().parse_args(["x", "--max-voxels", "300M"])
    assert args.max_voxels == 300_000_000 and args.batch_size == values["batch_size"]


@pytest.mark.parametrize(
    ("text", "value"),
    [("300000000", 300_000_000), ("300M", 300_000_000), ("1.5G", 1_500_000_000), ("2k", 2000)],
)
def test_count_reads_plain_and_suffixed_numbers(text, value):
    assert count(text) == value


@pytest.mark.parametrize("text", ["", "M", "-5", "0", "1.5", "3 apples", "1e9", "0.1"])
def test_count_refuses_what_is_not_a_positive_count(text):
    with pytest.raises(argparse.ArgumentTypeError):
        count(text)


def test_no_progress_bars_without_a_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert show_progress(False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(False) is True and show_progress(True) is False
