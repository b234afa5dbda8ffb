"""The comparison job: :class:`~pfmseg_engine.compare.runner.Comparison` (``iter_run()`` events, a cancel
token, resume), re-exported so every workflow's job is found in :mod:`pfmseg_engine.jobs`."""

from __future__ import annotations

from ..compare.runner import CompareResult, Comparison, RunStart
from ..compare.spec import CompareSpec

__all__ = ["CompareResult", "CompareSpec", "Comparison", "RunStart"]
