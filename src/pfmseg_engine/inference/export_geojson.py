"""Export predicted classes as GeoJSON polygons that QuPath imports as classified annotations.

One ``MultiPolygon`` feature per class (holes kept), coordinates in slide level-0 pixels with the
slide's bounds offset added, i.e. the frame of the original file. Polygons are traced on the
coarsest pyramid level not exceeding ``max_side`` pixels, so the export costs the same for any
slide size; pass ``level=0`` for full detail on small outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import writing
from .omezarr import LabelOutput


def _pick_level(output: LabelOutput, level: int | None, max_side: int) -> int:
    if level is not None:
        return max(0, min(level, len(output.levels) - 1))
    for i, array in enumerate(output.levels):
        if max(array.shape) <= max_side:
            return i
    return len(output.levels) - 1


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices where the ring goes straight on (lossless for traced pixel outlines)."""
    closed = ring[:-1]
    step = np.diff(np.vstack([closed[-1:], closed, closed[:1]]), axis=0)
    before, after = step[:-1], step[1:]
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.abs(cross) > 1e-9
    kept = closed[keep] if keep.any() else closed[:1]
    return np.vstack([kept, kept[:1]])


def class_polygons(mask: np.ndarray, min_area: float = 4.0) -> list[list[np.ndarray]]:
    """Polygons (outer ring, then holes; (x, y) pixel-corner coordinates) of a boolean mask.

    Each 4-connected component gives one polygon: its largest contour is the outline, the others
    its holes (tracing with background 8-connected matches 4-connected labelling exactly).
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    components, _ = ndimage.label(mask)
    sizes = np.bincount(components.ravel())
    polygons = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None or sizes[index] < min_area:
            continue
        sub = np.pad(components[box] == index, 1).astype(np.float32)
        rings = []
        for contour in find_contours(sub, 0.5, fully_connected="low"):
            if len(contour) < 4:
                continue
            # (row, col) in the padded sub-array, pixel centres -> (x, y) pixel corners in the level
            xy = np.stack([contour[:, 1] - 0.5 + box[1].start, contour[:, 0] - 0.5 + box[0].start], 1)
            rings.append(drop_collinear(xy))
        rings = [r for r in rings if len(r) >= 4]
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(_signed_area(r)))
        outer, holes = rings[0], rings[1:]
        # opposite windings for outline and holes (GeoJSON convention; QuPath accepts either)
        outer = outer if _signed_area(outer) < 0 else outer[::-1]
        holes = [h if _signed_area(h) > 0 else h[::-1] for h in holes]
        polygons.append([outer, *holes])
    return polygons


def export_geojson(store: str | Path, path: str | Path | None = None, *, level: int | None = None,
                   max_side: int = 8192, min_area: float = 4.0, add_bounds_offset: bool = True) -> Path:
    """Write a GeoJSON FeatureCollection of per-class polygons (default ``<name>.geojson`` beside it).

    Coordinates are slide level-0 pixels: a region's offset is always added (the polygons belong where
    the region lies), the file frame's ``bounds_offset`` when ``add_bounds_offset`` (QuPath's frame).
    """
    output = LabelOutput(store)
    name = output.path.name.removesuffix(".ome.zarr")
    path = Path(path) if path else output.path.with_name(f"{name}.geojson")
    chosen = _pick_level(output, level, max_side)
    labels = np.asarray(output.levels[chosen][:])
    scale = output.downsample * 2**chosen
    ry, rx = output.region_offset
    bx, by = output.bounds_offset if add_bounds_offset else (0, 0)
    ox, oy = bx + rx, by + ry
    colours = output.colours()
    features: list[dict[str, Any]] = []
    for k, class_name in enumerate(output.class_names, start=1):
        polygons = class_polygons(labels == k, min_area)
        if not polygons:
            continue
        coords = [[np.round(ring * scale + (ox, oy), 2).tolist() for ring in polygon] for polygon in polygons]
        rgb = colours.get(k, [255, 0, 0, 255])[:3]
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "name": class_name,
                           "classification": {"name": class_name, "color": rgb}, "isLocked": False},
        })
    collection = {"type": "FeatureCollection", "features": features}
    tmp = path.with_name(path.name + ".partial")
    with writing(path, "the GeoJSON export"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(json.dumps(collection))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)
    return path
