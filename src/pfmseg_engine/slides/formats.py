"""``open_slide``: one opener per file family, chosen by file suffix (or content).

* Whole-slide files (SVS, NDPI, generic/pyramidal TIFF, OME-TIFF, MIRAX, Hamamatsu VMS/VMU, Leica SCN,
  Ventana BIF, Sakura SVSlide, Zeiss CZI, DICOM WSI): one of the reader backends of
  :mod:`pfmseg_engine.slides.backends` (tiffslide, OpenSlide, wsidicom), chosen per file or forced
  with ``reader=``; mpp and bounds from the metadata.
* PNG/JPEG: PIL (no region reads: decoded once per process; no trustworthy mpp, so give one).
* zarr / OME-Zarr (NGFF 0.4 and 0.5 multiscales): each dataset a level; mpp from the scale
  transformation of level 0 when its axis unit is known.

Any failure to open becomes a :class:`SlideError` that names the file and what to do about it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, cast

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..colors import composite_on_white
from ..errors import PfmsegError, SlideError, SlidePixelLimitError
from ..labelstore.detect import is_zarr
from ..limits import check_pixels, image_header_size
from ..paths import check_input_path
from .backends import (
    AUTO_ORDER,
    MPP_RANGE,
    READERS,
    UNIT_TO_UM,
    auto_backends,
    check_reader,
    check_tiles,
    describe_readers,
    open_wsi,
    plausible_mpp,
)
from .readers import PIL_SLIDE_REMEDY, ArrayReader, PILReader
from .slide import Slide, lazy_level

log = logging.getLogger(__name__)

__all__ = ["MPP_RANGE", "READERS", "SUFFIXES", "UNIT_TO_UM", "can_open", "open_slide", "slide_kind", "slide_name"]

_plausible = plausible_mpp


def _fail(path: Path, exc: BaseException, kind: str) -> SlideError:
    return SlideError(
        f"Cannot open '{path}' as a {kind} slide ({type(exc).__name__}: {exc}). The file may be truncated, "
        f"corrupt or of another format; supported: {', '.join(sorted(SUFFIXES))}."
    )


# ---- PNG / JPEG -------------------------------------------------------------------------------
def _open_pil(path: Path) -> dict[str, Any]:
    """A PNG/JPEG slide: one level, decoded whole at open (checked against the pixel limit first)."""
    try:
        height, width = image_header_size(path)
        check_pixels(height, width, f"Image slide '{path}'", error=SlidePixelLimitError, remedy=PIL_SLIDE_REMEDY)
        reader = PILReader(path, (height, width))
        reader[0:1, 0:1]  # decode now: a truncated file fails here, not mid-inference
    except PfmsegError:
        raise
    except Exception as exc:
        raise _fail(path, exc, "PNG/JPEG") from exc
    token = tokenize(str(path), path.stat().st_mtime_ns)
    return {"levels": [lazy_level(reader, None, f"pfmseg-pil-{token}")], "readers": [reader],
            "downsamples": [1.0], "mpp": None, "bounds_offset": (0, 0), "properties": {}}


# ---- zarr / OME-Zarr --------------------------------------------------------------------------
def _guess_axes(shape: tuple[int, ...]) -> list[str]:
    if len(shape) == 2:
        return ["y", "x"]
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return ["y", "x", "c"]
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return ["c", "y", "x"]
    raise SlideError(
        f"Cannot tell the axes of a zarr array of shape {shape}; store it as (y, x, c) or OME-Zarr."
    )


def _to_yxc(array: da.Array, axes: list[str]) -> da.Array:
    """Reorder any NGFF axis layout (t, c, z, y, x in any order) to (y, x, 3)."""
    index = tuple(slice(None) if a in ("y", "x", "c") else 0 for a in axes)
    array = array[index]
    kept = [a for a in axes if a in ("y", "x", "c")]
    if "c" not in kept:
        array, kept = array[..., None], [*kept, "c"]
    array = array.transpose([kept.index(a) for a in ("y", "x", "c")])
    if array.shape[2] == 1:
        array = da.concatenate([array] * 3, axis=2)
    if array.dtype != np.uint8:
        raise SlideError(f"zarr slide data must be uint8 RGB, got {array.dtype}; convert it to 8-bit first.")
    if array.shape[2] == 4:  # RGBA: composited on white, chunk by chunk
        array = array.rechunk({2: -1})
        return da.map_blocks(composite_on_white, array, chunks=(*array.chunks[:2], (3,)), dtype=np.uint8)
    return array[:, :, :3]


def _multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    return attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")


def _open_zarr(path: Path) -> dict[str, Any]:
    import zarr

    try:
        root = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise _fail(path, exc, "zarr") from exc
    mpp, downsamples = None, [1.0]
    if isinstance(root, zarr.Array):
        arrays, axes = [root], _guess_axes(root.shape)
    else:
        multiscales = _multiscales(dict(root.attrs))
        if not multiscales:
            if "0" not in root:
                raise SlideError(f"'{path}' is a zarr group without OME multiscales metadata or a '0' array.")
            arrays = [cast("zarr.Array", root["0"])]
            axes = _guess_axes(arrays[0].shape)
        else:
            meta = multiscales[0]
            arrays = [cast("zarr.Array", root[d["path"]]) for d in meta["datasets"]]
            raw_axes = meta.get("axes") or ["t", "c", "z", "y", "x"][-arrays[0].ndim:]
            axes = [a["name"] if isinstance(a, dict) else a for a in raw_axes]
            scales = [_scale(d, len(axes)) for d in meta["datasets"]]
            ix = axes.index("x")
            downsamples = [s[ix] / scales[0][ix] for s in scales]
            x_meta = raw_axes[ix]
            unit = x_meta.get("unit") if isinstance(x_meta, dict) else None
            if unit in UNIT_TO_UM:
                mpp = _plausible(scales[0][ix] * UNIT_TO_UM[unit], f"'{path}' multiscales")
    y_axis, x_axis = axes.index("y"), axes.index("x")  # chunks are decoded whole: each must fit the pixel limit
    check_tiles(path, "zarr", {str(i): (int(a.chunks[y_axis]), int(a.chunks[x_axis])) for i, a in enumerate(arrays)})
    levels = [_to_yxc(da.from_zarr(a), axes) for a in arrays]
    return {"levels": levels, "readers": [ArrayReader(level) for level in levels],
            "downsamples": downsamples, "mpp": mpp, "bounds_offset": (0, 0), "properties": {}}


def _scale(dataset: dict[str, Any], ndim: int) -> list[float]:
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            return [float(v) for v in transform["scale"]]
    return [1.0] * ndim


OPENERS = {"pil": _open_pil, "zarr": _open_zarr}
SUFFIXES = {
    **dict.fromkeys(AUTO_ORDER, "wsi"),
    ".png": "pil", ".jpg": "pil", ".jpeg": "pil",
    ".zarr": "zarr",
}


def slide_kind(path: Path, reader: str = "auto") -> str:
    """Which opener handles ``path``: "wsi" (a reader backend), "pil" or "zarr".

    A directory holding zarr metadata is zarr whatever its name; a DICOM folder, or a file with an
    unknown suffix that a backend recognises by content, is "wsi". With an explicit ``reader`` any
    file that is not PNG/JPEG/zarr goes to that backend.
    """
    if is_zarr(path):
        return "zarr"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None and (reader != "auto" or auto_backends(path)):
        kind = "wsi"
    if kind is None:
        raise SlideError(
            f"Unsupported slide file type '{path.suffix or path.name}' ('{path}'). Whole-slide files, by "
            f"reader: {', '.join(sorted(AUTO_ORDER))} and DICOM folders.\n{describe_readers()}"
        )
    return kind


def can_open(path: str | Path, reader: str = "auto") -> bool:
    """Whether :func:`open_slide` takes ``path``: a zarr folder, a PNG/JPEG, a whole-slide file by suffix
    or content, or a DICOM series folder (its files named anything). Reads at most a few header bytes.

    The question readers such as napari's ask of every path before they claim it; asking it here keeps
    them in agreement with what the engine opens (an opened file can still fail later, with a message).
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        slide_kind(path, reader)
    except (PfmsegError, OSError):
        return False
    return True


