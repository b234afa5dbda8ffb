"""Export a finished label store as GeoJSON polygons that QuPath imports as classified objects.

One ``MultiPolygon`` feature per class, or one ``Polygon`` feature per connected region
(``per_region=True``), as QuPath ``annotation`` or ``detection`` objects, holes kept, with a stable
``id`` and the area in ``measurements`` ("pfmseg: area µm^2"); regions below ``min_area_um2`` are left
out. Outlines follow pixel edges, so QuPath's own "Area µm^2" of an object equals ours.

Resolution: level 0 of the store (every pixel, so every nucleus) by default, whatever the slide size:
the store is read chunk by chunk, regions crossing chunk borders are joined exactly and each is written
once, as soon as it is complete (see :mod:`pfmseg_engine.annotations.export`), so memory holds a few
chunks and the regions still open on the frontier. ``level=k`` traces pyramid level k instead,
``mpp=...`` the coarsest level at least that fine, ``max_side=...`` the finest level whose longest side
is at most that many pixels (faster, coarser outlines; small objects can vanish).

Coordinates are slide level-0 pixels. A region prediction's offset is always added (the polygons
belong where the region lies). The scanned-area bounds offset follows QuPath's convention: QuPath's
OpenSlide server crops every image that has ``openslide.bounds-*`` (MIRAX, Leica SCN, ...) to those
bounds (``OpenslideImageServer``: unless the image was added with ``--no-crop``), i.e. QuPath's pixel
(0, 0) is the bounds origin, which is also our slide's pixel (0, 0); formats without bounds have a
zero offset. So ``frame="qupath"`` (default) adds no bounds offset, for every format, and
``frame="file"`` adds it (the file's full level-0 frame: OpenSlide ``read_region``, QuPath with
``--no-crop``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..annotations.export import (
    OBJECT_TYPES,
    FeatureStyle,
    class_polygons,
    drop_collinear,
    tile_boxes,
    trace_regions,
    write_regions,
)
from ..errors import ConfigError
from ..labelstore.omezarr import LabelOutput

__all__ = ["FRAMES", "OBJECT_TYPES", "class_polygons", "drop_collinear", "export_geojson", "frame_offset",
           "pick_level"]

FRAMES = ("qupath", "file")
MIN_TILE = 256  # tiles of at least this side (several small chunks at once): fewer, larger numpy passes


def pick_level(output: LabelOutput, level: int | None = None, mpp: float | None = None,
               max_side: int | None = None) -> int:
    """The pyramid level to trace: ``level``, else the coarsest level at least as fine as ``mpp`` µm/px,
    else the finest whose longest side is at most ``max_side`` px, else 0 (full resolution)."""
    given = [name for name, value in (("level", level), ("mpp", mpp), ("max_side", max_side)) if value is not None]
    if len(given) > 1:
        raise ConfigError(f"GeoJSON export takes one of level, mpp and max_side, not {' and '.join(given)}.")
    last = len(output.levels) - 1
    if level is not None:
        if not 0 <= int(level) <= last:
            raise ConfigError(f"GeoJSON export level {level} does not exist in '{output.path}': its levels are "
                              f"0 (full resolution) to {last}.")
        return int(level)
    if mpp is not None:
        if float(mpp) <= 0:
            raise ConfigError(f"GeoJSON export resolution must be positive µm per pixel, got {mpp}.")
        fine_enough = [k for k in range(last + 1) if output.mpp * 2**k <= float(mpp) * (1 + 1e-6)]
        return max(fine_enough, default=0)
    if max_side is not None:
        return next((k for k, array in enumerate(output.levels) if max(array.shape) <= max_side), last)
    return 0


def frame_offset(output: LabelOutput, frame: str = "qupath") -> tuple[float, float]:
    """(x, y) level-0 pixel offset of the store's pixel (0, 0) corner in the chosen coordinate frame."""
    if frame not in FRAMES:
        raise ConfigError(f"Unknown GeoJSON coordinate frame '{frame}'; choose one of {', '.join(FRAMES)}.")
    ry, rx = output.region_offset
    bx, by = output.bounds_offset if frame == "file" else (0, 0)
    return bx + rx, by + ry


