"""Redrawing a labels layer whose zarr arrays the engine fills while a prediction streams in.

The layer shows the engine's own partial OME-Zarr store (zarr writes each chunk file atomically and
the engine keeps the coarser levels up to date as chunks finish), so nothing is copied here; the only
napari-specific work is making the layer re-read what changed. Layers hold zarr arrays, not dask
arrays: napari's dask chunk cache would keep serving stale, empty chunks.

The worker never waits for the GUI thread, so the store a chunk's event names may have changed by the
time the event is handled: the run may have completed and renamed it (even between two reads of its
levels). :func:`open_levels` therefore opens the whole pyramid the plan promises, or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def open_levels(path: str | Path, shapes: Sequence[Sequence[int]]) -> list[Any] | None:
    """Every level of the label store at ``path``, read-only, if all of them are there with ``shapes``; else None.

    The engine creates every level before it reports a chunk and renames the store when the run
    completes, at any moment from the GUI thread's point of view. A store that is gone, or that lacks a
    level or has another shape, is not shown: a layer must never mix levels of two stores, hold fewer
    levels than its placeholders, or raise in napari's event loop. The caller keeps what it shows and
    tries again with the next chunk (a completed run's output is attached when the worker returns).
    """
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        levels = [root[str(level)] for level in range(len(shapes))]
    except (FileNotFoundError, KeyError):  # renamed (or removed) between two reads: not there any more
        return None
    arrays = [level for level in levels if isinstance(level, zarr.Array)]
    if len(arrays) != len(levels) or [tuple(a.shape) for a in arrays] != [tuple(shape) for shape in shapes]:
        return None
    return arrays


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
