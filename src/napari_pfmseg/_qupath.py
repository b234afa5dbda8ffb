"""QuPath round trip in napari: GeoJSON in as an annotation layer (and outlines), labels out as GeoJSON.

Import reads QuPath's *Export objects as GeoJSON* through the engine (checks, repairs and messages are
the engine's), rasterises the classified areas at the annotation layer's working resolution over the
chosen slide (the same layer the Annotate widget creates, so it can be painted and trained on at once)
and adds the outlines as a shapes layer for reference. Export turns any labels layer placed on a slide
(annotations or a prediction) into QuPath objects in the slide's level-0 pixel frame. Nothing here
builds Qt objects; the widget calls these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._annotations import KIND, class_kwargs, working_plan
from ._layers import META, layer_name, placement

#: Outlines shown as shapes at most (thousands of nuclei would make the shapes layer slow).
MAX_SHAPES = 5000


def read_for_slide(path: str | Path, slide: Any, **reading: Any) -> Any:
    """The engine's annotation source of a GeoJSON file, checked against ``slide``.

    ``reading`` are :func:`~pfmseg_engine.annotations.load_annotations` options (``frame``, ``options``: the
    import options as an ``ImportOptions`` or a mapping, ``clip``, ``class_map``); what is not given is
    the engine's default. Points and lines left out are shown as one warning.
    """
    from pfmseg_engine.annotations.sources import load_annotations

    source = load_annotations(path, slide=slide, **reading)
    summary = source.file.unsupported_summary() if source.file is not None else None
    if summary:
        from ._notify import notify_warning

        notify_warning(summary)
    return source


def import_geojson(image: Any, slide: Any, path: str | Path, target_mpp: float | None, **reading: Any
                   ) -> tuple[tuple[np.ndarray, dict[str, Any]], tuple[list[np.ndarray], dict[str, Any]] | None]:
    """((labels, kwargs) of an annotation layer, (shapes data, kwargs) or None) of a QuPath GeoJSON over ``image``.

    Labels follow the plugin's convention (0 = not annotated, k = class k-1), read in QuPath's terms by
    the engine (``reading``: see :func:`read_for_slide`); classes and colours come from the file's
    classifications.
    """
    from pfmseg_engine.annotations.sources import class_table_of

    source = read_for_slide(path, slide, **reading)
    table = class_table_of([source])
    plan = working_plan(slide, target_mpp)
    labels = np.asarray(source.labels(table, plan))
    names, colours = list(table.names), [list(c) for c in table.colours]
    unit = float(image.scale[-1])
    offset = np.asarray(image.translate[-2:], float) / unit
    kwargs = {
        "name": layer_name(Path(path).stem, "annotations"),
        "metadata": {META: {"kind": KIND, "image": image.name, "slide_path": str(slide.path) if slide.path else None,
                            "slide_mpp": slide.mpp, "target_mpp": plan.mpp, "downsample": plan.downsample,
                            "shape": list(plan.shape), "class_names": names, "colours": colours,
                            "source": str(path)}},
        "units": tuple(image.units[-2:]),
        "opacity": 0.7,
        **placement(unit, plan.downsample, (float(offset[0]), float(offset[1]))),
        **class_kwargs(names, colours),
    }
    return (labels, kwargs), outline_shapes(source, table, image, Path(path).stem)


def outline_shapes(source: Any, table: Any, image: Any, name: str) -> tuple[list[np.ndarray], dict[str, Any]] | None:
    """Polygon outlines (outer rings, level-0 pixels) of a GeoJSON source as shapes over ``image``."""
    features = source.file.features if source.file is not None else []
    polygons: list[np.ndarray] = []
    edges: list[list[float]] = []
    for feature in features:
        value = table.label_of(feature.class_name)
        colour = [c / 255 for c in table.colours[value - 1]] + [1.0] if value else [0.5, 0.5, 0.5, 1.0]
        for part in getattr(feature.geometry, "geoms", [feature.geometry]):
            if len(polygons) >= MAX_SHAPES:
                break
            xy = np.asarray(part.exterior.coords)[:-1]
            # QuPath coordinates are pixel corners; the slide layer's data coordinates are pixel centres
            polygons.append(np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1))
            edges.append(colour)
    if not polygons:
        return None
    kwargs = {"name": f"{name} outlines", "shape_type": "polygon", "edge_color": edges,
              "face_color": [0, 0, 0, 0], "edge_width": 2 * float(image.scale[-1]), "scale": tuple(image.scale[-2:]),
              "translate": tuple(image.translate[-2:]), "units": tuple(image.units[-2:]),
              "metadata": {META: {"kind": "qupath-outlines", "shown": len(polygons), "total": len(features)}}}
    return polygons, kwargs


def layer_frame(layer: Any, image: Any | None = None) -> tuple[float, tuple[float, float]]:
    """(level-0 pixels per layer pixel, (x, y) level-0 pixel of the layer's pixel (0, 0) corner) of a labels
    layer placed with :func:`~._layers.placement` (over ``image``, whose pixel (0, 0) is the slide's)."""
    meta = layer.metadata.get(META, {})
    downsample = float(meta.get("downsample") or 1.0)
    unit = float(layer.scale[-1]) / downsample  # world units per level-0 pixel
    offset = np.asarray(layer.translate[-2:], float) / unit - (downsample - 1.0) / 2.0
    if image is not None:
        offset -= np.asarray(image.translate[-2:], float) / float(image.scale[-1])
    return downsample, (float(offset[1]), float(offset[0]))


def _level0(data: Any) -> Any:
    return data[0] if isinstance(data, (list, tuple)) else data


def export_layer(layer: Any, path: str | Path, *, image: Any = None, per_region: bool = False,
                 object_type: str = "annotation", min_area_um2: float = 0.0) -> Path:
    """Write a labels layer (annotations or a prediction) as QuPath GeoJSON in slide level-0 pixels.

    A prediction backed by an engine store is exported from the store (full resolution, read chunk by
    chunk); any other labels layer from its data.
    """
    from pfmseg_engine.annotations.export import labels_to_geojson

    meta = layer.metadata.get(META, {})
    names = list(meta.get("class_names") or [])
    store = meta.get("store") if meta.get("kind") == "prediction" else None
    if store and Path(store).exists():
        from pfmseg_engine.inference.geojson_export import export_geojson

        return export_geojson(store, path, per_region=per_region, object_type=object_type,
                              min_area_um2=min_area_um2 or None)
    labels = np.asarray(_level0(layer.data))
    if not names:
        top = int(labels.max()) if labels.size else 0
        from pfmseg_engine.classes import default_class_names

        names = list(default_class_names(max(1, top)))
    colours = meta.get("colours") or {}
    if isinstance(colours, list):
        colours = {i + 1: c for i, c in enumerate(colours)}
    downsample, offset = layer_frame(layer, image)
    slide_mpp = meta.get("slide_mpp") or _slide_mpp(layer, downsample)
    min_px = 4.0
    if min_area_um2 and slide_mpp:
        min_px = max(1.0, float(min_area_um2) / (slide_mpp * downsample) ** 2)
    return labels_to_geojson(labels, path, class_names=names, colours={int(k): v for k, v in colours.items()},
                             scale=downsample, offset=offset, mpp=slide_mpp, per_region=per_region,
                             object_type=object_type, min_area_px=min_px)


def _slide_mpp(layer: Any, downsample: float) -> float | None:
    units = [str(u) for u in getattr(layer, "units", ()) or ()]
    if units and units[-1] in ("µm", "micrometer", "um"):
        return float(layer.scale[-1]) / downsample
    return None


class _Meta:
    """A stand-in layer for the napari writer, which gets (data, attributes) instead of a layer."""

    def __init__(self, data: Any, attributes: dict[str, Any]):
        self.data = data
        self.metadata = attributes.get("metadata") or {}
        self.scale = attributes.get("scale") or (1.0, 1.0)
        self.translate = attributes.get("translate") or (0.0, 0.0)
        self.units = attributes.get("units") or ()


def write_geojson(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """napari writer: one labels layer -> QuPath GeoJSON (one MultiPolygon annotation per class)."""
    target = Path(path)
    if target.suffix.lower() not in (".geojson", ".json"):
        target = target.with_name(target.name + ".geojson")
    return [str(export_layer(_Meta(data, attributes), target))]
