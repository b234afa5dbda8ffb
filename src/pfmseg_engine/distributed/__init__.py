"""Cohorts: many slides, in this process or over a dask.distributed cluster, one slide per task.

* :mod:`.inputs`: slide files, globs, folders and manifest CSVs -> :class:`SlideJob` (per-slide mpp,
  name, region, target mpp); duplicates dropped.
* :mod:`.jobs`: :func:`predict_job`, one slide: the checkpoint is loaded once per worker process
  (cached) and the slide is one :class:`~pfmseg_engine.jobs.SlidePrediction`
  (plan, execute, export, measure); :func:`slide_task`, what a worker runs: that, with
  its retries, an expected failure (a corrupt or refused slide) returned as a ``SlideFailure``, not raised.
* :mod:`.recycle`: ``SlideRecycler``, the worker plugin that restarts a worker process after K slides.
* :mod:`.cohort`: :func:`run_cohort` (serial, or futures with ``retries=`` on a client, collected with
  ``as_completed``) and :func:`predict_slides`.
* :mod:`.summary`: per-slide records and ``summary.csv`` / ``summary.json`` / ``summary.md``.
* :mod:`.cluster`: ``--scheduler local[:N]`` (a LocalCluster, one worker process per GPU, pinned with
  ``CUDA_VISIBLE_DEVICES``) or an existing scheduler's address.

Because a finished slide is reused and a ``.partial`` one resumed, a task that fails or loses its
worker is simply run again, and rerunning the whole cohort only computes what is missing. Give each
worker one GPU and one thread, so slides never share a device. The cluster path needs the
``distributed`` package (``pip install "dask[distributed]"``).
"""

from __future__ import annotations

from .cohort import DEFAULT_RETRIES, predict_slides, run_cohort
from .inputs import SlideJob, collect_slides, parse_region, read_manifest
from .jobs import cached_model, predict_job, slide_task, task_key
from .summary import CohortSummary, SlideRecord

__all__ = ["DEFAULT_RETRIES", "CohortSummary", "SlideJob", "SlideRecord", "cached_model",
           "collect_slides", "parse_region", "predict_job", "predict_slides", "read_manifest", "run_cohort",
           "slide_task", "task_key"]
