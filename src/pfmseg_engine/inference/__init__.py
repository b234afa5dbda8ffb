"""Tiled sliding-window prediction of images and whole slides.

* :func:`predict_image` - probabilities of an in-memory image (image sets, napari layers).
* :func:`plan_slide` -> :class:`SlidePlan` - everything a whole-slide run decides, before any model is
  touched (torch-free): resolution, window and stride, output geometry, chunk order, names and paths.
* :func:`execute_plan` / :func:`iter_execute_plan` - run a plan with a model on a device.
* :func:`predict_slide` / :func:`iter_predict_slide` - plan and run in one call: a whole slide into
  OME-Zarr, chunk by chunk, with a per-chunk callback/iterator for viewers and resume after interruption.
  The application's slide job, :class:`pfmseg_engine.jobs.SlidePrediction`, adds exports, measurements,
  cancel and a typed outcome on top of these, with the same settings and defaults.
* :func:`write_labels` - any labels array (e.g. a napari labels layer) as the same OME-Zarr store.
* :func:`export_ome_tiff`, :func:`export_geojson` - other formats of a finished prediction.
* :func:`infer_image_set` - the seed's image-set inference (masks, overlays, metrics).

Names are re-exported lazily, so importing the package (or :mod:`.plan`) does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "export_geojson": "geojson_export",
    "export_ome_tiff": "export_tiff",
    "infer_image_set": "imageset",
    **dict.fromkeys(("LabelOutput", "LabelStore", "write_labels"), ".labelstore.omezarr"),
    **dict.fromkeys(("ModelInfo", "SlideInferenceConfig", "SlidePlan", "plan_slide"), "plan"),
    **dict.fromkeys(("ModelRunner", "model_info"), "runner"),
    **dict.fromkeys(("ChunkResult", "SlideResult", "execute_plan", "iter_execute_plan", "iter_predict_slide",
                     "predict_slide"), "slide"),
    **dict.fromkeys(("blend_weights", "predict_image", "stride_for", "window_starts"), "window"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
