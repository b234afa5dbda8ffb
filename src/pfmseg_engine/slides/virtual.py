"""Synthetic slides generated lazily, block by block: any size without any memory or disk.

Benchmarks and memory tests need gigapixel slides whose tissue amount is controlled exactly; these
are white glass with H&E-coloured, textured rectangles, computed from pixel coordinates (so every
pyramid level is consistent and no pixel is stored anywhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

from .slide import Slide

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 in level-0 pixels

GLASS = np.array([242, 240, 244], np.uint8)
STAIN = np.array([176, 84, 160], np.int16)


def _block(y0: int, x0: int, h: int, w: int, downsample: int, tissue: Sequence[Box]) -> np.ndarray:
    yy = (np.arange(h) + y0) * downsample
    xx = (np.arange(w) + x0) * downsample
    out = np.empty((h, w, 3), np.uint8)
    out[:] = GLASS
    for ty0, ty1, tx0, tx1 in tissue:
        rows = (yy >= ty0) & (yy < ty1)
        cols = (xx >= tx0) & (xx < tx1)
        if rows.any() and cols.any():
            texture = ((yy[rows, None] * 7 + xx[None, cols] * 13) % 61 - 30).astype(np.int16)
            out[np.ix_(rows, cols)] = np.clip(STAIN + texture[..., None], 0, 255).astype(np.uint8)
    return out


def _level(height: int, width: int, downsample: int, tissue: Sequence[Box], chunk: int) -> da.Array:
    shape = (-(-height // downsample), -(-width // downsample), 3)

    def make(block_info=None):
        info = block_info[None]
        (y0, y1), (x0, x1), _ = info["array-location"]
        return _block(y0, x0, y1 - y0, x1 - x0, downsample, tissue)

    chunks = da.core.normalize_chunks((chunk, chunk, 3), shape)
    return da.map_blocks(make, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 3), np.uint8))


def virtual_slide(height: int, width: int, *, mpp: float = 0.25, tissue: Sequence[Box] = (),
                  downsamples: Sequence[int] = (1, 4, 16, 32), chunk: int = 1024,
                  name: str = "virtual") -> Slide:
    """A lazily generated ``height`` x ``width`` slide with tissue in the ``tissue`` boxes (level-0 px)."""
    kept = [d for d in downsamples if d == 1 or min(height, width) // d >= 16]
    levels = [_level(height, width, d, list(tissue), chunk) for d in kept]
    return Slide.from_array(levels, mpp=mpp, name=name, downsamples=[float(d) for d in kept])
