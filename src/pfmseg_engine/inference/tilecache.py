"""Decode each slide tile once: a bounded cache of aligned blocks in front of a level reader.

A chunk reads the pixels its windows cover, which reach up to a window beyond the chunk into its
right and lower neighbours; those pixels lie in slide tiles the neighbours read again. With 1024 px
chunks, 224 px windows and 512 px tiles, that is 9 tiles decoded per chunk instead of 4. The cache
reads the level in aligned blocks of whole native tiles (the slide's dask chunk side) and keeps the
most recently used ones, up to ``capacity`` bytes, so in raster order every tile is decoded about
once. Memory stays bounded whatever the slide size. Reader threads share it and each decodes the
blocks it misses itself, so blocks decode in parallel (TIFF tiles:
:func:`~pfmseg_engine.slides.readers.read_tiff_tiles`); a block two threads want at once is decoded by
one of them. Torch-free.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..slides.readers import slice_bounds

#: Default cache size: two rows of 1024 px blocks of a slide 20,000 px wide.
CAPACITY = 256 * 2**20


class _Loading:
    """A block being decoded by one thread while others wait for it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.block: np.ndarray | None = None
        self.error: BaseException | None = None


class TileCache:
    """An (H, W, 3) array-like reading ``source`` in aligned ``block`` (h, w) pieces, keeping recent pieces."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, source: Any, block: tuple[int, int], capacity: int = CAPACITY):
        self.source = source
        self.shape = (int(source.shape[0]), int(source.shape[1]), 3)
        self.block = (max(1, int(block[0])), max(1, int(block[1])))
        self.capacity = int(capacity)
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._loading: dict[tuple[int, int], _Loading] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.decoded = 0  # blocks read from the source (for tests and benchmarks)

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1 = slice_bounds(key, self.shape)
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        if y1 <= y0 or x1 <= x0:
            return out
        bh, bw = self.block
        for by in range(y0 // bh, (y1 - 1) // bh + 1):
            for bx in range(x0 // bw, (x1 - 1) // bw + 1):
                block = self._get(by, bx)
                ty0, tx0 = by * bh, bx * bw
                sy0, sy1 = max(y0, ty0), min(y1, ty0 + block.shape[0])
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + block.shape[1])
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = block[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0]
        return out

    def _get(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
            waiting = self._loading.get(key)
            if waiting is None:
                loading = self._loading[key] = _Loading()
        if waiting is not None:  # another thread decodes it: wait for its result
            waiting.event.wait()
            if waiting.error is not None:
                raise waiting.error
            assert waiting.block is not None
            return waiting.block
        try:
            block = self._load(by, bx)
        except BaseException as exc:
            loading.error = exc
            with self._lock:
                del self._loading[key]
            loading.event.set()
            raise
        loading.block = block
        with self._lock:
            del self._loading[key]
            self.decoded += 1
            self._blocks[key] = block
            self._bytes += block.nbytes
            while self._bytes > self.capacity and len(self._blocks) > 1:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= old.nbytes
        loading.event.set()
        return block

    def _load(self, by: int, bx: int) -> np.ndarray:
        """Block (by, bx) read from the source, decoded in the calling thread."""
        bh, bw = self.block
        height, width = self.shape[:2]
        return np.ascontiguousarray(self.source[by * bh:min((by + 1) * bh, height),
                                                bx * bw:min((bx + 1) * bw, width)])

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0
