"""One slide as one task: :func:`predict_job` (one slide), :func:`slide_task` (what a worker runs: the
slide with its retries, an expected failure returned as a :class:`SlideFailure`), the per-process model
cache and the check that lets :class:`~.recycle.SlideRecycler` restart a worker process after K slides.

A task plans its slide (:func:`~pfmseg_engine.inference.plan_slide`) and runs the plan
(:func:`~pfmseg_engine.inference.execute_plan`). A finished output is reused and a ``.partial`` one
resumed, so a task that fails or loses its worker is simply run again; ``wait=None`` (the default
here) makes a retry that starts while an earlier attempt still writes wait for it, then reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PfmsegError
from ..storage import OutputBusyError, StorageError
from .inputs import SlideJob
from .summary import describe_error, tissue_area_mm2, worker_id

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, "str | None", str], Any]

_MODELS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()

#: Default export file of each ``--export`` kind, beside ``<name>.ome.zarr``.
EXPORT_FILES = {"ome-tiff": "{name}.labels.ome.tif", "geojson": "{name}.geojson"}


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


# ---- the task ------------------------------------------------------------------------------------
def predict_job(
    job: SlideJob,
    checkpoint: str | Path,
    output_dir: str | Path,
    config: Any = None,
    *,
    model: Any = None,
    model_loader: ModelLoader | None = None,
    weights: str | None = None,
    device: str | None = None,
    reader: str = "auto",
    overwrite: bool = False,
    exports: Sequence[str] = (),
    geojson_options: dict[str, Any] | None = None,
    wait: float | None = None,
    callback: Callable[[Any], Any] | None = None,
    on_plan: Callable[[Any], Any] | None = None,
):
    """Predict one slide of a cohort; returns its :class:`~pfmseg_engine.inference.SlideResult`.

    ``model`` is used as given; else the process's cached model (:func:`cached_model`). ``config``
    is a :class:`~pfmseg_engine.inference.SlideInferenceConfig` or its dict; the job's ``target_mpp``
    and ``tissue_roi`` replace the config's. ``exports``: "ome-tiff", "geojson" (a reused slide is
    exported only where the export is missing; ``geojson_options`` go to ``export_geojson``). Every
    finished output gets its ``<name>_measurements.csv``. ``result.extra`` carries the plan summary
    ("plan"), "status" ("done", or "reused" when the output was complete when the task started),
    "tissue_mm2", "exports", "measurements" (the CSV), "worker" (host:pid) and "seconds" (the whole
    task, model loading aside); ``result.slide_plan`` is dropped (it holds the open slide).
    """
    from ..devices import resolve_device
    from ..inference.plan import SlideInferenceConfig, plan_slide
    from ..inference.runner import model_info
    from ..inference.slide import execute_plan
    from ..slides import open_slide

    recycler = _this_worker_recycler()
    if recycler is not None:
        recycler.gate()
    try:
        device = str(resolve_device(device))  # resolved here, on the worker that owns the GPU
        if model is None:
            model = cached_model(str(checkpoint), weights, device, model_loader)
        start = time.perf_counter()
        if config is None or isinstance(config, dict):
            config = SlideInferenceConfig(**(config or {}))
        if job.target_mpp is not None:
            config = dataclasses.replace(config, target_mpp=job.target_mpp)
        if job.tissue_roi is not None:
            config = dataclasses.replace(config, tissue_roi=job.tissue_roi)
        with open_slide(job.path, mpp=job.mpp, reader=reader) as slide:
            plan = plan_slide(slide, model_info(model), config, region=job.region, output_dir=output_dir,
                              name=job.name)
            if on_plan is not None:
                on_plan(plan)
            reused = plan.final.exists() and not overwrite
            result = execute_plan(plan, model, device=device, callback=callback, overwrite=overwrite, wait=wait)
            result.extra.update(plan=plan.summary(), status="reused" if reused else "done",
                                tissue_mm2=tissue_area_mm2(plan), worker=worker_id())
        result.slide_plan = None
        result.extra["exports"] = [str(p) for p in export(result.path, exports, only_missing=reused,
                                                          geojson_options=geojson_options)]
        result.extra["measurements"] = str(measure(result.path, only_missing=reused))
        result.extra["seconds"] = time.perf_counter() - start
        return result
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


def slide_task(job: SlideJob, checkpoint: str | Path, output_dir: str | Path, config: Any = None, *,
               retries: int = 0, **options: Any):
    """:func:`predict_job` as a cluster task: its SlideResult, or a :class:`SlideFailure` once the slide
    failed ``retries`` more times with an expected error (:data:`EXPECTED_ERRORS`).

    Expected errors are retried here, on this worker, and never raised; other exceptions propagate,
    so dask's own retries and logging still cover bugs and crashes.
    """
    start, attempt = time.perf_counter(), 0
    while True:
        try:
            return predict_job(job, checkpoint, output_dir, config, **options)
        except EXPECTED_ERRORS as exc:
            if attempt >= int(retries) or fatal(exc):
                return SlideFailure.of(exc, time.perf_counter() - start)
            attempt += 1
            log.warning("Slide '%s' failed (%s); retrying (%d of %d).", job.label, describe_error(exc), attempt,
                        int(retries))


def export(store: Path, kinds: Sequence[str], only_missing: bool = False,
           geojson_options: dict[str, Any] | None = None) -> list[Path]:
    """Write the requested exports of a finished output (skipping existing ones when ``only_missing``)."""
    from ..inference.export_tiff import export_ome_tiff
    from ..inference.geojson_export import export_geojson

    exporters = {"ome-tiff": export_ome_tiff,
                 "geojson": lambda path: export_geojson(path, **(geojson_options or {}))}
    name = store.name.removesuffix(".ome.zarr")
    written = []
    for kind in kinds or ():
        target = store.with_name(EXPORT_FILES[kind].format(name=name))
        if only_missing and target.exists():
            written.append(target)
            continue
        written.append(Path(exporters[kind](store)))
    return written


def measure(store: Path, only_missing: bool = False) -> Path:
    """The output's ``<name>_measurements.csv`` (area per class, regions, nucleus counts), written beside it."""
    from ..annotations.measurements import measurements_path, write_measurements

    target = measurements_path(store)
    return target if only_missing and target.exists() else write_measurements(store)


def predict_one(checkpoint: str, slide: str, output_dir: str, config: dict[str, Any], *,
                weights: str | None = None, mpp: float | None = None, device: str | None = None,
                reader: str = "auto", model_loader: ModelLoader | None = None):
    """One slide with the process's cached model (the earlier single-slide task; see :func:`predict_job`)."""
    return predict_job(SlideJob(path=str(slide), mpp=mpp), checkpoint, output_dir, config, weights=weights,
                       device=device, reader=reader, model_loader=model_loader)


__all__ = ["EXPECTED_ERRORS", "EXPORT_FILES", "SlideFailure", "cached_model", "export", "fatal", "measure",
           "predict_job", "predict_one", "slide_task", "task_key"]
