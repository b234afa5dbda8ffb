"""What a prediction in progress looks like to napari: a multiscale labels pyramid that grows.

The engine writes level 0 of its store chunk by chunk from a worker thread and builds the coarser
levels only when the run completes (then renames the folder). The viewer cannot read that store
while it is written (a chunk file half written by one thread and decoded by another is garbage), and
its coarse levels do not exist yet, so a zoomed-out view would stay empty until the end.

So the viewer gets its own small pyramid, written on the GUI thread from each finished chunk the
engine reports (the labels arrive with the report): level 0 is the chunk as is and each coarser
level is the engine's own 2x2 mode of the level below, so the streamed pyramid equals the final one
pixel for pixel. Layers hold zarr arrays, not dask arrays: napari's dask chunk cache would keep
serving stale, empty chunks. When the run completes the layer switches to the engine's store and
this scratch pyramid is deleted.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


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


class StreamingPyramid:
    """A scratch multiscale labels pyramid in a temporary zarr folder, filled chunk by chunk."""

    def __init__(self, shape: tuple[int, int], chunk: int, folder: Path | None = None):
        import zarr

        from pfmseg_engine.inference.pyramid import pyramid_shapes

        self.folder = Path(tempfile.mkdtemp(prefix=".pfmseg-stream-", dir=folder))
        root = zarr.open_group(str(self.folder / "pyramid.zarr"), mode="w", zarr_format=3)
        self.chunk = int(chunk)
        side = min(self.chunk, 512)  # small display chunks: refreshing a view reads little
        self.levels = [root.create_array(str(i), shape=s, chunks=(min(side, s[0]), min(side, s[1])), dtype="uint8",
                                         fill_value=0)
                       for i, s in enumerate(pyramid_shapes(tuple(shape), self.chunk))]
        self.boxes: list[tuple[int, int, int, int]] = []

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.levels[0].shape)  # type: ignore[return-value]

    def add(self, box: tuple[int, int, int, int], labels: np.ndarray) -> None:
        """Write one finished chunk (labels at level 0, box = y0, y1, x0, x1) and update every level."""
        from pfmseg_engine.inference.pyramid import mode2x2

        y0, y1, x0, x1 = (int(v) for v in box)
        self.levels[0][y0:y1, x0:x1] = labels[: y1 - y0, : x1 - x0]
        self.boxes.append((y0, y1, x0, x1))
        for source, target in zip(self.levels[:-1], self.levels[1:], strict=True):
            y0, x0 = y0 // 2, x0 // 2
            y1, x1 = min(target.shape[0], -(-y1 // 2)), min(target.shape[1], -(-x1 // 2))
            block = np.asarray(source[2 * y0:min(2 * y1, source.shape[0]), 2 * x0:min(2 * x1, source.shape[1])])
            target[y0:y1, x0:x1] = mode2x2(block)[: y1 - y0, : x1 - x0]

    def data(self) -> list[Any] | Any:
        """Layer data: the list of levels (or the single level of a small output)."""
        return list(self.levels) if len(self.levels) > 1 else self.levels[0]

    def close(self) -> None:
        """Delete the scratch folder (the layer must no longer read from it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
