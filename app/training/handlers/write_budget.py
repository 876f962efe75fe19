"""How often per-epoch records are written: within a share of the run's time, the last always."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


class WriteBudget:
    """Decide, once per epoch, whether that epoch's records (metrics files, curves, the resume
    checkpoint) are written, so that writing takes at most ``fraction`` of the run's wall time.

    On a CPU an epoch takes many seconds and every epoch is written; on a GPU an epoch of the
    reference's 140 scans takes well under a second while a 16 MB checkpoint, an fsync and a
    matplotlib figure take about as long, so they are written every few epochs instead. The
    handlers sharing one budget write the same epochs (the checkpoint and ``metrics.csv``
    agree), and always the final one (the last epoch, an early stop). After a crash or a signal,
    ``--resume`` repeats the epochs since the last written one.

    Args:
        fraction: share of wall time for writing (1 or more: every epoch).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, fraction: float = 0.1, clock: Callable[[], float] = time.perf_counter):
        if not fraction > 0:
            raise ValueError(f"the write budget must be above 0, got {fraction}")
        self.fraction = float(fraction)
        self.clock = clock
        self.cost = 0.0  # seconds the writes of the last written epoch took
        self.last_end: float | None = None
        self._epoch: int | None = None
        self._decision = True

    def due(self, epoch: int, final: bool = False) -> bool:
        """Whether ``epoch`` is written; the first ask in an epoch decides for every writer."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._decision = (
                final
                or self.fraction >= 1
                or self.last_end is None
                or (self.clock() - self.last_end) * self.fraction >= self.cost
            )
            if self._decision:
                self.cost = 0.0
        elif final:
            self._decision = True
        return self._decision

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time one write of the current epoch, so the next decision knows what writing costs."""
        start = self.clock()
        try:
            yield
        finally:
            self.last_end = self.clock()
            self.cost += self.last_end - start


def is_final_epoch(engine: Any) -> bool:
    """The run ends after this epoch: its last, or a handler (early stopping) stopped it."""
    return bool(engine.state.epoch >= engine.state.max_epochs or engine.should_terminate)
