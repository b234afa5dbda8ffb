"""Array-like readers of one slide level: ``shape``, ``dtype`` and ``reader[y0:y1, x0:x1]``.

They are what :class:`~pfmseg_engine.slides.slide.Slide` wraps in lazy dask arrays, and what
whole-slide inference reads regions from directly (tile-granular, no read amplification from dask
chunk boundaries). File handles are never shared: each process and each thread opens its own on
first use (tiffslide/tifffile handles are unsafe across threads and forks), and pickling drops them
so a reader can travel to dask workers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..colors import composite_on_white
from ..errors import PfmsegError, SlideError, SlidePixelLimitError
from ..limits import open_image


def slice_bounds(key: Any, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a basic 2-D slice key (what dask and callers pass).

    Public so every array-like reader (here, in inference, in the napari plugin) clips keys the same way.
    """
    if not isinstance(key, tuple):
        key = (key,)
    key = key + (slice(None),) * (2 - len(key[:2]))
    out = []
    for part, size in zip(key[:2], shape[:2], strict=True):
        if isinstance(part, (int, np.integer)):
            part = slice(int(part), int(part) + 1)
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise IndexError(f"Slide readers take contiguous slices, got {part!r}.")
        start, stop, _ = part.indices(size)
        out += [start, max(start, stop)]
    return out[0], out[1], out[2], out[3]


def _channel_key(key: Any) -> Any:
    return key[2] if isinstance(key, tuple) and len(key) > 2 else slice(None)


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Gray -> RGB, RGBA -> RGB composited on white; slides are always handed on as (h, w, 3) uint8."""
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return composite_on_white(array)
    return array[..., :3]


class ThreadLocalHandles:
    """One opened handle per (process, thread); all closed together by :meth:`close`."""

    def __init__(self, opener: Callable[[], Any]):
        self._opener = opener
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def adopt(self, handle: Any) -> None:
        """Use an already opened handle for the calling thread (the one that opened the slide)."""
        self._local.handle, self._local.pid = handle, os.getpid()
        with self._lock:
            self._all.append(handle)

    def get(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None or getattr(self._local, "pid", None) != os.getpid():
            handle = self._opener()
            self._local.handle, self._local.pid = handle, os.getpid()
            with self._lock:
                self._all.append(handle)
        return handle

    def close(self) -> None:
        with self._lock:
            handles, self._all = self._all, []
        for handle in handles:
            with contextlib.suppress(Exception):  # closing is best effort
                handle.close()
        self._local = threading.local()


class LevelReader(ABC):
    """One pyramid level of a slide file, read region by region through a backend's handle.

    Subclasses say how to open a handle (:meth:`_open`) and how to read a region of the level
    from it (:meth:`_read`, level coordinates). ``offset`` (y, x) crops the level to the slide's
    bounds (MRXS/SCN report where the scanned area lies in the full frame), so pixel (0, 0) of
    the reader is pixel ``offset`` of the backend's level. Handles are per process and thread and
    are dropped when pickled, so a reader can travel to dask workers and reopen there.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)
    backend = "file"

    def __init__(self, path: Path, level: int, shape: tuple[int, int], offset: tuple[int, int] = (0, 0),
                 handles: ThreadLocalHandles | None = None):
        self.path = Path(path)
        self.level = int(level)
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self.offset = (int(offset[0]), int(offset[1]))
        self._handles = handles or ThreadLocalHandles(self._open)

    @abstractmethod
    def _open(self) -> Any:
        """A new handle on the slide file for the calling thread (the backend's own object)."""

    @abstractmethod
    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels (y0:y1, x0:x1) of this level, in level coordinates, as (h, w, 3) uint8."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles = ThreadLocalHandles(self._open)

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1 = slice_bounds(key, self.shape)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((y1 - y0, x1 - x0, 3), np.uint8)[:, :, _channel_key(key)]
        oy, ox = self.offset
        try:
            data = np.asarray(self._read(self._handles.get(), y0 + oy, y1 + oy, x0 + ox, x1 + ox))
        except Exception as exc:
            raise SlideError(
                f"Reading region y={y0}:{y1}, x={x0}:{x1} of level {self.level} of '{self.path}' "
                f"({self.backend}) failed ({type(exc).__name__}: {exc}). The file is probably truncated or "
                "corrupt; re-copy or re-export it."
            ) from exc
        return to_rgb(data)[:, :, _channel_key(key)]

    def close(self) -> None:
        if self._handles is not None:
            self._handles.close()


