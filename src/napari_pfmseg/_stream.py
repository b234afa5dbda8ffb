"""Redrawing a labels layer whose zarr arrays the engine fills while a prediction streams in.

The layer shows the engine's own partial OME-Zarr store (zarr writes each chunk file atomically and
the engine keeps the coarser levels up to date as chunks finish), so nothing is copied here; the only
napari-specific work is making the layer re-read what changed. Layers hold zarr arrays, not dask
arrays: napari's dask chunk cache would keep serving stale, empty chunks.
"""

from __future__ import annotations

from typing import Any


def refresh_layer(layer: Any) -> None:
    """Redraw a labels layer whose arrays changed in place, coarsest level included.

    napari keeps the coarsest level of a 2-D multiscale layer materialised in memory (an
    ``lru_cache`` behind ``_level_materializer``, used for thumbnails and for the zoomed-out view),
    so a plain ``refresh()`` would keep showing it empty. Clearing that cache first is a no-op on
    napari versions without it.
    """
    materializer = getattr(layer, "_level_materializer", None)
    clear = getattr(materializer, "cache_clear", None)
    if callable(clear):
        clear()
    layer.refresh()
