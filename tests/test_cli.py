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


def _readme_exit_table() -> dict[int, str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Exit status", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ")]
    return {int(code): meaning.strip() for code, meaning in rows if code.strip().isdigit()}


def test_every_error_class_gives_the_exit_status_of_the_readme_table():
    """README, "Exit status": one table for every command line; each error class says its row."""
    from app.errors import (
        EXIT_DONE,
        EXIT_FAILED,
        EXIT_INTERRUPTED,
        EXIT_REFUSED,
        ConfigError,
        CTClassifyError,
        DataError,
        DownloadError,
        UsageError,
    )
    from app.evaluate import EvaluationError
    from app.inference.classifier import CheckpointError
    from app.inference.predictions import OutputFolderError
    from app.model_settings import SettingsError
    from app.readback import ReadBackError
    from app.training.pretrained import InitWeightsError
    from app.training.workflow import Interrupted

    table = _readme_exit_table()
    assert set(table) == {EXIT_DONE, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED} == {0, 1, 2, 130}
    assert "refused" in table[2] and "some inputs failed" in table[1] and "signal" in table[130]
    refused = (ConfigError, DataError, UsageError, SettingsError, CheckpointError, EvaluationError,
               OutputFolderError, ReadBackError, InitWeightsError)  # fmt: skip
    assert all(cls.exit_status == EXIT_REFUSED for cls in refused)
    assert DownloadError.exit_status == CTClassifyError.exit_status == EXIT_FAILED
    assert Interrupted.exit_status == EXIT_INTERRUPTED


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("train", id="app.train"),
        pytest.param("infer", id="app.infer"),
        pytest.param("evaluate", id="app.evaluate"),
        pytest.param("export", id="app.export"),
        pytest.param("data", id="app.data"),
        pytest.param("pretrain", id="app.pretrain"),
    ],
)
def test_every_command_line_refuses_a_missing_input_with_status_2(tmp_path, capsys, command):
    """README, "Exit status" 2: a refused input, one line on stderr, nothing written."""
    from app.data.cli import main as data_main
    from app.evaluate import main as evaluate_main
    from app.export import main as export_main
    from app.infer import main as infer_main
    from app.pretrain import main as pretrain_main
    from app.train import main as train_main

    missing = str(tmp_path / "missing")
    out = tmp_path / "out"
    calls = {
        "train": lambda: train_main(["--data", missing, "--output", str(out), "--no-progress"]),
        "infer": lambda: infer_main([missing, "--output", str(out), "--no-progress"]),
        "evaluate": lambda: evaluate_main(
            ["--data", missing, "--checkpoint", missing, "--output", str(out), "--no-progress"]
        ),
        "export": lambda: export_main(["--checkpoint", missing, "--output", str(out)]),
        "data": lambda: data_main(["synth", str(out), "--per-class", "0", "--no-progress"]),
        "pretrain": lambda: pretrain_main(["--per-class", "1", "--work", str(out)]),
    }
    assert 2 in _readme_exit_table() and calls[command]() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err), err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "command",
    [
        "app.train",
        "app.infer",
        "app.evaluate",
        "app.export",
        "app.data",
        "app.pretrain",
        "app.serve",
    ],
)
def test_help_loads_neither_torch_nor_monai(command):
    """The reason the command lines import their work lazily, tested: ``--help`` answers
    without importing PyTorch or MONAI (seconds on a cold disk), in a fresh process."""
    import subprocess
    import sys

    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{command!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({command!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai'))\n"
        "print('HEAVY', heavy[:5])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert "usage:" in proc.stdout, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
