"""One slide as one task: :func:`predict_job` (one slide), :func:`slide_task` (what a worker runs: the
slide with its retries, an expected failure returned as a :class:`SlideFailure`), the per-process model
cache and the check that lets :class:`~.recycle.SlideRecycler` restart a worker process after K slides.

A task is a :class:`~pfmseg_engine.jobs.SlidePrediction` (plan, execute, export, measure). A finished
output is reused and a ``.partial`` one resumed, so a task that fails or loses its worker is simply run
again; a cohort's settings wait for another writer as long as it takes (``wait=None``), so a retry that
starts while an earlier attempt still writes waits for it, then reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PfmsegError
from ..inference.plan import SlideInferenceConfig
from ..jobs.prediction import EXPORT_FILES, PredictionOutcome, PredictionSettings, worker_id
from ..storage import OutputBusyError, StorageError
from .inputs import SlideJob
from .summary import describe_error

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, "str | None", str], Any]

_MODELS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()



def _loader_id(loader: ModelLoader | None) -> str | None:
    if loader is None:
        return None
    return f"{getattr(loader, '__module__', '')}.{getattr(loader, '__qualname__', repr(loader))}"


def cached_model(checkpoint: str, weights: str | None, device: str, loader: ModelLoader | None = None):
    """This process's model for the checkpoint, loaded on first use (loading a PFM per slide would
    dominate); ``loader(checkpoint, weights, device)`` replaces :func:`~pfmseg_engine.checkpoint.load_checkpoint`."""
    key = (str(checkpoint), weights, device, _loader_id(loader))
    with _LOCK:
        if key not in _MODELS:
            if loader is None:
                from ..checkpoint import load_checkpoint

                _MODELS[key] = load_checkpoint(checkpoint, weights=weights, device=device)
            else:
                _MODELS[key] = loader(str(checkpoint), weights, device)
        return _MODELS[key]


def task_key(slide: str | Path | SlideJob, output_dir: str | Path) -> str:
    """Deterministic task key: submitting the same slide (and region and name) into the same output twice
    never runs it twice at once."""
    job = slide if isinstance(slide, SlideJob) else SlideJob(path=str(slide))
    # realpath, not Path.resolve: a listed symbolic link loop must fail in its own task, not raise here
    ident = f"{os.path.realpath(job.path)}|{os.path.realpath(output_dir)}|{job.region}|{job.name}"
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return f"pfmseg-slide-{Path(job.path).name}-{digest}"


def _this_worker_recycler():
    """The :class:`~.recycle.SlideRecycler` of the worker running this task (None outside a worker)."""
    import sys

    if "distributed" not in sys.modules:  # not on a dask worker
        return None
    from distributed import get_worker

    from .recycle import SlideRecycler

    try:
        worker = get_worker()
    except ValueError:
        return None
    plugin = worker.plugins.get(SlideRecycler.name)
    return plugin if isinstance(plugin, SlideRecycler) else None


def job_settings(settings: PredictionSettings | SlideInferenceConfig | dict[str, Any] | None,
                 job: SlideJob) -> PredictionSettings:
    """The settings of one slide of a cohort: its own ``mpp``, ``target_mpp`` and ``tissue_roi`` (a manifest's
    columns) over the cohort's."""
    return PredictionSettings.of(settings).with_overrides(mpp=job.mpp, target_mpp=job.target_mpp,
                                                          tissue_roi=job.tissue_roi)


