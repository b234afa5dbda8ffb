"""Time in a comparison: the whole run's budget, each run's share of it, and the phases progress reports.

A comparison's ``budget_s`` is the wall time of everything it does: filling the feature cache, training
and scoring every run. Each run gets an equal share of what is left when it starts (runs reused from an
earlier call cost nothing and take none); its training stops at the epoch end where another epoch would
overrun the share less the time the last scoring took, or at any batch once the share is spent and one
epoch is complete (an abandoned epoch keeps the last completed one). A run that would start after the
budget is spent is not started, and says so in its leaderboard row. The per-run ``time_budget_s`` limits
training alone, as the CLI's ``--time_budget`` always did.

The clock is injected (``time.perf_counter`` by default) so that tests can drive the budget with a fake
clock instead of waiting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..training.callbacks import Callback, CancelToken, EpochInfo, StepInfo

log = logging.getLogger("pfmseg_engine.compare")

Clock = Callable[[], float]

#: The phases a run goes through, in order, as :class:`Phase` events name them.
PHASES: tuple[str, ...] = ("cache", "train", "score")


@dataclass(frozen=True)
class Phase:
    """Progress inside one run: ``name`` (one of :data:`PHASES`), ``done`` of ``total`` units.

    Units: windows for ``cache``, batches for ``train`` (``total`` counts the planned epochs; a budget may
    stop earlier), images for ``score``; front ends may report their own phases the same way (the napari
    dock's ``preview``: models).
    """

    name: str
    done: int
    total: int

    @property
    def label(self) -> str:
        unit = {"cache": "windows", "train": "batches", "score": "images", "preview": "models"}.get(self.name, "")
        title = {"cache": "caching backbone features", "train": "training", "score": "scoring",
                 "preview": "predicting the visible area"}.get(self.name, self.name)
        return f"{title}: {self.done}/{self.total} {unit}".rstrip()


class TimeBudget:
    """The whole comparison's budget (``seconds`` None: unlimited), read from ``clock``."""

    def __init__(self, seconds: float | None, clock: Clock):
        self.seconds = None if seconds is None else float(seconds)
        self.clock = clock
        self.started = clock()

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def left(self) -> float:
        """Seconds left (``inf`` without a budget; negative once overrun)."""
        if self.seconds is None:
            return math.inf
        return self.started + self.seconds - self.clock()

    def spent(self) -> bool:
        return self.left() <= 0

    def share(self, runs_left: int) -> float:
        """An equal share of what is left for each of ``runs_left`` runs."""
        return self.left() / max(1, runs_left)

    def describe(self) -> str:
        if self.seconds is None:
            return "no budget"
        return f"{self.seconds / 60:.2f} min" if self.seconds >= 60 else f"{self.seconds:.0f} s"


class RunToken(CancelToken):
    """A run's token: cancelled by the comparison's token (the user) or by :meth:`stop` (the time budget)."""

    def __init__(self, parent: CancelToken | None):
        super().__init__()
        self.parent = parent
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.cancel()

    @property
    def user_cancelled(self) -> bool:
        return self.parent is not None and self.parent.cancelled

    @property
    def cancelled(self) -> bool:
        return self._cancelled or self.user_cancelled

    @property
    def paused(self) -> bool:
        return self.parent is not None and self.parent.paused and not self.cancelled

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        if self.parent is None:
            return not self.cancelled
        return self.parent.wait_while_paused(timeout) and not self.cancelled


class TrainingDeadline(Callback):
    """Stop a run's training when its time is up.

    ``seconds``: training time of this run (from its first batch); ``deadline``: a time on ``clock`` by
    which training must end (the run's share of the comparison budget, scoring time set aside). At an
    epoch end, training stops when one more epoch (at the mean epoch time so far) would pass either
    limit; at a batch end, once the deadline has passed and an epoch is complete.
    """

    def __init__(self, token: RunToken, clock: Clock, *, seconds: float | None = None,
                 deadline: float | None = None):
        self.token, self.clock = token, clock
        self.seconds = None if seconds is None else float(seconds)
        self.deadline = deadline
        self.start = clock()
        self.first_epoch = 0

    def _limit(self) -> float:
        limits = [self.deadline] if self.deadline is not None else []
        if self.seconds is not None:
            limits.append(self.start + self.seconds)
        return min(limits) if limits else math.inf

    def on_train_begin(self, trainer: Any) -> None:
        self.start = self.clock()
        self.first_epoch = trainer.epoch

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if (self.deadline is not None and trainer.epoch > self.first_epoch and self.clock() >= self.deadline
                and not self.token.cancelled):
            log.info("Time budget reached during epoch %d; the run keeps epoch %d.", trainer.epoch + 1,
                     trainer.epoch)
            self.token.stop()

    def on_epoch_end(self, trainer: Any, info: EpochInfo) -> None:
        now = self.clock()
        per_epoch = (now - self.start) / max(1, trainer.epoch - self.first_epoch)
        if trainer.epoch < trainer.epochs and now + per_epoch > self._limit():
            log.info("Time budget reached after %d epoch(s).", trainer.epoch)
            self.token.stop()


__all__ = ["PHASES", "Clock", "Phase", "RunToken", "TimeBudget", "TrainingDeadline"]
