"""The application layer: one job per workflow, each with one settings dataclass where its defaults live.

* :class:`SlidePrediction` (:class:`PredictionSettings`): plan -> execute -> export -> measure one slide;
  :class:`CohortSettings` for many slides (:func:`pfmseg_engine.distributed.run_cohort`).
* :class:`FineTune` (:class:`FineTuneSettings`): train a model on sparse annotations.
* :class:`Comparison`: train and rank backbones x strategies (:mod:`pfmseg_engine.compare`).
* :class:`LiveLoop` (:class:`LiveSettings`): retrain a head on stored slide features while the user paints
  (:mod:`pfmseg_engine.live`).

Each job has ``iter_run()`` (typed events; the generator returns the outcome), ``run()``, ``cancel()``
and a typed outcome. Front ends (the CLI, the cluster task, the napari widgets) build settings with
``Settings().with_overrides(**given)`` and read events; they decide nothing of their own. Names are
exported lazily: importing this package does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("EXPORTS", "ChunkDone", "Planned", "PredictionEvent", "PredictionOutcome", "PredictionSettings",
                     "SlidePrediction", "Stage"), "prediction"),
    **dict.fromkeys(("CohortSettings", "DEFAULT_RETRIES"), "cohort"),
    **dict.fromkeys(("Epoch", "FineTune", "FineTuneEvent", "FineTuneOutcome", "FineTuneSettings", "ModelReady",
                     "Status", "Step"), "finetune"),
    **dict.fromkeys(("CompareResult", "CompareSpec", "Comparison", "RunStart"), "comparison"),
    **dict.fromkeys(("LiveEvent", "LiveLoop", "LivePrediction", "LiveSettings", "LiveStep", "LiveStopped",
                     "LiveSuggestions"), "live_loop"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
