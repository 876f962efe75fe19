"""The bundle configs in ``configs/`` are the single source of truth; this module reads them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import ConfigError

if TYPE_CHECKING:  # monai is heavy to import: command-line --help stays fast without it
    from monai.bundle import ConfigParser

_HERE = Path(__file__).resolve().parent
#: the bundle configs: the repository's configs/, or in an installed app the copy shipped as
#: package data beside the code (app/configs/, pyproject.toml's package-dir)
CONFIG_DIR = (
    _HERE / "configs" if (_HERE / "configs" / "common.yaml").is_file() else _HERE.parent / "configs"
)
COMMON = "common.yaml"
#: the bundle's metadata, in configs/ (and in an exported bundle's configs/)
METADATA = "metadata.json"
#: what a training run learns: binary (normal vs abnormal, the reference's) or severity grades
TASKS = ("binary", "severity")
#: the severity task's config, read after the recipe (``app.train --task severity``)
SEVERITY_CONFIG = "severity.yaml"
#: an exported bundle's record of its training and validation scans' content hashes
#: (``configs/``; ``training_data.scan_sha256`` of the checkpoint it was exported from)
TRAINING_SCANS = "training_scans.json"


def config_files(*names: str, config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """Paths of ``common.yaml`` followed by ``names`` (e.g. ``"train.yaml"``) in ``config_dir``."""
    config_dir = Path(config_dir)
    return [str(config_dir / name) for name in (COMMON, *names)]


def load_config(
    *names: str, overrides: Mapping[str, Any] | None = None, config_dir: str | Path = CONFIG_DIR
) -> ConfigParser:
    """A ``ConfigParser`` over ``common.yaml`` + ``names`` with the metadata and ``overrides``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(*names, config_dir=config_dir))
    parser.read_meta(str(Path(config_dir) / METADATA))
    if overrides:
        parser.update(dict(overrides))
    return parser


def parse_set_options(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``["id=value", ...]`` into overrides; values are read as YAML (``3``, ``[1, 2]``...)."""
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects ID=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot read value {value!r}: {exc}") from exc
    return overrides
