"""Run a cohort: every slide once, failures retried then recorded, a summary at the end.

:func:`run_cohort` runs the slides in this process one after the other (``client=None``) or as one
dask.distributed task each on ``client`` (futures with ``retries=``, collected with
``as_completed``). Either way a slide that still fails after ``retries`` more attempts is recorded
as failed with its error and the others go on; ``summary.csv``/``.json``/``.md`` describe the run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..inference.plan import SlideInferenceConfig
from ..jobs.cohort import DEFAULT_RETRIES, CohortSettings
from ..jobs.prediction import PredictionOutcome, PredictionSettings, worker_id
from ..storage import StorageError, ensure_output_dir
from .inputs import SlideJob, collect_slides
from .jobs import ModelLoader, SlideFailure, fatal, predict_job, slide_task, task_key
from .summary import CohortSummary, SlideRecord, describe_error

log = logging.getLogger(__name__)

#: Seconds between rewrites of the summary while a long run goes on (it is always written at the end).
SUMMARY_INTERVAL = 30.0


def _pending(job: SlideJob) -> SlideRecord:
    return SlideRecord(slide=job.path, name=job.output_stem(), status="pending")


class _Run:
    """The records of a run and the summary they make (rewritten now and then, and at the end)."""

    def __init__(self, jobs: Sequence[SlideJob], output_dir: Path, settings: dict[str, Any], write: bool,
                 on_record: Callable[[SlideRecord], Any] | None, bar: Any):
        self.records = [_pending(job) for job in jobs]
        self.summary = CohortSummary(self.records, output_dir, settings=settings)
        self.write, self.on_record, self.bar = write, on_record, bar
        self.start = last = time.perf_counter()
        self.last_write = last

    def record(self, index: int, record: SlideRecord) -> None:
        self.records[index] = record
        if self.bar is not None:
            self.bar.update(1)
            failed = sum(r.status == "failed" for r in self.records)
            if failed:
                self.bar.set_postfix(failed=failed)
        if self.on_record is not None:
            self.on_record(record)
        if self.write and time.perf_counter() - self.last_write > SUMMARY_INTERVAL:
            self.save()

    def save(self, quiet: bool = False) -> None:
        self.summary.seconds = time.perf_counter() - self.start
        self.last_write = time.perf_counter()
        if not self.write:
            return
        try:
            self.summary.write()
        except StorageError as exc:
            if not quiet:
                raise
            log.warning("Could not write the run summary: %s", exc)


def run_cohort(
    checkpoint: str | Path,
    slides: Iterable[str | Path | SlideJob],
    output_dir: str | Path,
    settings: CohortSettings | PredictionSettings | SlideInferenceConfig | dict[str, Any] | None = None,
    *,
    client: Any = None,
    model: Any = None,
    model_loader: ModelLoader | None = None,
    on_plan: Callable[[Any], Any] | None = None,
    on_record: Callable[[SlideRecord], Any] | None = None,
    **overrides: Any,
) -> CohortSummary:
    """Predict every slide ``slides`` names (files, globs, folders, manifest CSVs or :class:`SlideJob`).

    ``settings`` is a :class:`~pfmseg_engine.jobs.CohortSettings` (or the prediction settings of every
    slide: a :class:`~pfmseg_engine.jobs.PredictionSettings`, ``SlideInferenceConfig`` or its dict);
    ``overrides`` are fields of either, by name (``retries=0``, ``exports=("geojson",)``...; None keeps the
    setting, except ``wait=None``: wait for another writer as long as it takes). Each slide is one
    :class:`~pfmseg_engine.jobs.SlidePrediction`.

    Without ``client`` the slides run here, one after the other, with ``model`` (else the checkpoint,
    or ``model_loader(checkpoint, weights, device)``, loaded once); with a dask.distributed ``client``
    each slide is a task (``model_loader`` must then be importable or picklable on the workers; the
    model is loaded once per worker process), retried ``retries`` times, and a worker that dies
    mid-slide only costs a resumed slide; tasks wait for another writer of their output as long as it
    takes. ``on_record`` sees each slide's :class:`SlideRecord` as it ends, ``on_plan`` each plan (serial
    runs). Failures never raise here (except a full or read-only output disk in a serial run, which
    would fail every slide): see the returned :class:`CohortSummary`, which is also written to
    ``output_dir`` unless ``summary=False``.
    """
    forever = "wait" in overrides and overrides["wait"] is None  # None means "as long as it takes" here
    settings = CohortSettings.of(settings, **overrides)
    if forever:
        settings = dataclasses.replace(settings, prediction=dataclasses.replace(settings.prediction, wait=None))
    if int(settings.retries) < 0:
        raise ConfigError(f"retries must be 0 or more, got {settings.retries}.")
    if client is not None and model is not None:
        raise ConfigError("model= runs slides in this process; on a cluster each worker loads the checkpoint "
                          "(or calls model_loader), so pass client= without model=.")
    prediction = settings.prediction
    output_dir = ensure_output_dir(output_dir).absolute()  # workers may run elsewhere, in another folder
    jobs = collect_slides(slides, mpp=prediction.mpp)
    if not jobs:
        raise ConfigError("No slides to predict.")
    recorded = {"checkpoint": str(checkpoint), "reader": prediction.reader, "retries": int(settings.retries),
                "overwrite": prediction.overwrite, "exports": list(prediction.exports),
                "config": prediction.inference_config().to_dict(), "scheduler": _address(client)}
    bar = None
    if settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="slides", unit="slide", position=0)
    run = _Run(jobs, output_dir, recorded, settings.summary, on_record, bar)
    try:
        if client is None:
            _serial(run, jobs, checkpoint, output_dir, settings, model, model_loader, on_plan)
        else:
            _distributed(run, jobs, client, checkpoint, output_dir, settings, model_loader)
    except BaseException:
        run.save(quiet=True)  # what finished is recorded; the rest stays "pending"
        raise
    finally:
        if bar is not None:
            bar.close()
    run.save()
    _cohort_measurements(run.summary, output_dir)
    return run.summary


def _cohort_measurements(summary: CohortSummary, output_dir: Path) -> Path | None:
    """``measurements.csv`` in ``output_dir``: every finished slide's measurements in one table."""
    from ..annotations.measurements import write_cohort_measurements

    stores = [record.result.path for record in summary.records if record.result is not None]
    return write_cohort_measurements(stores, output_dir / "measurements.csv") if stores else None


