"""Labels out as GeoJSON that QuPath imports: per class or per connected region, with holes and areas.

Polygons are traced along pixel edges (4-connected regions, holes kept, collinear vertices dropped; each
outline holds exactly the centres of its pixels, so rasterising it again gives the same labels) and
scaled to slide level-0 pixels; areas are the regions' pixel counts. Each feature is a
QuPath object: ``objectType`` "annotation" (editable regions) or "detection" (many small objects such as
nuclei, drawn fast and measured by QuPath), ``classification`` with name and colour, and
``measurements`` with the area ("Area µm^2" when the resolution is known, else "Area px^2" in level-0
pixels), in QuPath's own format (an object of name -> value, as QuPath 0.4+ writes it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

OBJECT_TYPES = ("annotation", "detection")


def signed_area(ring: np.ndarray) -> float:
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
    """Polygons (outer ring, then holes; (x, y) pixel-edge coordinates) of a boolean mask.

    Each 4-connected component of at least ``min_area`` pixels gives one polygon: its largest contour is
    the outline, the others its holes (tracing with background 8-connected matches 4-connected labelling).
    Outlines run along pixel edges, cutting convex corners diagonally through edge midpoints, so a polygon
    contains exactly the centres of its component's pixels.
    """
    return [polygon for polygon, _ in class_regions(mask, min_area)]


def class_regions(mask: np.ndarray, min_area: float = 4.0) -> list[tuple[list[np.ndarray], int]]:
    """(polygon, pixel count) of every 4-connected component of ``mask`` (see :func:`class_polygons`)."""
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
        rings.sort(key=lambda r: -abs(signed_area(r)))
        outer, holes = rings[0], rings[1:]
        # opposite windings for outline and holes (GeoJSON convention; QuPath accepts either)
        outer = outer if signed_area(outer) < 0 else outer[::-1]
        holes = [h if signed_area(h) > 0 else h[::-1] for h in holes]
        polygons.append(([outer, *holes], int(sizes[index])))
    return polygons


def polygon_area(polygon: Sequence[np.ndarray]) -> float:
    """Area of an (outer ring, holes...) polygon in its own units squared."""
    return abs(signed_area(polygon[0])) - sum(abs(signed_area(h)) for h in polygon[1:])


def _measurements(area_px: float, mpp: float | None) -> dict[str, float]:
    if mpp:
        return {"Area µm^2": round(area_px * mpp * mpp, 4)}
    return {"Area px^2": round(area_px, 4)}


def labels_to_features(labels: np.ndarray, *, class_names: Sequence[str],
                       colours: Mapping[int, Sequence[int]] | None = None, scale: float = 1.0,
                       offset: tuple[float, float] = (0.0, 0.0), mpp: float | None = None,
                       per_region: bool = False, object_type: str = "annotation", min_area_px: float = 4.0,
                       measurements: bool = True) -> list[dict[str, Any]]:
    """QuPath GeoJSON features of an (H, W) labels array (0 = nothing, k = ``class_names[k-1]``).

    ``scale`` is slide level-0 pixels per label pixel and ``offset`` the (x, y) level-0 pixel where label
    pixel (0, 0)'s corner lies; ``mpp`` the slide's level-0 micrometres per pixel (areas in µm^2). One
    MultiPolygon feature per class, or with ``per_region`` one Polygon feature per connected region.
    Regions smaller than ``min_area_px`` label pixels are left out.
    """
    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"GeoJSON object type '{object_type}' is not one of {', '.join(OBJECT_TYPES)}.")
    from ..colors import class_palette

    labels = np.asarray(labels)
    palette = class_palette(len(class_names), None, class_names)
    colours = dict(colours or {})
    ox, oy = float(offset[0]), float(offset[1])
    features: list[dict[str, Any]] = []
    for k, class_name in enumerate(class_names, start=1):
        regions = class_regions(labels == k, min_area_px)
        if not regions:
            continue
        polygons = [polygon for polygon, _ in regions]
        rgb = [int(v) for v in list(colours.get(k) or palette[k - 1])[:3]]
        properties = {"objectType": object_type, "classification": {"name": class_name, "color": rgb}}
        if object_type == "annotation":
            properties.update(name=class_name, isLocked=False)
        coords = [[np.round(ring * scale + (ox, oy), 2).tolist() for ring in polygon] for polygon in polygons]
        areas = [pixels * scale * scale for _, pixels in regions]  # exact: pixel counts, in level-0 px^2
        if per_region:
            for polygon, area in zip(coords, areas, strict=True):
                feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": polygon},
                           "properties": dict(properties)}
                if measurements:
                    feature["properties"]["measurements"] = _measurements(area, mpp)
                features.append(feature)
        else:
            feature = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": coords},
                       "properties": dict(properties)}
            if measurements:
                feature["properties"]["measurements"] = {**_measurements(sum(areas), mpp),
                                                         "Num regions": float(len(polygons))}
            features.append(feature)
    return features


def write_geojson(features: Sequence[dict[str, Any]], path: str | Path, what: str = "the GeoJSON export") -> Path:
    """Write a FeatureCollection atomically (a temporary file, then rename)."""
    from ..storage import writing

    path = Path(path)
    collection = {"type": "FeatureCollection", "features": list(features)}
    tmp = path.with_name(path.name + ".partial")
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(json.dumps(collection, ensure_ascii=False), encoding="utf-8")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)
    return path


def labels_to_geojson(labels: np.ndarray, path: str | Path, **options: Any) -> Path:
    """:func:`labels_to_features` written to ``path`` (napari: a labels layer as QuPath annotations)."""
    return write_geojson(labels_to_features(labels, **options), path)
