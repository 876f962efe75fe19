"""Save a resumable checkpoint each epoch: MONAI's CheckpointSaver with the trainer included."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

LAST_PREFIX = "last"


class TrainerCheckpointSaver:
    """Keep the latest checkpoint of a run (network, optimizer, scheduler, trainer and whatever
    else ``save_dict`` holds), saved atomically at the end of every epoch.

    The trainer is added to ``save_dict`` when the handler is attached to it, so configs need no
    reference from the trainer's handlers back to the trainer itself.

    Args:
        save_dir: the run folder.
        save_dict: name -> object with ``state_dict()``.
        n_saved: how many of the latest checkpoints to keep.
    """

    def __init__(
        self, save_dir: str | Path, save_dict: Mapping[str, Any], n_saved: int = 1
    ) -> None:
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.n_saved = n_saved

    def attach(self, engine: Engine) -> None:
        CheckpointSaver(
            save_dir=self.save_dir,
            save_dict={**self.save_dict, "trainer": engine},
            file_prefix=LAST_PREFIX,
            save_interval=1,
            epoch_level=True,
            n_saved=None,  # pruning is ours alone (below): one deleter, whatever came before
        ).attach(engine)
        # after the save: keep the newest n_saved, including files of runs before a resume
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._prune)

    def _prune(self, engine: Engine) -> None:
        found = sorted(_last_checkpoints(self.save_dir))
        for _, path in found[: max(len(found) - self.n_saved, 0)]:
            path.unlink(missing_ok=True)


def _last_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(run_dir).glob(f"{LAST_PREFIX}_checkpoint_epoch=*.pt"):
        try:
            found.append((int(path.stem.rsplit("=", 1)[1]), path))
        except ValueError:
            continue
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``last_checkpoint_epoch=N.pt`` in ``run_dir`` (highest N), or ``None``."""
    found = _last_checkpoints(run_dir)
    return max(found)[1] if found else None
