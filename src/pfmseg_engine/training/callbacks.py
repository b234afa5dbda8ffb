"""Hooks into the training loop: progress reporting and cancellation, for the CLI and GUI alike.

The trainer calls every :class:`Callback` method in its own thread (a napari worker thread, say), so
a GUI turns these calls into signals; it never touches the model. Cancelling and pausing go through a
:class:`CancelToken` checked between batches: a cancelled trainer stops without writing a
half-finished epoch, so ``last.pt`` stays the last completed epoch; a paused one waits there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepInfo:
    """One training batch done (``loss`` is that batch's loss, before accumulation scaling)."""

    epoch: int
    epochs: int
    batch: int
    batches: int
    global_step: int
    loss: float
    lr: float


@dataclass(frozen=True)
class EpochInfo:
    """One epoch done; ``metrics`` is empty when the epoch did not validate."""

    epoch: int
    epochs: int
    train_loss: float
    lr: float
    seconds: float
    val_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_best: bool = False


class Callback:
    """Override the hooks you need; every hook is optional."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None: ...

    def on_step_end(self, trainer: Any, info: StepInfo) -> None: ...

    def on_validation_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, trainer: Any, info: EpochInfo) -> None: ...

    def on_checkpoint(self, trainer: Any, kind: str, path: Any) -> None: ...

    def on_train_end(self, trainer: Any, result: Any) -> None: ...


class CancelToken:
    """Thread-safe "stop" and "pause" requests shared between a GUI (or signal handler) and the trainer.

    The trainer checks the token between batches: after :meth:`pause` it blocks there (on a
    condition variable, not a polling loop, so a paused run costs no CPU) until :meth:`resume` or
    :meth:`cancel`. Cancel always wins: cancelling a paused run wakes it and it stops, and a token
    once cancelled never reports ``paused`` again.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._cancelled = False
        self._paused = False

    def cancel(self) -> None:
        with self._condition:
            self._cancelled = True
            self._condition.notify_all()

    def pause(self) -> None:
        """Hold the trainer before its next batch (no effect once cancelled)."""
        with self._condition:
            self._paused = True

    def resume(self) -> None:
        with self._condition:
            self._paused = False
            self._condition.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def paused(self) -> bool:
        return self._paused and not self._cancelled

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        """Block while paused; True to go on, False when cancelled (or still paused after ``timeout``)."""
        with self._condition:
            self._condition.wait_for(lambda: self._cancelled or not self._paused, timeout)
            return not self._cancelled and not self._paused


class FunctionCallback(Callback):
    """Forward steps and epochs to plain functions (handy for ``yield``-ing from a napari worker)."""

    def __init__(self, on_step: Callable[[StepInfo], None] | None = None,
                 on_epoch: Callable[[EpochInfo], None] | None = None):
        self._on_step, self._on_epoch = on_step, on_epoch

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if self._on_step:
            self._on_step(info)

    def on_epoch_end(self, trainer: Any, info: EpochInfo) -> None:
        if self._on_epoch:
            self._on_epoch(info)


class TqdmProgress(Callback):
    """A tqdm bar per epoch with the running loss and learning rate (the CLI's progress display)."""

    def __init__(self, **tqdm_kwargs: Any):
        self.kwargs = tqdm_kwargs
        self.bar = None

    def on_epoch_begin(self, trainer: Any, epoch: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.batches_per_epoch, desc=f"Epoch {epoch + 1}/{trainer.epochs}",
                        leave=False, **self.kwargs)

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")

    def on_epoch_end(self, trainer: Any, info: EpochInfo) -> None:
        self._close()

    def on_train_end(self, trainer: Any, result: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
