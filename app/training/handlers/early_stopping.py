"""Stop training when a validation metric has not improved for ``patience`` validations."""

from __future__ import annotations

from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping as IgniteEarlyStopping

STATE_KEY = "early_stopping"


class EarlyStopping:
    """Keras-style early stopping on an evaluator's metric, decided at the end of each epoch.

    Attached to the trainer (after its validation handler), it reads ``evaluator.state.metrics``
    and terminates the trainer after ``patience`` validations without improvement. It wraps
    ignite's ``EarlyStopping`` with ``threshold`` (ignite 0.5.5 deprecates ``min_delta``, which
    MONAI's ``EarlyStopHandler`` still passes). Its counter and best score live in the trainer's
    state (a user key of ``Engine.state_dict``), so they travel in every checkpoint that holds
    the trainer and a resumed run stops where an uninterrupted one would.

    Args:
        patience: validations without improvement before stopping.
        evaluator: the engine whose ``state.metrics`` holds ``metric_name``.
        metric_name: metric to watch (higher is better).
        threshold: smallest increase that counts as an improvement.
        val_interval: validation runs every ``val_interval`` epochs; other epochs are skipped.
    """

    def __init__(
        self,
        patience: int,
        evaluator: Engine,
        metric_name: str = "val_acc",
        threshold: float = 0.0,
        val_interval: int = 1,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.threshold = threshold
        self.val_interval = val_interval
        self._stopper: IgniteEarlyStopping | None = None

    def attach(self, engine: Engine) -> None:
        self._stopper = IgniteEarlyStopping(
            patience=self.patience,
            score_function=lambda _: float(self.evaluator.state.metrics[self.metric_name]),
            trainer=engine,
            threshold=self.threshold,
        )
        if STATE_KEY not in engine.state_dict_user_keys:
            engine.state_dict_user_keys.append(STATE_KEY)
        setattr(engine.state, STATE_KEY, self.state_dict())
        engine.add_event_handler(Events.STARTED, self._restore)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.val_interval), self._check)

    def _restore(self, engine: Engine) -> None:
        """After a checkpoint was loaded into the trainer, continue from its counter."""
        assert self._stopper is not None, "attach() first"
        saved = getattr(engine.state, STATE_KEY, None)
        if saved:
            self._stopper.counter = int(saved["counter"])
            self._stopper.best_score = saved["best_score"]

    def _check(self, engine: Engine) -> None:
        assert self._stopper is not None, "attach() first"
        self._stopper(engine)
        setattr(engine.state, STATE_KEY, self.state_dict())

    def state_dict(self) -> dict[str, float | int | None]:
        if self._stopper is None:
            return {"counter": 0, "best_score": None}
        best = self._stopper.best_score
        return {
            "counter": int(self._stopper.counter),
            "best_score": None if best is None else float(best),
        }
