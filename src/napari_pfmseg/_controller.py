"""What every long session job shares: one napari worker, one session claim, the engine's cancel token.

Training and comparing run the same way: inputs are gathered on the GUI thread (``_start``), the work
runs in a napari worker whose events arrive as signals, a failure to start becomes one notice and never
releases the claim of a run that is still going, and Cancel asks the engine's token to stop after the
current batch. Subclasses say what the job is called and what its events and result mean.
"""

from __future__ import annotations

from typing import Any

from psygnal import Signal

from ._notify import Failure, notify_error


class WorkerController:
    """Starts and cancels one kind of job of a session; widgets listen to its signals."""

    #: the session claim the job holds while it runs, and its name in notices
    claim_name: str = ""
    job_title: str = ""

    status = Signal(str)  # human-readable state
    started = Signal()
    failed_to_start = Signal(str)  # the message of an error that stopped a run before it started

    def __init__(self, session: Any):
        self.session = session
        self.worker: Any = None
        self.cancel_token: Any = None  # the engine's CancelToken
        self.runs = 0
        self._outcome: Any = None
        self.subject = ""  # the slide layer the current (or last) run works on, by name

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, image: Any, annotations: Any, settings: Any) -> Any:
        """Start the job on ``annotations`` over ``image``; returns the napari worker (None after an error notice)."""
        try:
            if not self.running:
                self.subject = str(getattr(image, "name", ""))
            return self._start(image, annotations, settings)
        except Exception as exc:
            if not self.running:  # never release the claim of a run that is still going
                self.session.release(self.claim_name)
            self.failed_to_start.emit(notify_error(exc, self.job_title))
            return None

    def cancel(self) -> None:
        """Stop after the current batch; what finished is kept."""
        if self.cancel_token is not None and self.running:
            self.cancel_token.cancel()
            self.status.emit("cancelling")

    # --- subclass hooks -----------------------------------------------------------------------------
    def _start(self, image: Any, annotations: Any, settings: Any) -> Any:
        raise NotImplementedError

    def _on_event(self, event: tuple[str, Any]) -> None:
        raise NotImplementedError

    def _on_result(self, value: Any) -> None:
        raise NotImplementedError

    def _on_error(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _on_finished(self) -> None:
        raise NotImplementedError

    # --- shared wiring ------------------------------------------------------------------------------
    def _launch(self, worker: Any, status: str) -> Any:
        """Connect ``worker``'s events to the hooks, announce the run and start it."""
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._outcome = None
        self.status.emit(status)
        self.started.emit()
        worker.start()
        return worker

    def _on_returned(self, value: Any) -> None:
        if isinstance(value, Failure):  # guarded workers return their exception instead of raising it
            self._on_error(value.exc)
        else:
            self._on_result(value)
