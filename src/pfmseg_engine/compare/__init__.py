"""Which foundation model for my slides: compare PFMs and tuning strategies on the user's own labels.

:func:`compare_models` (``python -m pfmseg_engine compare``) trains every backbone x strategy x seed on
one dataset, scores each on the same images and writes a ranked leaderboard with bootstrap confidence
intervals (:mod:`.leaderboard`); runs are resumable and a failing combination is recorded, not fatal
(:mod:`.runner`). Frozen backbones read their features from a memory-mapped cache of a fixed crop set
(:mod:`.cache`, :mod:`.data`), so comparing N backbones costs about N passes over the data plus head
training. :func:`feature_pca` shows a backbone's token features as an RGB image. The napari plugin's
Compare widget drives :class:`Comparison` with :meth:`CompareData.from_annotations`.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("CompareData", "CropSetDataset", "D4_OPS", "EXACT_TRANSFORMS", "cache_incompatibilities",
                     "exact_augmentation"), "data"),
    **dict.fromkeys(("FeatureCache", "FeatureStore", "cache_refusal", "cached_forward", "weights_identity"), "cache"),
    **dict.fromkeys(("Leaderboard", "LeaderboardRow", "METRICS", "zero_score_reason"), "leaderboard"),
    **dict.fromkeys(("Phase", "TimeBudget"), "budget"),
    **dict.fromkeys(("CompareResult", "Comparison", "RunStart", "compare_models", "score_model"), "runner"),
    **dict.fromkeys(("Combination", "CompareSpec", "parse_seeds", "parse_weights", "run_config"), "spec"),
    "feature_pca": "pca",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
