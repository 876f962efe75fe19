"""Resume a run from its newest checkpoint, as a handler the training config names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from app.errors import ConfigError
from app.run_folder import BEST_MODEL, latest_checkpoint


class ResumeFromCheckpoint:
    """Continue a run: load the newest ``last_checkpoint_epoch=N.pt`` of ``run_dir`` into
    ``load_dict`` and the trainer (epoch, iteration, early-stopping state), keeping the trainer's
    ``max_epochs`` (MONAI's ``CheckpointLoader``), and give the best-model savers the score they
    must beat (from ``best_model.pt``), so a resumed run never demotes its best model.

    Attach it to the trainer before the other handlers: they read the restored state at
    ``STARTED``. The trainer is added to ``load_dict`` on attach, so the config needs no
    reference from the trainer's handlers back to the trainer.

    Args:
        run_dir: the run folder.
        load_dict: name -> object with ``load_state_dict`` (network, optimizer, scheduler...).
        best_savers: handlers among which the key-metric ``CheckpointSaver`` is restored.
    """

    def __init__(
        self,
        run_dir: str | Path,
        load_dict: Mapping[str, Any],
        best_savers: Sequence[Any] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.load_dict = dict(load_dict)
        self.best_savers = [
            h
            for h in best_savers
            if isinstance(h, CheckpointSaver) and h._key_metric_checkpoint is not None
        ]

    def attach(self, engine: Engine) -> None:
        last = latest_checkpoint(self.run_dir)
        if last is None:
            raise ConfigError(
                f"resume: {self.run_dir} holds no last_checkpoint_epoch=*.pt to resume from"
            )
        CheckpointLoader(
            load_path=str(last),
            load_dict={**self.load_dict, "trainer": engine},
            map_location="cpu",  # type: ignore[arg-type]  # passed on to torch.load
            strict=True,
        ).attach(engine)
        engine.add_event_handler(Events.STARTED, self._restore_best_tracking)

    def _restore_best_tracking(self, engine: Engine) -> None:
        best = self.run_dir / BEST_MODEL
        if not best.exists() or not self.best_savers:
            return
        state = torch.load(best, map_location="cpu", weights_only=True).get("checkpointer")
        if state is not None:
            for saver in self.best_savers:
                saver.load_state_dict(state)
