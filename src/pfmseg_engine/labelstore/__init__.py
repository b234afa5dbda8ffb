"""The label store: the OME-Zarr (NGFF 0.4/0.5) labels and probabilities that predictions and saved
annotations are written as, read back by exporters, viewers and training.

* :class:`LabelStore` / :func:`write_labels` - write chunk by chunk, with a pyramid (:mod:`.pyramid`).
* :class:`LabelOutput` - a finished store opened for reading: classes, µm/px, where it lies on its slide.
* :func:`placement` - scale and translation of a grid of coarser pixels over its slide (stores, layers).
* :func:`is_label_store`, :func:`is_zarr`, :func:`store_attributes` - what a folder is, from its
  metadata files alone.

A leaf: it imports only the engine's small shared modules (errors, storage, colours), never the
packages that use it. Names are re-exported lazily, so detection does not import zarr.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("LabelOutput", "LabelStore", "write_labels"), "omezarr"),
    "placement": "geometry",
    **dict.fromkeys(("ZARR_MARKERS", "ZARR_METADATA", "is_label_store", "is_zarr", "store_attributes"), "detect"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