def _address(client: Any) -> str:
    if client is None:
        return "serial"
    try:
        return str(client.scheduler.address)
    except AttributeError:
        return "dask"


def _serial(run: _Run, jobs: Sequence[SlideJob], checkpoint: str | Path, output_dir: Path,
            settings: CohortSettings, model: Any, model_loader: ModelLoader | None,
            on_plan: Callable[[Any], Any] | None) -> None:
    if model is None:
        if model_loader is not None:
            model = model_loader(str(checkpoint), settings.weights, "cpu")
        else:
            from ..checkpoint import load_checkpoint

            model = load_checkpoint(checkpoint, weights=settings.weights, device="cpu")
    retries = int(settings.retries)
    for index, job in enumerate(jobs):
        start = time.perf_counter()
        for attempt in range(retries + 1):
            bar = _chunk_bar(job) if settings.progress else None
            try:
                outcome = predict_job(job, checkpoint, output_dir, settings.prediction, model=model,
                                      callback=bar.callback if bar is not None else None, on_plan=on_plan)
            except Exception as exc:
                last = attempt == retries or fatal(exc)
                if not last:
                    log.warning("Slide '%s' failed (%s); retrying (%d of %d).", job.label, describe_error(exc),
                                attempt + 1, retries)
                    continue
                record = SlideRecord.from_error(job.path, job.output_stem(), exc,
                                                seconds=time.perf_counter() - start, worker=worker_id())
                run.record(index, record)
                if fatal(exc):
                    raise
                break
            else:
                run.record(index, SlideRecord.from_outcome(job.path, outcome))
                break
            finally:
                if bar is not None:
                    bar.close()


