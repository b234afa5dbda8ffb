"""Where a label store's pixels lie on their slide: one rule for the store's NGFF transformations and for
every viewer layer that overlays it.

A pixel of a grid that is ``downsample`` slide level-0 pixels wide covers level-0 pixels
``[i * d, (i + 1) * d)`` of its row, so its centre sits ``(d - 1) / 2`` level-0 pixels after its start
(level-0 pixel (0, 0)'s centre at the origin, as NGFF and napari place pixel centres).
"""

from __future__ import annotations

from collections.abc import Sequence


def placement(unit: float, downsample: float, offset_px: Sequence[float] = (0.0, 0.0)
              ) -> dict[str, tuple[float, ...]]:
    """``scale`` and ``translate`` (y, x) of a grid whose pixels are ``downsample`` level-0 pixels wide, in
    ``unit`` per level-0 pixel (µm, or 1 for pixels); ``offset_px`` is the (y, x) level-0 pixel where the
    grid's pixel (0, 0) starts (a region)."""
    half = (float(downsample) - 1.0) / 2.0
    return {
        "scale": (unit * downsample, unit * downsample),
        "translate": tuple(unit * (float(o) + half) for o in offset_px),
    }
