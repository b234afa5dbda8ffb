""":class:`SlideRecycler`: restart each worker process after K slides (``--recycle_after K``).

Long cohorts on one process accumulate what a fresh process would not have: fragmented GPU memory,
reader caches, leaks in a slide library. This worker plugin counts the slides its worker ran; the
task that would be slide K + 1 retires the worker (the scheduler sends it no new tasks and moves any
results it holds) and asks the worker's nanny to restart it, which starts a fresh process; the task
itself is rescheduled with
:class:`distributed.Reschedule` (which does not count as a failure) on another worker or on the
fresh process. Those restarts are ordinary events of such a run: :class:`QuietRestarts` keeps the
nanny's lines about them ("Restarting worker", "still alive ... killing": a retired process that is
slow to unload torch is killed, losing nothing) off the console while dask logs at WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import time

from distributed import Reschedule, Worker, WorkerPlugin

from ..errors import ConfigError

log = logging.getLogger(__name__)


class SlideRecycler(WorkerPlugin):
    """Worker plugin: after ``after`` slides the worker closes gracefully and its nanny starts a fresh process.

    The count lives in the plugin (one instance per worker process; a restarted worker gets a new
    one, since the scheduler hands registered plugins to every worker that joins). Before closing, the
    worker waits (up to a minute) until the client has collected the results it holds, so nothing is
    recomputed.
    """

    name = "pfmseg-recycle"
    idempotent = False

    def __init__(self, after: int):
        if int(after) < 1:
            raise ConfigError(f"recycle_after must be 1 or more slides, got {after}.")
        self.after = int(after)
        self.done = 0
        self.closing = False
        self.worker: Worker | None = None

    def setup(self, worker: Worker) -> None:
        self.worker = worker

    def finished(self) -> None:
        """A slide task ended on this worker (successfully or not)."""
        self.done += 1

    def gate(self) -> None:
        """Called by a slide task as it starts: once K slides ran here, recycle the worker and reschedule the task."""
        if self.worker is None or self.done < self.after:
            return
        if not self.closing:
            self.closing = True
            deadline = time.monotonic() + 60.0
            while len(self.worker.data) and time.monotonic() < deadline:  # results the client has not taken yet
                time.sleep(0.05)
            log.info("Recycling worker %s after %d slides.", self.worker.address, self.done)
            self.worker.loop.add_callback(self._recycle)
        time.sleep(0.1)
        raise Reschedule()

    async def _recycle(self) -> None:
        """Retire the worker (no new tasks; any data moves elsewhere), then have its nanny restart it.

        ``Worker.close_gracefully(restart=True)`` would remove the worker on the scheduler first; the
        scheduler then drops its connection, and a worker that notices this before its own close closes
        its nanny too and never comes back. Retiring without removal and restarting through the nanny
        (what ``Client.restart_workers`` does) avoids that race.
        """
        worker = self.worker
        if worker is None:  # never set up: not on a worker
            return
        try:
            await worker.scheduler.retire_workers(workers=[worker.address], close_workers=False, remove=False,
                                                  stimulus_id=f"pfmseg-recycle-{time.time()}")
            while worker.state.executing_count:  # the task that asked for this is being rescheduled
                await asyncio.sleep(0.05)
        except Exception as exc:  # the scheduler went away: restarting is still right
            log.warning("Retiring worker %s before recycling it failed: %s", worker.address, exc)
        if not worker.nanny:  # no nanny to start a new process: stop, for the deployment to replace it
            await worker.close(nanny=False, reason="pfmseg-recycle")
            return
        try:
            await worker.rpc(worker.nanny).restart(reason="pfmseg-recycle")
        except Exception as exc:  # this process is killed while it waits for the answer
            log.debug("Restart of %s: %s", worker.address, exc)


class QuietRestarts(logging.Filter):
    """Filter for the ``distributed.nanny`` logger: drops its lines about restarting a worker process
    while dask logs at WARNING or above (with ``--debug`` dask logs at INFO and every line shows)."""

    LOGGER = "distributed.nanny"
    MESSAGES = ("Restarting worker", "Worker process still alive after")

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("distributed").getEffectiveLevel() <= logging.INFO:
            return True
        return not record.getMessage().startswith(self.MESSAGES)


__all__ = ["QuietRestarts", "SlideRecycler"]
