"""What the command lines share: defaults read from the configs for their help, sizes such as
``300M``, and progress bars only where someone watches them."""

from __future__ import annotations

import argparse
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

from app.config import CONFIG_DIR
from app.errors import EXIT_INTERRUPTED, CTClassifyError
from app.runtime import PRECISIONS


def fail(exc: CTClassifyError) -> int:
    """Print ``exc`` as one line ("stopped: ..." for an interruption, else "error: ...") and
    return its exit status: every command line ends its errors here (``app.errors``)."""
    word = "stopped" if exc.exit_status == EXIT_INTERRUPTED else "error"
    print(f"{word}: {exc}", file=sys.stderr)
    return exc.exit_status


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)\s*$")
_FACTORS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


@cache
def config_values(*names: str) -> dict[str, Any]:
    """Top-level values of ``names`` (e.g. ``"common.yaml"``), later files overriding earlier
    ones, read as plain YAML (fast: no MONAI import, nothing evaluated), for help texts."""
    import yaml

    values: dict[str, Any] = {}
    for name in names:
        values.update(yaml.safe_load((Path(CONFIG_DIR) / name).read_text()) or {})
    return values


def default_text(key: str, *names: str, demo: str | None = None) -> str:
    """``(default V)`` for config id ``key``, with the demo's value when it differs."""
    value = config_values(*names).get(key)
    shown = " ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    if demo is not None:
        other = config_values(*names, demo).get(key)
        if other != value:
            alt = " ".join(str(v) for v in other) if isinstance(other, list) else str(other)
            return f"(default {shown}; --demo: {alt})"
    return f"(default {shown})"


def count(text: str) -> int:
    """A positive count such as ``300000000``, ``300M``, ``1.5G`` (k, M, G, T: powers of 1000),
    for argparse."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a number such as 300000000 or 300M, got {text!r}"
        )
    value = float(match.group(1)) * _FACTORS[match.group(2).lower()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def show_progress(no_progress: bool) -> bool:
    """Progress bars unless ``--no-progress``, and only on a terminal: in a log file they are
    thousands of redrawn lines."""
    return not no_progress and sys.stderr.isatty()


def add_device_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--device auto|cpu|cuda`` (default auto: CUDA when there is a GPU)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=help)


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``; bars are shown only on a terminal anyway (:func:`show_progress`)."""
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are shown only when stderr is a terminal anyway)",
    )


def add_reading_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """``--batch-size`` and ``--workers`` of a command that classifies scans, their defaults
    ``batch_size`` and ``num_workers`` of ``defaults`` (the configs' values)."""
    parser.add_argument(
        "--batch-size",
        type=int,
        default=int(defaults["batch_size"]),
        help="scans per forward pass (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(defaults["num_workers"]),
        help="processes that read scans (default %(default)s; 0: a background thread)",
    )


def add_precision_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--precision auto|fp32|bf16|fp16``, as configs/common.yaml's ``precision``."""

    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="auto (default): bfloat16 autocast on CPUs with AVX512-BF16/AMX and on GPUs with "
        "bfloat16, float16 on older GPUs, float32 elsewhere; fp32; bf16; fp16 (CUDA)",
    )