class _chunk_bar:
    """A tqdm bar of one slide's chunks, fed by the executor's chunk callback."""

    def __init__(self, job: SlideJob):
        from tqdm import tqdm

        self.bar = tqdm(desc=job.label, unit="chunk", position=1, leave=False)

    def callback(self, chunk) -> None:
        self.bar.total = chunk.total
        self.bar.update(chunk.done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _distributed(run: _Run, jobs: Sequence[SlideJob], client: Any, checkpoint: str | Path, output_dir: Path,
                 settings: CohortSettings, model_loader: ModelLoader | None) -> None:
    from distributed import as_completed

    from .recycle import QuietRestarts, SlideRecycler

    quiet = QuietRestarts()
    recycle_after = settings.recycle_after
    # a retry that starts while an earlier attempt still writes waits for it, then reuses its output
    prediction = dataclasses.replace(settings.prediction, wait=None)
    if recycle_after:
        client.register_plugin(SlideRecycler(recycle_after), name=SlideRecycler.name)
        logging.getLogger(QuietRestarts.LOGGER).addFilter(quiet)  # a local cluster's nannies log here
    index: dict[str, int] = {}
    futures = []
    try:
        for i, job in enumerate(jobs):
            key = task_key(job, output_dir)
            index[key] = i
            # expected failures are retried inside the task and returned; dask's retries cover the rest
            futures.append(client.submit(slide_task, job, str(checkpoint), str(output_dir), prediction,
                                         model_loader=model_loader, weights=settings.weights, key=key,
                                         retries=int(settings.retries), pure=False))
        completed = as_completed(futures)
        futures = []  # as_completed holds them; each is released once its result is in
        for future in completed:
            i = index[future.key]
            try:
                record = _task_record(jobs[i], future.result())
            except Exception as exc:
                record = SlideRecord.from_error(jobs[i].path, jobs[i].output_stem(), exc)
            future.release()
            run.record(i, record)
    finally:
        if recycle_after:
            logging.getLogger(QuietRestarts.LOGGER).removeFilter(quiet)
            try:
                client.unregister_worker_plugin(SlideRecycler.name)
            except Exception as exc:  # the cluster may be gone already
                log.debug("Could not unregister the recycling plugin: %s", exc)


def _task_record(job: SlideJob, value: PredictionOutcome | SlideFailure) -> SlideRecord:
    """The record of what :func:`~.jobs.slide_task` returned: an outcome or a :class:`SlideFailure`."""
    if isinstance(value, SlideFailure):
        return SlideRecord.from_error(job.path, job.output_stem(), value.as_exception(), seconds=value.seconds,
                                      worker=value.worker)
    return SlideRecord.from_outcome(job.path, value)


def predict_slides(
    checkpoint: str | Path,
    slides: Iterable[str | Path | SlideJob],
    output_dir: str | Path,
    settings: CohortSettings | PredictionSettings | SlideInferenceConfig | dict[str, Any] | None = None,
    *,
    client: Any = None,
    model_loader: ModelLoader | None = None,
    on_done: Callable[[PredictionOutcome], Any] | None = None,
    **overrides: Any,
) -> list[PredictionOutcome]:
    """Predict every slide (one task each on ``client``; in this process without one) and return the
    :class:`~pfmseg_engine.jobs.PredictionOutcome` of each, in input order.

    The same run as :func:`run_cohort` (settings, inputs, retries, summary files), but a slide that still
    fails after ``retries`` raises its error here, once every other slide has finished. ``on_done`` sees
    each outcome as it finishes.
    """
    def report(record: SlideRecord) -> None:
        if on_done is not None and record.outcome is not None:
            on_done(record.outcome)

    cohort = run_cohort(checkpoint, slides, output_dir, settings, client=client, model_loader=model_loader,
                        on_record=report, **overrides)
    outcomes = []
    for record in cohort.records:
        if record.outcome is None:
            raise record.exception or RuntimeError(record.error)
        outcomes.append(record.outcome)
    return outcomes


__all__ = ["DEFAULT_RETRIES", "predict_slides", "run_cohort"]
