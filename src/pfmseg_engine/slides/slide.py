"""The :class:`Slide`: a pyramid of lazy (H, W, 3) uint8 dask arrays plus physical resolution.

Every format reader (:mod:`pfmseg_engine.slides.formats`) produces one, and everything downstream
(tissue detection, resolution planning, whole-slide inference, the napari plugin) only sees this
class, so adding a format never touches inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..errors import SlideError
from ..labelstore.detect import ZARR_METADATA
from .readers import ArrayReader

#: Dask chunks hold about this many pixels per side (a few native tiles), not one chunk per tile.
CHUNK_TARGET = 1024


def chunk_side(tile: int | None, target: int = CHUNK_TARGET) -> int:
    """A multiple of the native tile side close to ``target`` (reads stay tile-aligned)."""
    if not tile or tile <= 0:
        return target
    return max(1, round(target / tile)) * int(tile)


def lazy_level(reader: Any, tile: int | None, name: str) -> da.Array:
    """Wrap an array-like level reader in a dask array with chunks of a few native tiles."""
    side = chunk_side(tile)
    return da.from_array(reader, chunks=(side, side, 3), name=name, asarray=False, lock=False,
                         meta=np.empty((0, 0, 3), dtype=np.uint8), inline_array=True)


@dataclass
class Slide:
    """A whole-slide image: lazy pyramid levels and microns per pixel.

    ``levels[i]`` is an (H_i, W_i, 3) uint8 dask array; nothing is read until computed or sliced.
    ``readers[i]`` is the array-like behind it (tile-granular reads, used by inference).
    ``mpp`` is level 0's microns per pixel (``None`` only when opened with ``require_mpp=False``).
    ``bounds_offset`` is (x, y) of this slide's pixel (0, 0) in the file's full level-0 frame (non-zero
    for formats whose scanned area does not start at the origin, e.g. MRXS, SCN); every level covers
    that bounds region only.
    ``backend`` is what read the pixels: "tiffslide", "openslide", "dicom", "pil", "zarr" or "array".
    """

    levels: list[da.Array]
    readers: list[Any]
    mpp: float | None
    downsamples: list[float]
    path: Path | None = None
    name: str = "slide"
    bounds_offset: tuple[int, int] = (0, 0)
    properties: dict[str, Any] = field(default_factory=dict)
    backend: str = "array"

    def __post_init__(self) -> None:
        if not self.levels or not len(self.levels) == len(self.readers) == len(self.downsamples):
            raise SlideError(f"Slide '{self.name}' needs one reader and one downsample per level.")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise SlideError(f"Slide '{self.name}': microns per pixel must be positive, got {self.mpp}.")

    # ---- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0, as OpenSlide reports it."""
        return self.level_dimensions[0]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(a.shape[1]), int(a.shape[0])) for a in self.levels]

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_mpps(self) -> list[float | None]:
        return [self.mpp * d if self.mpp else None for d in self.downsamples]

    def require_level_mpps(self) -> list[float]:
        """Microns per pixel of every level, or the error of :meth:`require_mpp`."""
        mpp = self.require_mpp()
        return [mpp * d for d in self.downsamples]

    def require_mpp(self) -> float:
        """Level-0 microns per pixel, or a clear error saying how to supply it."""
        if self.mpp is None:
            raise SlideError(
                f"Slide '{self.path or self.name}' has no microns-per-pixel in its metadata; give it "
                "explicitly (mpp=0.5 for 0.5 um per pixel, e.g. open_slide(path, mpp=0.5)).",
                fix_with=("mpp",),
            )
        return self.mpp

    def content_identity(self, header_bytes: int = 1 << 16) -> dict[str, Any]:
        """Who this slide is, independent of the path it was reached by.

        Name, size and a hash of the first ``header_bytes`` of the file (for a folder such as
        zarr: of its metadata files), plus geometry and resolution. A relative path, an absolute
        path or another mount point of the same file give the same identity, so an interrupted
        output resumes whichever way the slide is named next time.
        """
        import hashlib

        digest, size = hashlib.sha1(), None
        path = self.path
        if path is not None and path.is_file():
            size = path.stat().st_size
            with open(path, "rb") as handle:
                digest.update(handle.read(header_bytes))
        elif path is not None and path.is_dir():
            metas = sorted(p for p in path.rglob("*") if p.name in ZARR_METADATA)
            if not metas:  # a folder of slide files (a DICOM WSI series): their names and headers
                metas = sorted(p for p in path.iterdir() if p.is_file())
            for meta in metas:
                digest.update(meta.relative_to(path).as_posix().encode())
                with open(meta, "rb") as handle:
                    digest.update(handle.read(header_bytes))
        return {"name": self.name, "size": size, "header_sha1": digest.hexdigest() if path else None,
                "mpp": self.mpp, "dimensions": list(self.dimensions)}

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of a region of ``level`` as (h, w, 3) uint8 (tile-granular read)."""
        return np.asarray(self.readers[level][y0:y1, x0:x1])

    # ---- life cycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close every file handle any thread opened (the slide stays usable; handles reopen)."""
        for reader in self.readers:
            close = getattr(reader, "close", None)
            if close:
                close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g} um/px" if self.mpp else "no mpp"
        dims = ", ".join(f"{w}x{h}" for w, h in self.level_dimensions)
        return f"Slide('{self.name}', levels [{dims}], {mpp})"

    # ---- construction from arrays -----------------------------------------------------------
    @classmethod
    def from_array(
        cls,
        levels: Any | Sequence[Any],
        mpp: float | None,
        *,
        name: str = "array",
        downsamples: Sequence[float] | None = None,
        bounds_offset: tuple[int, int] = (0, 0),
    ) -> Slide:
        """A slide from (H, W[, 3]) uint8 arrays: numpy, zarr, or lazy dask (virtual slides, layers).

        ``levels`` is one array or a pyramid, finest first; ``downsamples`` default to the size ratios.
        """
        arrays = list(levels) if isinstance(levels, (list, tuple)) else [levels]
        readers = [a if isinstance(a, ArrayReader) else ArrayReader(a) for a in arrays]
        if downsamples is None:
            downsamples = [readers[0].shape[1] / r.shape[1] for r in readers]
        token = tokenize(name, [id(r.array) for r in readers], [r.shape for r in readers])
        dask_levels = []
        for i, (reader, raw) in enumerate(zip(readers, arrays, strict=True)):
            if isinstance(raw, da.Array) and raw.ndim == 3 and raw.shape[2] == 3:
                dask_levels.append(raw)
            else:
                dask_levels.append(lazy_level(reader, 256, f"pfmseg-array-{token}-{i}"))
        return cls(levels=dask_levels, readers=readers, mpp=mpp, downsamples=[float(d) for d in downsamples],
                   name=name, bounds_offset=(int(bounds_offset[0]), int(bounds_offset[1])))
