"""Resolution planning: which pyramid level to read, and how much to downsample it, for a target mpp.

Models are trained at one physical resolution, so inference targets microns per pixel, not a level
index. The plan takes the level nearest the target when one lies within ``tolerance``; otherwise it
reads the coarsest level finer than the target and downsamples (by an integer block mean when that
lands within tolerance, else by exact area resampling). Image pixels are never upsampled: a target
finer than level 0 is an error naming the finest possible value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import SlideError
from .readers import slice_bounds
from .slide import Slide

DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class ResolutionPlan:
    """How to produce an image at the target resolution from a slide.

    ``factor`` is level pixels per output pixel (1 = use the level as is); ``downsample`` is level-0
    pixels per output pixel (multiply output coordinates by it to get level-0 coordinates).
    """

    level: int
    level_mpp: float
    target_mpp: float
    factor: float
    mpp: float
    shape: tuple[int, int]
    downsample: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    def source(self, slide: Slide) -> Any:
        """An array-like (``shape``, ``[y0:y1, x0:x1]``) of the slide at the planned resolution."""
        reader = slide.readers[self.level]
        if self.factor == 1:
            return reader
        return ResampledReader(reader, self.factor, self.shape)


def plan_resolution(slide: Slide, target_mpp: float | None = None,
                    tolerance: float = DEFAULT_TOLERANCE) -> ResolutionPlan:
    """Plan reading ``slide`` at ``target_mpp`` (default: level 0's resolution)."""
    mpp0 = slide.require_mpp()
    target = float(target_mpp) if target_mpp else mpp0
    if not (math.isfinite(target) and target > 0):
        raise SlideError(f"Target resolution must be a positive number of um per pixel, got {target_mpp}.")
    mpps = [float(m) for m in slide.require_level_mpps()]
    near = [(abs(m / target - 1.0), i) for i, m in enumerate(mpps) if abs(m / target - 1.0) <= tolerance]
    if near:
        level, factor = min(near)[1], 1.0
    else:
        finer = [i for i, m in enumerate(mpps) if m < target]
        if not finer:
            raise SlideError(
                f"Target resolution {target:.4g} um/px is finer than slide '{slide.name}' level 0 "
                f"({mpp0:.4g} um/px) and pixels are never upsampled; use a target of at least {mpp0:.4g} "
                "(target_mpp), or correct the slide's mpp (mpp) if its metadata is wrong.",
                fix_with=("target_mpp", "mpp"),
            )
        level = max(finer, key=lambda i: mpps[i])
        factor = target / mpps[level]
        whole = round(factor)
        if whole >= 1 and abs(whole * mpps[level] / target - 1.0) <= tolerance:
            factor = float(whole)
    height, width = slide.readers[level].shape[:2]
    shape = (max(1, math.floor(height / factor)), max(1, math.floor(width / factor)))
    return ResolutionPlan(level=level, level_mpp=mpps[level], target_mpp=target, factor=factor,
                          mpp=mpps[level] * factor, shape=shape,
                          downsample=slide.downsamples[level] * factor)


class ResampledReader:
    """A level read at ``factor`` times fewer pixels per side (area averaging, never upsampling).

    Integer factors average exact ``factor x factor`` blocks (independent of how regions are
    requested, so chunked reads match a whole read); other factors use PIL's area filter.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, reader: Any, factor: float, shape: tuple[int, int]):
        if factor < 1:
            raise SlideError(f"Resampling factor {factor} would upsample; pixels are never upsampled.")
        self.reader = reader
        self.factor = float(factor)
        self.shape = (int(shape[0]), int(shape[1]), 3)

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1 = slice_bounds(key, self.shape)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        if self.factor.is_integer():
            return self._block_mean(y0, y1, x0, x1, int(self.factor))
        return self._area(y0, y1, x0, x1)

    def _block_mean(self, y0: int, y1: int, x0: int, x1: int, f: int) -> np.ndarray:
        src = np.asarray(self.reader[y0 * f:y1 * f, x0 * f:x1 * f]).astype(np.uint32)
        blocks = src.reshape(y1 - y0, f, x1 - x0, f, 3).sum(axis=(1, 3))
        return ((blocks + f * f // 2) // (f * f)).astype(np.uint8)

    def _area(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from PIL import Image

        f = self.factor
        src_h, src_w = self.reader.shape[:2]
        sy0, sx0 = max(0, math.floor(y0 * f) - 1), max(0, math.floor(x0 * f) - 1)
        sy1, sx1 = min(src_h, math.ceil(y1 * f) + 1), min(src_w, math.ceil(x1 * f) + 1)
        src = Image.fromarray(np.ascontiguousarray(self.reader[sy0:sy1, sx0:sx1]))
        box = (x0 * f - sx0, y0 * f - sy0, x1 * f - sx0, y1 * f - sy0)
        return np.asarray(src.resize((x1 - x0, y1 - y0), Image.Resampling.BOX, box=box))