def slide_mpp(output: LabelOutput) -> float | None:
    """Micrometres per slide level-0 pixel of a store (None when unknown)."""
    recorded = output.pfmseg.get("slide", {}).get("mpp")
    if recorded:
        return float(recorded)
    try:
        return output.mpp / output.downsample
    except (KeyError, IndexError, ZeroDivisionError):
        return None


def store_identity(output: LabelOutput, level: int) -> str:
    """What names a store's exported objects in their ids: its name, what made it (the run's fingerprint),
    its geometry and classes, and the traced level. The same store exported again gives the same ids."""
    name = output.path.name.removesuffix(".partial").removesuffix(".ome.zarr")
    what = {"name": name, "fingerprint": output.pfmseg.get("fingerprint"),
            "shape": list(output.levels[0].shape), "classes": output.class_names,
            "region_offset": list(output.region_offset), "level": level}
    return json.dumps(what, sort_keys=True, default=str)


def _tile(array, tile: int | None) -> tuple[int, int]:
    if tile is not None:
        return int(tile), int(tile)
    cy, cx = (int(c) for c in array.chunks[-2:])
    return cy * math.ceil(MIN_TILE / cy), cx * math.ceil(MIN_TILE / cx)


def export_geojson(store: str | Path, path: str | Path | None = None, *, level: int | None = None,
                   mpp: float | None = None, max_side: int | None = None, min_area: float = 4.0,
                   min_area_um2: float | None = None, per_region: bool = False, object_type: str = "annotation",
                   frame: str = "qupath", add_bounds_offset: bool | None = None, measurements: bool = True,
                   progress: bool = False, tile: int | None = None) -> Path:
    """Write a GeoJSON FeatureCollection of the store's classes (default ``<name>.geojson`` beside it).

    ``level`` / ``mpp`` / ``max_side``: the resolution traced (default: level 0, every pixel; see the
    module docstring); ``per_region``: one feature per connected region instead of one per class;
    ``object_type``: "annotation" or "detection" (QuPath object type); ``min_area_um2``: leave out regions
    smaller than this many µm² (``min_area``: the same in pixels of the traced level, used when it is not
    given); ``frame``: "qupath" or "file" (``add_bounds_offset=True``/``False`` is the older spelling of
    "file"/"qupath"); ``progress``: a progress bar over the tiles read; ``tile``: the side of the tiles read
    at once (default: the store's chunks, several of them when they are smaller than 256 px).
    """
    if add_bounds_offset is not None:
        frame = "file" if add_bounds_offset else "qupath"
    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"GeoJSON object type '{object_type}' is not one of {', '.join(OBJECT_TYPES)}.")
    output = LabelOutput(store)
    name = output.path.name.removesuffix(".ome.zarr")
    path = Path(path) if path else output.path.with_name(f"{name}.geojson")
    chosen = pick_level(output, level, mpp, max_side)
    labels = output.levels[chosen]
    scale = output.downsample * 2**chosen  # slide level-0 px per traced pixel
    mpp0 = slide_mpp(output)
    if min_area_um2 is not None:
        if not mpp0:
            raise ConfigError("min_area_um2 needs the store's resolution (µm per pixel), which it does not record; "
                              "give min_area in pixels instead.")
        min_area = max(1.0, float(min_area_um2) / (mpp0 * scale) ** 2)
    style = FeatureStyle(tuple(output.class_names), output.colours(), scale, frame_offset(output, frame), mpp0,
                         per_region, object_type, measurements, store_identity(output, chosen), float(min_area))
    tiles = _tile(labels, tile)
    bar = None
    if progress:
        from tqdm import tqdm

        boxes = tile_boxes((labels.shape[0], labels.shape[1]), tiles)
        bar = tqdm(total=len(boxes), desc=f"GeoJSON {name}", unit="tile", leave=False)
    try:
        return write_regions(trace_regions(labels, tile=tiles, progress=bar.update if bar else None), path, style)
    finally:
        if bar is not None:
            bar.close()