# ---- the task ------------------------------------------------------------------------------------
def predict_job(
    job: SlideJob,
    checkpoint: str | Path,
    output_dir: str | Path,
    settings: PredictionSettings | SlideInferenceConfig | dict[str, Any] | None = None,
    *,
    model: Any = None,
    model_loader: ModelLoader | None = None,
    weights: str | None = None,
    callback: Callable[[Any], Any] | None = None,
    on_plan: Callable[[Any], Any] | None = None,
) -> PredictionOutcome:
    """Predict one slide of a cohort: a :class:`~pfmseg_engine.jobs.SlidePrediction` of ``job`` (its
    ``mpp``, ``target_mpp`` and ``tissue_roi`` overlay ``settings``), with ``model`` or else the process's
    cached model (:func:`cached_model`). ``callback`` sees every finished chunk and ``on_plan`` the plan.
    """
    from ..devices import resolve_device
    from ..jobs.prediction import ChunkDone, Planned, SlidePrediction

    recycler = _this_worker_recycler()
    if recycler is not None:
        recycler.gate()
    try:
        settings = job_settings(settings, job)
        device = str(resolve_device(settings.device))  # resolved here, on the worker that owns the GPU
        if model is None:
            model = cached_model(str(checkpoint), weights, device, model_loader)
        prediction = SlidePrediction(model, job.path, output_dir, settings.with_overrides(device=device),
                                     region=job.region, name=job.name)
        for event in prediction.iter_run():
            if isinstance(event, Planned) and on_plan is not None:
                on_plan(event.plan)
            elif isinstance(event, ChunkDone) and callback is not None:
                callback(event.chunk)
        assert prediction.outcome is not None  # iter_run ran to its end
        return prediction.outcome
    finally:
        if recycler is not None:
            recycler.finished()


#: What a slide is expected to fail with (a corrupt or refused slide, a full disk, a busy output): the
#: engine's own errors and file-system faults. :func:`slide_task` returns these as a :class:`SlideFailure`;
#: anything else is a bug and is raised (dask logs it and retries the task).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (PfmsegError, OSError)


def fatal(exc: BaseException) -> bool:
    """Errors that would fail every following slide the same way (the output disk is full, read-only or
    not ours): not worth retrying; a serial run stops at the first one."""
    return isinstance(exc, StorageError) and not isinstance(exc, OutputBusyError)


@dataclass
class SlideFailure:
    """A slide task's expected failure, returned instead of raised.

    Raised, it would reach the client just the same, but the worker would first log it as "Compute
    Failed" with a traceback, for what is an ordinary outcome of a cohort (a corrupt slide).
    ``exception`` is the error itself when it survives pickling (None otherwise); ``error`` is its one line.
    """

    error: str
    exception: BaseException | None
    seconds: float
    worker: str

    @classmethod
    def of(cls, exc: BaseException, seconds: float) -> SlideFailure:
        try:
            kept: BaseException | None = pickle.loads(pickle.dumps(exc))
        except Exception:  # an error type that does not pickle: its line is enough
            kept = None
        return cls(error=describe_error(exc), exception=kept, seconds=seconds, worker=worker_id())

    def as_exception(self) -> BaseException:
        """The error to record or raise on the client (its one line when the original did not travel)."""
        return self.exception if self.exception is not None else PfmsegError(self.error)


def slide_task(job: SlideJob, checkpoint: str | Path, output_dir: str | Path,
               settings: PredictionSettings | SlideInferenceConfig | dict[str, Any] | None = None, *,
               retries: int = 0, model_loader: ModelLoader | None = None,
               weights: str | None = None) -> PredictionOutcome | SlideFailure:
    """:func:`predict_job` as a cluster task: its outcome, or a :class:`SlideFailure` once the slide
    failed ``retries`` more times with an expected error (:data:`EXPECTED_ERRORS`).

    Expected errors are retried here, on this worker, and never raised; other exceptions propagate,
    so dask's own retries and logging still cover bugs and crashes.
    """
    start, attempt = time.perf_counter(), 0
    while True:
        try:
            return predict_job(job, checkpoint, output_dir, settings, model_loader=model_loader, weights=weights)
        except EXPECTED_ERRORS as exc:
            if attempt >= int(retries) or fatal(exc):
                return SlideFailure.of(exc, time.perf_counter() - start)
            attempt += 1
            log.warning("Slide '%s' failed (%s); retrying (%d of %d).", job.label, describe_error(exc), attempt,
                        int(retries))


__all__ = ["EXPECTED_ERRORS", "EXPORT_FILES", "SlideFailure", "cached_model", "fatal", "job_settings", "predict_job",
           "slide_task", "task_key"]
