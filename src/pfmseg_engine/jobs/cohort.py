"""The settings of a cohort run (many slides, each one :class:`~.prediction.SlidePrediction`).

:func:`pfmseg_engine.distributed.run_cohort` runs a cohort in this process or on a dask cluster; the
CLI's ``infer --slide`` overlays its flags on these settings. Fields of :class:`PredictionSettings` given
to :meth:`CohortSettings.with_overrides` go to ``prediction``, so a front end passes one flat set of names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..inference.plan import SlideInferenceConfig
from .prediction import PredictionSettings
from .settings import overlay

#: Attempts after a slide's first failure before it is recorded as failed.
DEFAULT_RETRIES = 1


@dataclass(frozen=True)
class CohortSettings:
    """``prediction``: every slide's settings. ``retries``: attempts after a slide's first failure before it
    is recorded as failed and the run goes on. ``recycle_after``: restart each cluster worker process after
    that many slides. ``summary``: write ``summary.csv``/``.json``/``.md``. ``progress``: tqdm bars.
    ``weights``: the backbone weights file, when not where the checkpoint says.
    """

    prediction: PredictionSettings = field(default_factory=PredictionSettings)
    retries: int = DEFAULT_RETRIES
    recycle_after: int | None = None
    summary: bool = True
    progress: bool = False
    weights: str | None = None

    def with_overrides(self, **changes: Any) -> CohortSettings:
        """These settings with the given fields (cohort or prediction fields) changed; None keeps the value."""
        own = {f.name for f in dataclasses.fields(self)} - {"prediction"}
        cohort = {k: v for k, v in changes.items() if k in own}
        prediction = {k: v for k, v in changes.items() if k not in own}
        result = overlay(self, cohort, "cohort")
        if prediction:
            result = dataclasses.replace(result, prediction=result.prediction.with_overrides(**prediction))
        return result

    @classmethod
    def of(cls, settings: CohortSettings | SlideInferenceConfig | Mapping[str, Any] | None = None,
           **changes: Any) -> CohortSettings:
        """Settings from cohort settings, prediction settings (a ``SlideInferenceConfig`` or its dict)."""
        if isinstance(settings, CohortSettings):
            return settings.with_overrides(**changes)
        return cls(prediction=PredictionSettings.of(settings)).with_overrides(**changes)

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prediction"},
                "prediction": self.prediction.to_dict()}


__all__ = ["DEFAULT_RETRIES", "CohortSettings"]