def slide_name(path: Path) -> str:
    """File name without its format suffix (``a.ome.tif`` -> ``a``, ``b.svs`` -> ``b``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", path.suffix):
        if suffix and name.lower().endswith(suffix.lower()) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def open_slide(path: str | Path, mpp: float | None = None, *, require_mpp: bool = True,
               reader: str | None = "auto") -> Slide:
    """Open a whole-slide image (or plain image, or zarr) as a :class:`Slide` of lazy levels.

    ``mpp`` overrides the level-0 microns per pixel (needed when the file has none). Without it and
    without metadata, a :class:`SlideError` says so, unless ``require_mpp=False`` (viewing only).
    ``reader`` picks the whole-slide backend: "auto" (by suffix, then content; falls back to the
    next backend that reads the file), "tiffslide", "openslide" or "dicom" (that backend only);
    see :data:`READERS`. PNG/JPEG and zarr always use their own readers. ``slide.backend`` says
    which one read the slide.
    """
    reader = check_reader(reader)
    path = check_input_path(path, "Slide", folders=True, error=SlideError)  # before any reader opens it
    kind = slide_kind(path, reader)
    if kind == "wsi":
        parts = open_wsi(path, (reader,) if reader != "auto" else auto_backends(path) or ())
    else:
        parts = {**OPENERS[kind](path), "backend": kind}
    if mpp is not None:
        if not (math.isfinite(float(mpp)) and float(mpp) > 0):
            raise SlideError(f"mpp must be a positive number of microns per pixel, got {mpp}.", fix_with=("mpp",))
        if parts["mpp"] and abs(parts["mpp"] - float(mpp)) > 0.01 * parts["mpp"]:
            log.warning("Overriding '%s' metadata mpp %.4g with %.4g.", path.name, parts["mpp"], float(mpp))
        parts["mpp"] = float(mpp)
    slide = Slide(path=path, name=slide_name(path), **parts)
    if require_mpp:
        slide.require_mpp()
    return slide
