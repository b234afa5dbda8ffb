"""In which order chunks are computed and finished, and where a region lies in the output grid.

A chunk can be *computed* (its windows run, its spills handed on) at any time, but *finished*
(labels written) only once the left, upper and upper-left neighbours that spill into it have been
computed. :func:`schedule` turns any wanted finishing order (raster, or "the visible area first")
into steps that respect this: a chunk's senders are computed just before it when they have not been
yet, and a chunk computed ahead of its own finishing keeps its own accumulator as a "self" spill on
disk. Finishing always sums the same numbers in the same order, so the output is byte-identical
whatever the order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from .grid import INCOMING, Box, ChunkPlan

#: A step: ("compute", chunk) or ("finish", chunk).
Step = tuple[str, ChunkPlan]


def output_region(region: Sequence[float], downsample: float, shape: tuple[int, int]) -> Box:
    """Level-0 ``region`` (x, y, w, h) -> output-pixel box (y0, y1, x0, x1), grown to whole pixels, clipped."""
    if len(region) != 4:
        raise ConfigError(f"region must be (x, y, width, height) in level-0 pixels, got {tuple(region)}.")
    x, y, w, h = (float(v) for v in region)
    if w <= 0 or h <= 0:
        raise ConfigError(f"region {tuple(region)} is empty; width and height must be positive.")
    y0, x0 = max(0, math.floor(y / downsample)), max(0, math.floor(x / downsample))
    y1 = min(shape[0], math.ceil((y + h) / downsample))
    x1 = min(shape[1], math.ceil((x + w) / downsample))
    if y1 <= y0 or x1 <= x0:
        raise ConfigError(f"region {tuple(region)} lies outside the slide (level 0 is "
                          f"{round(shape[1] * downsample)} x {round(shape[0] * downsample)} pixels).")
    return y0, y1, x0, x1


def priority_order(order: list[ChunkPlan], box: tuple[float, float, float, float] | None) -> list[ChunkPlan]:
    """``order`` with chunks intersecting ``box`` (output pixels) first, the rest by distance to it."""
    if box is None:
        return list(order)
    by0, by1, bx0, bx1 = box

    def key(plan: ChunkPlan) -> tuple[float, tuple[int, int]]:
        y0, y1, x0, x1 = plan.box
        dy = max(0, by0 - y1 + 1, y0 - by1 + 1)
        dx = max(0, bx0 - x1 + 1, x0 - bx1 + 1)
        return float(dy * dy + dx * dx), plan.index

    return sorted(order, key=key)


def schedule(order: list[ChunkPlan], plans: dict[tuple[int, int], ChunkPlan], computed: set[tuple[int, int]],
             finished: set[tuple[int, int]]) -> list[Step]:
    """Steps that finish the chunks of ``order`` in that order, computing each chunk exactly once."""
    steps: list[Step] = []
    computed = set(computed)

    def compute(plan: ChunkPlan) -> None:
        if plan.index not in computed:
            computed.add(plan.index)
            steps.append(("compute", plan))

    for plan in order:
        if plan.index in finished:
            continue
        cy, cx = plan.index
        for direction, dy, dx in INCOMING:
            if direction in plan.senders:
                compute(plans[(cy + dy, cx + dx)])
        compute(plan)
        steps.append(("finish", plan))
    return steps
