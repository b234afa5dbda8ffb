"""Export a finished label store as GeoJSON polygons that QuPath imports as classified objects.

One ``MultiPolygon`` feature per class, or one ``Polygon`` feature per connected region
(``per_region=True``), as QuPath ``annotation`` or ``detection`` objects, holes kept, with the area in
``measurements``; regions below ``min_area_um2`` are left out. Polygons are traced on the coarsest
pyramid level not exceeding ``max_side`` pixels, so the export costs the same for any slide size; pass
``level=0`` for full detail on small outputs.

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

from pathlib import Path

from ..annotations.export import OBJECT_TYPES, class_polygons, drop_collinear, labels_to_features, write_geojson
from ..errors import ConfigError
from .omezarr import LabelOutput

__all__ = ["FRAMES", "OBJECT_TYPES", "class_polygons", "drop_collinear", "export_geojson", "frame_offset"]

FRAMES = ("qupath", "file")


def _pick_level(output: LabelOutput, level: int | None, max_side: int) -> int:
    if level is not None:
        return max(0, min(level, len(output.levels) - 1))
    for i, array in enumerate(output.levels):
        if max(array.shape) <= max_side:
            return i
    return len(output.levels) - 1


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


def export_geojson(store: str | Path, path: str | Path | None = None, *, level: int | None = None,
                   max_side: int = 8192, min_area: float = 4.0, min_area_um2: float | None = None,
                   per_region: bool = False, object_type: str = "annotation", frame: str = "qupath",
                   add_bounds_offset: bool | None = None, measurements: bool = True) -> Path:
    """Write a GeoJSON FeatureCollection of the store's classes (default ``<name>.geojson`` beside it).

    ``per_region``: one feature per connected region instead of one per class; ``object_type``:
    "annotation" or "detection" (QuPath object type); ``min_area_um2``: leave out regions smaller than
    this many µm² (``min_area``: the same in pixels of the traced level, used when it is not given);
    ``frame``: "qupath" or "file" (see the module docstring; ``add_bounds_offset=True``/``False`` is the
    older spelling of "file"/"qupath").
    """
    if add_bounds_offset is not None:
        frame = "file" if add_bounds_offset else "qupath"
    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"GeoJSON object type '{object_type}' is not one of {', '.join(OBJECT_TYPES)}.")
    output = LabelOutput(store)
    name = output.path.name.removesuffix(".ome.zarr")
    path = Path(path) if path else output.path.with_name(f"{name}.geojson")
    chosen = _pick_level(output, level, max_side)
    labels = output.levels[chosen][:]
    scale = output.downsample * 2**chosen  # slide level-0 px per traced pixel
    mpp0 = slide_mpp(output)
    if min_area_um2 is not None:
        if not mpp0:
            raise ConfigError("min_area_um2 needs the store's resolution (µm per pixel), which it does not record; "
                              "give min_area in pixels instead.")
        min_area = max(1.0, float(min_area_um2) / (mpp0 * scale) ** 2)
    features = labels_to_features(labels, class_names=output.class_names, colours=output.colours(), scale=scale,
                                  offset=frame_offset(output, frame), mpp=mpp0, per_region=per_region,
                                  object_type=object_type, min_area_px=min_area, measurements=measurements)
    return write_geojson(features, path)
