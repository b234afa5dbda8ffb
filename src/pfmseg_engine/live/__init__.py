"""Live mode: a slide feature store, a head that retrains on it while the user paints, and suggestions.

* :class:`SlideFeatureStore` - a frozen backbone's token features of a slide at the model's resolution,
  computed once (visible field first), kept in compressed zarr, resumable, one writer at a time.
* :class:`LiveLoop` / :class:`LiveSettings` - the job a front end runs in a worker: strokes in
  (``update_labels``), refreshed predictions, per-class areas and uncertainty out (``iter_run`` events);
  the head saves as an ordinary frozen-strategy checkpoint.
* :func:`suggest_regions` / :func:`write_suggestions` - where to annotate next (uncertainty x diversity
  over stored features), as QuPath GeoJSON.

Names are re-exported lazily; importing this package imports neither torch nor zarr.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("DTYPES", "FillProgress", "SlideFeatureStore", "SlideWindows", "StoreGeometry",
                     "consumed_blocks", "default_store_root", "store_refusal"), "store"),
    **dict.fromkeys(("LIVE_UNCERTAINTIES", "build_live_model", "disagreement", "labels_and_uncertainty",
                     "live_model_config", "native_logits", "uncertainty_map"), "head"),
    **dict.fromkeys(("FeatureBasis", "fold_head", "reduced_head"), "basis"),
    **dict.fromkeys(("LabelBuffer",), "labels"),
    **dict.fromkeys(("LiveEvent", "LiveLoop", "LivePrediction", "LiveSettings", "LiveStep", "LiveStopped",
                     "LiveSuggestions"), "loop"),
    **dict.fromkeys(("SuggestedRegion", "k_center_greedy", "suggest_regions", "suggestions_to_features",
                     "write_suggestions"), "suggest"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
