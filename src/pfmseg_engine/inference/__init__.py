"""Tiled sliding-window prediction of images and whole slides.

* :func:`predict_image` - probabilities of an in-memory image (image sets, napari layers).
* :func:`predict_slide` / :func:`iter_predict_slide` - a whole slide into OME-Zarr, chunk by chunk,
  with a per-chunk callback/iterator for viewers and resume after interruption.
* :func:`write_labels` - any labels array (e.g. a napari labels layer) as the same OME-Zarr store.
* :func:`export_ome_tiff`, :func:`export_geojson` - other formats of a finished prediction.
* :func:`infer_image_set` - the seed's image-set inference (masks, overlays, metrics).
"""

from __future__ import annotations

from .export_geojson import export_geojson
from .export_tiff import export_ome_tiff
from .imageset import infer_image_set
from .omezarr import LabelOutput, LabelStore, write_labels
from .runner import ModelInfo, ModelRunner, model_info
from .slide import ChunkResult, SlideInferenceConfig, SlideResult, iter_predict_slide, predict_slide
from .window import blend_weights, predict_image, stride_for, window_starts

__all__ = [
    "ChunkResult",
    "LabelOutput",
    "LabelStore",
    "ModelInfo",
    "ModelRunner",
    "SlideInferenceConfig",
    "SlideResult",
    "blend_weights",
    "export_geojson",
    "export_ome_tiff",
    "infer_image_set",
    "iter_predict_slide",
    "model_info",
    "predict_image",
    "predict_slide",
    "stride_for",
    "window_starts",
    "write_labels",
]
