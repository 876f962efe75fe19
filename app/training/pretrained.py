"""Starting weights for a training run (``app.train --init``): the network pretrained on generated
scans that ships with the package (``--init generated``), or any checkpoint ``app.train`` wrote.

Weights are read with ``torch.load(weights_only=True)`` (no object is unpickled), must be finite,
and must fit the run's network key for key and shape for shape; the packaged file must also
match the SHA-256 recorded beside it (``nets/weights/generated.json``). A run records what it
started from (file name and digest) in its checkpoints' settings (``init_weights``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from app.data.download import sha256_of
from app.errors import ConfigError
from app.inference.checkpoints import CheckpointError, load_checkpoint
from app.model_settings import MODEL_DEFAULTS
from app.run_folder import BEST_MODEL

logger = logging.getLogger(__name__)

#: the name ``--init`` takes for the packaged weights
GENERATED = "generated"
#: settings that shape the network: a file's must equal the run's
ARCHITECTURE = ("in_channels", "filters", "dense_units", "norm", "pooling", "density_bins")
#: settings of the input: a file trained on others still starts a run, with a warning
INPUT = ("spatial_size", "hu_window", "axcodes", "lung_crop", "lung_only", "lung_flatten_mm")


class InitWeightsError(ConfigError):
    """``--init`` names weights that cannot start this run; the message says why."""


def packaged_weights() -> tuple[Path, Path]:
    """``(weights, record)`` of the network pretrained on generated scans, in the package."""
    import nets

    folder = Path(nets.__file__).resolve().parent / "weights"
    return folder / f"{GENERATED}.pt", folder / f"{GENERATED}.json"


def resolve(source: str) -> tuple[Path, str]:
    """``(file, sha256)`` of ``source`` (``generated`` or a checkpoint path), checked to exist
    (and, for the packaged weights, to match their recorded digest)."""
    if source == GENERATED:
        path, record_path = packaged_weights()
        if not path.is_file() or not record_path.is_file():
            raise InitWeightsError(
                f"--init {GENERATED}: the packaged weights {path.name} (or their record) are "
                "missing from this install; rebuild them with `python -m app.pretrain` "
                "(studies/log.md, Pretraining)"
            )
        digest = sha256_of(path)
        try:
            recorded = json.loads(record_path.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InitWeightsError(
                f"--init {GENERATED}: {record_path} is unreadable ({exc})"
            ) from exc
        if digest != recorded:
            raise InitWeightsError(
                f"--init {GENERATED}: {path} does not match the SHA-256 recorded in "
                f"{record_path.name} ({digest[:12]} vs {str(recorded)[:12]}): damaged or replaced"
            )
        return path, digest
    path = Path(source)
    if path.is_dir():
        path = path / BEST_MODEL
    if not path.is_file():
        raise InitWeightsError(f"--init {source}: no such checkpoint file")
    return path, sha256_of(path)


def describe(source: str | None, resumed: str | Path | None = None) -> dict[str, str] | None:
    """What a run started from, for its checkpoints: file name and SHA-256 (no folder path: a
    checkpoint is shared). ``resumed``: the run folder of a resumed run, whose record is kept
    from its best model (a resume loads its own weights, and needs no ``--init`` file)."""
    if resumed is not None and (Path(resumed) / BEST_MODEL).is_file():
        from app.inference.checkpoints import CheckpointError, load_checkpoint

        try:
            return load_checkpoint(Path(resumed) / BEST_MODEL)[1].get("init_weights")
        except CheckpointError:
            pass  # resuming reports the damaged checkpoint itself
    if not source:
        return None
    path, digest = resolve(source)
    return {"name": GENERATED if source == GENERATED else path.name, "sha256": digest}


def _severity_readout(
    network: torch.nn.Module, file_settings: dict[str, Any], settings: dict[str, Any]
) -> set[str]:
    """The weights of a severity network's read-out that starting weights of another number
    of grades (e.g. the binary ``generated`` network) cannot give: the CORAL offsets, and a
    softmax head's last layer; they keep their initial values. Empty where the grades and the
    head agree."""

    def setting(values: dict[str, Any], key: str) -> Any:
        return values.get(key, MODEL_DEFAULTS[key])

    grades = int(setting(settings, "grades"))
    same = all(
        setting(settings, k) == setting(file_settings, k) for k in ("grades", "ordinal_head")
    )
    if grades <= 2 or same:
        return set()
    fresh = {k for k in network.state_dict() if k.startswith("ordinal.")}
    if setting(settings, "ordinal_head") == "softmax":
        last = len(network.head) - 1  # type: ignore[arg-type]
        fresh |= {f"head.{last}.weight", f"head.{last}.bias"}
    return fresh


def initialize_network(
    network: torch.nn.Module, source: str | None, settings: dict[str, Any]
) -> torch.nn.Module:
    """Load the starting weights ``source`` into ``network`` (in place; returned), or leave it
    as initialised when ``source`` is empty.

    Args:
        network: the run's network.
        source: ``generated``, a checkpoint file or run folder, or ``None``/empty.
        settings: the run's settings (at least :data:`ARCHITECTURE`; :data:`INPUT` if known).
    """
    if not source:
        return network

    path, _ = resolve(source)
    try:
        state, file_settings = load_checkpoint(path)
    except CheckpointError as exc:
        raise InitWeightsError(f"--init {source}: {exc}") from exc
    differ = [k for k in ARCHITECTURE if k in settings and file_settings.get(k) != settings[k]]
    if differ:
        pairs = "; ".join(
            f"{k} {file_settings.get(k)!r} there, {settings[k]!r} here" for k in differ
        )
        raise InitWeightsError(
            f"--init {source}: its network differs from this run's ({pairs}); "
            + (
                "the packaged weights fit `--recipe small-data` as shipped"
                if source == GENERATED
                else "train with the same network settings"
            )
            + "; --init '' starts from random weights instead"
        )
    own = network.state_dict()
    fresh = _severity_readout(network, file_settings, settings)
    missing = sorted(set(own) - set(state) - fresh)
    shapes = [
        k
        for k in own
        if k in state and k not in fresh and tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or shapes:
        wrong = (missing + shapes)[:3]
        raise InitWeightsError(
            f"--init {source}: its weights do not fit this network ({', '.join(wrong)})"
        )
    network.load_state_dict({k: own[k] if k in fresh else state[k] for k in own}, strict=True)
    if fresh:
        logger.info("the severity read-out (%s) starts afresh", ", ".join(sorted(fresh)))
    other = [k for k in INPUT if k in settings and file_settings.get(k) != settings[k]]
    if other:
        logger.warning(
            "--init %s was trained on other inputs (%s): it starts this run all the same",
            source,
            ", ".join(f"{k} {file_settings.get(k)!r}" for k in other),
        )
    logger.info("starting from the weights of %s (%s)", source, path.name)
    return network
