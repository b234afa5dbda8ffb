"""One background thread that does a run's output writes in order, off the compute path.

Whole-slide inference hands it every write (spills, the chunk's labels and pyramid update, the
progress records) and carries on computing. Writes run strictly in submission order, so a chunk's
"done" record, submitted after its data, is written only once that data is on disk: resume stays
exact. The queue is bounded, so a slow disk slows the computation down instead of filling memory.

The first exception a write raises stops the writer: every later write, progress records included,
is dropped (so nothing is recorded as done that is not), and the exception itself - a
:class:`~pfmseg_engine.errors.StorageError` with its one-sentence message, usually - is raised in
the computing thread at its next :meth:`BackgroundWriter.check`, :meth:`~BackgroundWriter.submit`
or :meth:`~BackgroundWriter.wait`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

#: Writes that may wait in the queue (a chunk submits about half a dozen).
QUEUE_SIZE = 48


class BackgroundWriter:
    """Run submitted callables on one thread, in order; the first error stops it and is re-raised."""

    def __init__(self, maxsize: int = QUEUE_SIZE, name: str = "pfmseg-write"):
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue(maxsize)
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    fn, args = item
                    try:
                        fn(*args)
                    except BaseException as exc:  # handed to the computing thread, raised there
                        self.error = exc
            finally:
                self._queue.task_done()

    def check(self) -> None:
        """Raise the writer's error, if a write failed."""
        if self.error is not None:
            raise self.error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; blocks while the queue is full, raises if a write has failed."""
        if self._closed:
            raise RuntimeError("This writer is closed.")
        while True:
            self.check()
            try:
                self._queue.put((fn, args), timeout=0.1)
                return
            except queue.Full:
                continue

    def wait(self) -> None:
        """Block until everything submitted so far is written; raise the writer's error if any."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        """Finish the queued writes (dropped after an error) and stop the thread; never raises."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed
