"""Multiscale pyramids of chunked zarr arrays, built chunk by chunk (memory: a few chunks).

Labels are downsampled by the 2x2 mode (ties go to the top-left pixel), which keeps thin classes
visible and never invents a label that is not present; probabilities by the 2x2 mean.
:func:`update_levels` keeps every coarser level up to date as each box of level 0 is written, so a
viewer reading the store while a prediction streams in sees a zoomed-out view too; since each update
recomputes the coarse pixels from their full 2x2 sources, the end result equals downsampling the
finished level 0, whatever order the boxes came in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np


def _pad_even(block: np.ndarray) -> np.ndarray:
    pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, block.shape[-1] % 2)]
    return np.pad(block, pad, mode="edge") if any(p[1] for p in pad) else block


def mode2x2(block: np.ndarray) -> np.ndarray:
    """Most frequent of each 2x2 group (top-left wins ties); exact for integer labels."""
    block = _pad_even(block)
    a, b = block[..., 0::2, 0::2], block[..., 0::2, 1::2]
    c, d = block[..., 1::2, 0::2], block[..., 1::2, 1::2]
    # a occurs twice or more: it wins (or ties and wins). Otherwise a pair among b, c, d outvotes it.
    pair = np.where((b == c) | (b == d), b, np.where(c == d, c, a))
    return np.where((a == b) | (a == c) | (a == d), a, pair)


def nearest2x2(block: np.ndarray) -> np.ndarray:
    return _pad_even(block)[..., 0::2, 0::2]


def mean2x2(block: np.ndarray) -> np.ndarray:
    block = _pad_even(block).astype(np.uint32)
    total = block[..., 0::2, 0::2] + block[..., 0::2, 1::2] + block[..., 1::2, 0::2] + block[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


DOWNSAMPLERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mode": mode2x2,
    "nearest": nearest2x2,
    "mean": mean2x2,
}


def pyramid_shapes(shape: tuple[int, int], chunk: int, min_side: int = 256) -> list[tuple[int, int]]:
    """Level shapes, halving (rounding up) until the image fits one chunk or gets small."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > max(chunk, min_side):
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes  # type: ignore[return-value]


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open spans with touching neighbours joined (``(0, 4), (4, 8)`` -> ``(0, 8)``)."""
    spans = sorted(spans)
    merged = [spans[0]]
    for start, stop in spans[1:]:
        if start == merged[-1][1]:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def merge_boxes(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Disjoint boxes (y0, y1, x0, x1) merged into fewer rectangles covering exactly the same pixels.

    Boxes of one row that touch side by side become one strip; strips of the same width that touch
    top to bottom become one block (whole rows of chunks written in raster order become one block).
    """
    rows: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y0, y1, x0, x1 in boxes:
        rows.setdefault((y0, y1), []).append((x0, x1))
    columns: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (y0, y1), spans in sorted(rows.items()):
        for x0, x1 in _merge_spans(spans):
            columns.setdefault((x0, x1), []).append((y0, y1))
    return sorted((y0, y1, x0, x1) for (x0, x1), spans in columns.items() for y0, y1 in _merge_spans(spans))


def _index(lead: tuple[slice, ...], rows: slice, cols: slice) -> tuple[slice, ...]:
    """The index of ``rows`` x ``cols`` under leading axes ``lead`` (channels) kept whole."""
    return (*lead, rows, cols)


def update_levels(levels: list[Any], box: tuple[int, int, int, int], method: str) -> None:
    """Recompute the coarser ``levels[1:]`` (zarr arrays, each half the one before) over level-0 ``box``.

    ``box`` is (y0, y1, x0, x1) of ``levels[0]`` just written; leading axes (channels) are kept.
    """
    reduce = DOWNSAMPLERS[method]
    y0, y1, x0, x1 = (int(v) for v in box)
    for source, target in itertools.pairwise(levels):
        lead = (slice(None),) * (source.ndim - 2)
        sh, sw = source.shape[-2:]
        th, tw = target.shape[-2:]
        y0, x0 = y0 // 2, x0 // 2
        y1, x1 = min(th, -(-y1 // 2)), min(tw, -(-x1 // 2))
        block = np.asarray(source[_index(lead, slice(2 * y0, min(2 * y1, sh)), slice(2 * x0, min(2 * x1, sw)))])
        target[_index(lead, slice(y0, y1), slice(x0, x1))] = reduce(block)[..., : y1 - y0, : x1 - x0]


def downsample_level(source: Any, target: Any, method: str, nonempty: set[tuple[int, int]], chunk: int
                     ) -> set[tuple[int, int]]:
    """Fill zarr ``target`` (half the size of ``source``, same chunking) chunk by chunk.

    ``nonempty`` are the source chunk indices holding data; returns the target's.
    """
    reduce = DOWNSAMPLERS[method]
    th, tw = target.shape[-2:]
    sh, sw = source.shape[-2:]
    lead = (slice(None),) * (source.ndim - 2)
    wanted = sorted({(cy // 2, cx // 2) for cy, cx in nonempty})
    written = set()
    for ty, tx in wanted:
        y0, x0 = ty * chunk, tx * chunk
        y1, x1 = min(y0 + chunk, th), min(x0 + chunk, tw)
        block = np.asarray(source[_index(lead, slice(2 * y0, min(2 * y1, sh)), slice(2 * x0, min(2 * x1, sw)))])
        reduced = reduce(block)[..., : y1 - y0, : x1 - x0]
        if reduced.any():
            target[_index(lead, slice(y0, y1), slice(x0, x1))] = reduced
            written.add((ty, tx))
    return written
