"""Checkpoints written atomically, and a resumable checkpoint each epoch with the trainer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from app.run_folder import LAST_PREFIX, last_checkpoints
from app.training.handlers.write_budget import WriteBudget, is_final_epoch


class _AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` in atomic mode (temporary file, then ``os.replace``), with MONAI's
    fixed-filename option."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are never left half written.

    MONAI saves straight into the final file (``atomic=False``, to keep group read permission;
    ignite's atomic mode now restores it), so a process killed during a save leaves a truncated
    checkpoint that a resume cannot load. Here every file goes to a temporary file in the same
    folder first and is renamed into place. Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (
            self._final_checkpoint,
            self._key_metric_checkpoint,
            self._interval_checkpoint,
        ):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, fixed)


class TrainerCheckpointSaver:
    """Keep the latest checkpoint of a run (network, optimizer, scheduler, trainer and whatever
    else ``save_dict`` holds), saved atomically at the end of an epoch when ``budget`` says so
    (:class:`WriteBudget`: every epoch on a CPU, every few on a fast GPU, where a 16 MB
    checkpoint takes as long as an epoch; the final epoch always).

    The trainer is added to ``save_dict`` when the handler is attached to it, so configs need no
    reference from the trainer's handlers back to the trainer itself.

    Args:
        save_dir: the run folder.
        save_dict: name -> object with ``state_dict()``.
        n_saved: how many of the latest checkpoints to keep.
        budget: decides which epochs are saved (shared with the run recorder); default: every
            epoch.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        n_saved: int = 1,
        budget: WriteBudget | None = None,
    ) -> None:
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.n_saved = n_saved
        self.budget = budget or WriteBudget(1.0)
        self._saver: AtomicCheckpointSaver | None = None

    def attach(self, engine: Engine) -> None:
        self._saver = AtomicCheckpointSaver(
            save_dir=self.save_dir,
            save_dict={**self.save_dict, "trainer": engine},
            file_prefix=LAST_PREFIX,
            save_interval=1,
            epoch_level=True,
            n_saved=None,  # pruning is ours alone (below): one deleter, whatever came before
        )
        self._saver.logger = engine.logger  # not attached: epoch_completed decides when to save
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_completed(self, engine: Engine) -> None:
        if self._saver is None or not self.budget.due(
            engine.state.epoch, final=is_final_epoch(engine)
        ):
            return
        with self.budget.timed():
            self._saver.interval_completed(engine)
            # after the save: keep the newest n_saved, including files of runs before a resume
            self._prune(engine)

    def _prune(self, engine: Engine) -> None:
        found = sorted(last_checkpoints(self.save_dir))
        for _, path in found[: max(len(found) - self.n_saved, 0)]:
            path.unlink(missing_ok=True)