def _tiff_composite_region(group: Any, composition: dict[str, Any], level: int,
                           y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A region of a level tiffslide composes from several located series (Leica SCN).

    Pixels no series covers are glass: white, as OpenSlide's transparent pixels become.
    """
    from tiffslide._zarr import get_zarr_selection

    data = np.array(get_zarr_selection(group, level, (slice(y0, y1), slice(x0, x1), slice(None))))
    covered = np.zeros(data.shape[:2], bool)
    for series, offsets in composition["located_series"].items():
        oy, ox = int(offsets[level][0]), int(offsets[level][1])
        height, width = group[f"{series}/{level}"].shape[:2]
        covered[max(oy - y0, 0):max(min(oy + height, y1) - y0, 0),
                max(ox - x0, 0):max(min(ox + width, x1) - x0, 0)] = True
    data[~covered] = 255
    return data


def tiff_level_page(handle: Any, level: int) -> Any | None:
    """The one tifffile page holding level ``level`` of a tiffslide handle, when its tiles can be read directly.

    ``None`` for what only tiffslide's zarr store assembles: levels composed of several series (Leica
    SCN), multi-page or contiguous series, series with a pixel transform, planar or volumetric pages.
    """
    if handle.properties.get("tiffslide.series-composition"):
        return None
    try:
        tiff = handle.ts_tifffile
        series = tiff.series[int(handle.properties.get("tiffslide.series-index") or 0)].levels[level]
    except Exception:  # a kerchunk-backed handle, or a layout tiffslide maps differently
        return None
    page = series.keyframe
    if (len(series) != 1 or series.dataoffset is not None or series.transform is not None
            or getattr(page, "decode", None) is None or page.dtype is None):
        return None
    shape = tuple(int(n) for n in page.shape)
    if (len(shape) not in (2, 3) or tuple(series.get_shape(None)) != shape or page.shaped[:2] != (1, 1)
            or len(page.chunks) != len(shape) or (len(shape) == 3 and page.chunked[2] != 1)):
        return None
    return page


def read_tiff_tiles(page: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixels (y0:y1, x0:x1) of a tifffile ``page``, decoding each tile (or strip) it covers in this thread.

    The same reads and decoder calls as tifffile's zarr store (so the same bytes), without its event loop:
    each reader thread decodes its own tiles while others decode theirs (imagecodecs releases the GIL).
    ``page`` must belong to a file handle of the calling thread. Absent tiles hold the page's nodata value,
    as zarr's fill value.
    """
    chunks = tuple(int(n) for n in page.chunks)
    tile_h, tile_w = chunks[:2]
    across = int(page.chunked[1])
    out = np.empty((y1 - y0, x1 - x0, *page.shape[2:]), page.dtype)
    if out.size == 0:
        return out
    decode_args: dict[str, Any] = {"_fullsize": True}
    if page.jpegtables is not None:
        decode_args["jpegtables"] = page.jpegtables
    if page.jpegheader is not None:
        decode_args["jpegheader"] = page.jpegheader
    offsets, counts = page.dataoffsets, page.databytecounts
    handle = page.parent.filehandle
    for ty in range(y0 // tile_h, (y1 - 1) // tile_h + 1):
        for tx in range(x0 // tile_w, (x1 - 1) // tile_w + 1):
            index = ty * across + tx
            ty0, tx0 = ty * tile_h, tx * tile_w
            sy0, sy1, sx0, sx1 = max(y0, ty0), min(y1, ty0 + tile_h), max(x0, tx0), min(x1, tx0 + tile_w)
            target = out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
            if index >= len(offsets) or not offsets[index] or not counts[index]:
                target[...] = page.nodata
                continue
            with handle.lock:
                handle.seek(offsets[index])
                data = handle.read(counts[index])
            tile = page.decode(data, index, **decode_args)[0]
            if tile is None or tile.size != np.prod(chunks):
                raise ValueError(f"tile {index} decoded to {None if tile is None else tile.shape}, not {chunks}")
            target[...] = tile.reshape(chunks)[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0]
    return out


class TiffLevelReader(LevelReader):
    """One pyramid level of a TIFF-family slide: tiles read and decoded by tifffile in the reading thread.

    Levels that only tiffslide's zarr store assembles (composed series, see :func:`tiff_level_page`) are read
    through that store, whose decoding runs in one event-loop thread for all callers.
    """

    backend = "tiffslide"

    def _open(self):
        import tiffslide

        return tiffslide.TiffSlide(self.path)

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        page = tiff_level_page(handle, self.level)
        if page is not None:
            return read_tiff_tiles(page, y0, y1, x0, x1)
        group = handle.zarr_group
        composition = group.attrs.get("tiffslide.series-composition")
        if composition:
            return _tiff_composite_region(group, composition, self.level, y0, y1, x0, x1)
        return np.asarray(group[str(self.level)][y0:y1, x0:x1])


#: One OpenSlide tile cache per process, shared by every handle (OpenSlide >= 4, openslide-python >= 1.3);
#: regions are read a dask chunk at a time, so a small cache is enough.
_OPENSLIDE_CACHE: list[Any] = []
OPENSLIDE_CACHE_BYTES = 64 << 20


def open_openslide(path: Path) -> Any:
    """An OpenSlide handle on ``path`` using the process's shared tile cache where supported."""
    import openslide

    handle = openslide.OpenSlide(str(path))
    cache_type = getattr(openslide, "OpenSlideCache", None)
    if cache_type is not None:
        with contextlib.suppress(Exception):  # an older OpenSlide library: keep its own cache
            if not _OPENSLIDE_CACHE:
                _OPENSLIDE_CACHE.append(cache_type(OPENSLIDE_CACHE_BYTES))
            handle.set_cache(_OPENSLIDE_CACHE[0])
    return handle


class OpenSlideLevelReader(LevelReader):
    """One pyramid level read through OpenSlide (MIRAX, Hamamatsu VMS/VMU, Leica SCN, Ventana BIF, ...).

    OpenSlide addresses regions by level-0 position, so a level region starting at (y, x) is read
    from (round(y * downsample), round(x * downsample)). Exact for the integer downsamples of most
    formats (MIRAX, VMS, SCN, BIF, DICOM); for fractional ones (some SVS) OpenSlide resamples such
    reads by a fraction of a pixel, which is why tiffslide reads those first. Transparent pixels
    (not scanned) come back white.
    """

    backend = "openslide"

    def __init__(self, path: Path, level: int, shape: tuple[int, int], offset: tuple[int, int] = (0, 0),
                 handles: ThreadLocalHandles | None = None, downsample: float = 1.0):
        self.downsample = float(downsample)
        super().__init__(path, level, shape, offset, handles)

    def _open(self):
        return open_openslide(self.path)

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        location = (round(x0 * self.downsample), round(y0 * self.downsample))
        return np.asarray(handle.read_region(location, self.level, (x1 - x0, y1 - y0)))


def open_wsidicom(files: tuple[Path, ...]) -> Any:
    """A wsidicom handle on one DICOM WSI series (its files, or the folder holding it)."""
    from wsidicom import WsiDicom

    return WsiDicom.open(files[0] if len(files) == 1 and files[0].is_dir() else [str(f) for f in files])


class DicomLevelReader(LevelReader):
    """One pyramid level of a DICOM WSI series read through wsidicom (level coordinates, exact).

    ``files`` are the series' instances (or the one folder holding them); ``dicom_level`` is
    wsidicom's pyramid index of this level (log2 of its scale, not its position in the list).
    """

    backend = "dicom"

    def __init__(self, files: tuple[Path, ...], level: int, shape: tuple[int, int], dicom_level: int,
                 handles: ThreadLocalHandles | None = None):
        self.files = tuple(Path(f) for f in files)
        self.dicom_level = int(dicom_level)
        path = self.files[0] if len(self.files) == 1 else self.files[0].parent
        super().__init__(path, level, shape, (0, 0), handles)

    def _open(self):
        return open_wsidicom(self.files)

    def _read(self, handle: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(handle.read_region((x0, y0), self.dicom_level, (x1 - x0, y1 - y0)))


class ArrayReader:
    """Any in-memory or lazy (H, W[, C]) array presented as an (H, W, 3) uint8 reader."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, array: Any):
        shape = tuple(int(s) for s in array.shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise SlideError(f"Slide arrays must be (H, W) or (H, W, 1|3|4), got shape {shape}.")
        if np.dtype(array.dtype) != np.uint8:
            raise SlideError(f"Slide arrays must be uint8, got {array.dtype}; scale to 0..255 first.")
        self.array = array
        self.shape = (shape[0], shape[1], 3)

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1 = slice_bounds(key, self.shape)
        return to_rgb(np.asarray(self.array[y0:y1, x0:x1]))[:, :, _channel_key(key)]

    def close(self) -> None:
        pass


#: What to do with a PNG/JPEG slide too large to decode whole.
PIL_SLIDE_REMEDY = ("PNG/JPEG slides are decoded whole; convert a large one to a tiled pyramidal TIFF "
                    "(e.g. vips tiffsave in.png out.tif --tile --pyramid), which is read tile by tile.")


class PILReader:
    """A PNG/JPEG image, decoded once per process on first access (PIL cannot read regions).

    Decoded whole, so its claimed size is checked against ``PFMSEG_MAX_PIXELS`` first, in every process
    (:mod:`pfmseg_engine.limits`); Pillow's process-wide limit is left alone.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, shape: tuple[int, int]):
        self._setup(path, shape)

    def _setup(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self._cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "shape": self.shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["path"], state["shape"])

    def _pixels(self) -> np.ndarray:
        with self._lock:
            if self._cache is None or self._cache[0] != os.getpid():
                try:
                    with open_image(self.path, f"Image slide '{self.path}'", error=SlidePixelLimitError,
                                    remedy=PIL_SLIDE_REMEDY) as img:
                        pixels = (composite_on_white(np.asarray(img.convert("RGBA")))
                                  if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
                                  else np.asarray(img.convert("RGB")))
                except PfmsegError:  # over the pixel limit: already one clear message
                    raise
                except Exception as exc:
                    raise SlideError(
                        f"Decoding image '{self.path}' failed ({type(exc).__name__}: {exc}); the file is "
                        "truncated or corrupt."
                    ) from exc
                self._cache = (os.getpid(), pixels)
            return self._cache[1]

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1 = slice_bounds(key, self.shape)
        return self._pixels()[y0:y1, x0:x1][:, :, _channel_key(key)]

    def close(self) -> None:
        self._cache = None


class OffsetReader:
    """A (height, width) window of another array-like reader, starting at (y0, x0) of it.

    Region prediction reads through this, so the region is an ordinary image to the chunk grid while
    every read lands at the right place of the full slide (no copy, no second file handle).
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, reader: Any, y0: int, x0: int, height: int, width: int):
        self.reader, self.y0, self.x0 = reader, int(y0), int(x0)
        self.shape = (int(height), int(width), 3)

    def __getitem__(self, key: Any) -> np.ndarray:
        y0, y1, x0, x1 = slice_bounds(key, self.shape)
        return np.asarray(self.reader[self.y0 + y0:self.y0 + y1, self.x0 + x0:self.x0 + x1])
