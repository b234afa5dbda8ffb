"""Layer data tuples for slides and predictions, and the metadata that ties layers to slides.

Readers, sample data and widgets all build layers here, so a slide opened from the File menu, the
demo sample and a prediction streamed by the Predict widget carry the same metadata and the same
physical placement. Nothing in this module builds Qt objects or imports torch.

World coordinates are micrometres when the slide's microns per pixel are known (the scale of level
0), else level-0 pixels. A layer at ``d`` level-0 pixels per pixel gets ``scale = d * s`` and
``translate = (d - 1) / 2 * s`` (``s`` = world units per level-0 pixel): its pixel ``i`` covers
level-0 pixels ``[i*d, (i+1)*d)``, whose centre is at ``(i*d + (d-1)/2) * s``. That is the pixel
convention the engine's OME-Zarr outputs use too, so annotations, predictions and the slide line up
exactly at full resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Key of our entry in ``layer.metadata``.
META = "pfmseg"
MICRON = "µm"
PIXEL = "pixel"

LayerDataTuple = tuple[Any, dict[str, Any], str]


def unit_label(unit: Any) -> str:
    """A layer unit as a user reads it: ``µm`` for napari's ``micrometer``, ``px`` for ``pixel``."""
    text = str(unit)
    return {"micrometer": MICRON, "um": MICRON, MICRON: MICRON, "pixel": "px", "": "px"}.get(text, text)


def layer_name(stem: str, kind: str) -> str:
    """``"<stem> <kind>"``, without repeating a kind the stem already ends with (``annotations.geojson``
    imports as "annotations", not "annotations annotations")."""
    stem = stem.strip()
    if not stem:
        return kind
    return stem if stem.lower().endswith(kind.lower()) else f"{stem} {kind}"


def world_units(mpp: float | None) -> tuple[float, str]:
    """World units per level-0 pixel and their name: micrometres when known, else pixels."""
    return (float(mpp), MICRON) if mpp else (1.0, PIXEL)


def placement(unit: float, downsample: float, offset_px: Sequence[float] = (0.0, 0.0)) -> dict[str, Any]:
    """``scale``/``translate`` of a 2-D layer whose pixels are ``downsample`` level-0 pixels wide, placed by
    the rule the engine's stores use (:func:`pfmseg_engine.labelstore.placement`), so layers and stores line up.

    ``offset_px`` is the (y, x) level-0 pixel where the layer's pixel (0, 0) starts (regions).
    """
    from pfmseg_engine.labelstore.geometry import placement as engine_placement

    return dict(engine_placement(unit, downsample, offset_px))


def slide_metadata(slide: Any) -> dict[str, Any]:
    """What widgets need to reopen the slide behind an image layer (path, mpp, pyramid)."""
    return {
        "kind": "slide",
        "path": str(slide.path) if slide.path else None,
        "name": slide.name,
        "mpp": slide.mpp,
        "downsamples": [float(d) for d in slide.downsamples],
        "dimensions": [list(d) for d in slide.level_dimensions],
    }


def slide_layer(slide: Any, name: str | None = None) -> LayerDataTuple:
    """A lazy multiscale RGB image layer of a :class:`pfmseg_engine.slides.Slide`."""
    levels = list(slide.levels)
    unit, units = world_units(slide.mpp)
    meta = {
        "name": name or slide.name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "contrast_limits": (0, 255),
        "units": (units, units),
        "metadata": {META: slide_metadata(slide)},
        **placement(unit, 1.0),
    }
    return (levels if len(levels) > 1 else levels[0], meta, "image")


def label_colormap(colours: Mapping[int, Sequence[int]]) -> dict[int | None, list[float]]:
    """napari direct label colormap from ``{label: [r, g, b(, a)]}`` in 0..255; 0 stays transparent."""
    cmap: dict[int | None, list[float]] = {None: [0.0, 0.0, 0.0, 0.0], 0: [0.0, 0.0, 0.0, 0.0]}
    for value, rgba in colours.items():
        if int(value) == 0:
            continue
        rgba = list(rgba) + [255] * (4 - len(rgba))
        cmap[int(value)] = [c / 255.0 for c in rgba[:4]]
    return cmap


def default_colours(num_classes: int) -> list[list[int]]:
    """Class colours (RGB 0..255) shared with the engine's outputs, so annotations match predictions."""
    from pfmseg_engine.colors import class_palette

    return [[int(v) for v in rgb] for rgb in class_palette(num_classes)]


def class_features(class_names: Sequence[str], background: str) -> dict[str, list[Any]]:
    """napari labels ``features``: label value -> class name (shown in the status bar on hover)."""
    return {"index": list(range(len(class_names) + 1)), "class": [background, *class_names]}


def prediction_metadata(path: Path | None, class_names: Sequence[str], colours: Mapping[int, Sequence[int]],
                        downsample: float, offset_px: Sequence[float] = (0.0, 0.0), **extra: Any
                        ) -> dict[str, Any]:
    """Metadata of a prediction labels layer (its engine store, classes and placement on the slide)."""
    return {
        "kind": "prediction",
        "store": str(path) if path else None,
        "class_names": list(class_names),
        "colours": {int(k): list(v) for k, v in colours.items()},
        "downsample": float(downsample),
        "offset_px": [float(o) for o in offset_px],
        **extra,
    }


def prediction_layer(path: str | Path, name: str | None = None, world: tuple[float, str] | None = None,
                     offset_px: Sequence[float] = (0.0, 0.0)) -> LayerDataTuple:
    """A read-only multiscale labels layer of an engine OME-Zarr prediction store.

    ``world`` is (units per level-0 pixel, unit name) of the slide layer it overlays; by default the
    store's own micrometres.
    """
    from pfmseg_engine.labelstore.omezarr import LabelOutput

    output = LabelOutput(path)
    if tuple(offset_px) == (0.0, 0.0):  # a region prediction records where it lies on its slide
        offset_px = output.region_offset
    unit, units = world or world_units(output.slide_mpp)
    colours = output.colours() or {i + 1: c for i, c in enumerate(default_colours(len(output.class_names)))}
    levels = list(output.levels)
    meta = {
        "name": name or output.path.name.removesuffix(".ome.zarr"),
        "multiscale": len(levels) > 1,
        "colormap": label_colormap(colours),
        "opacity": 0.6,
        "units": (units, units),
        "features": class_features(output.class_names, "no prediction"),
        "metadata": {META: prediction_metadata(output.path, output.class_names, colours, output.downsample,
                                               offset_px)},
        **placement(unit, output.downsample, offset_px),
    }
    return (levels if len(levels) > 1 else levels[0], meta, "labels")


def is_annotation_store(path: Path) -> bool:
    """Whether a zarr folder holds labels saved from napari (an annotation layer), not an engine prediction.

    The plugin's writer records ``source: napari-pfmseg``; inference outputs record a run ``fingerprint``.
    Such stores reopen as paintable annotation layers whatever their size.
    """
    from pfmseg_engine.labelstore.detect import store_attributes

    block = store_attributes(path) or {}
    return bool(block.get("class_names")) and (block.get("kind") == "annotation"
                                              or (block.get("source") == "napari-pfmseg"
                                                  and "fingerprint" not in block))


def is_prediction_store(path: Path) -> bool:
    """Whether a zarr folder is a label store pfmseg wrote (a prediction, or labels saved by the plugin).

    The engine's rule (:func:`pfmseg_engine.labelstore.is_label_store`): only the ``pfmseg`` metadata block
    counts, so other OME-Zarr images and label images go to other readers (napari-ome-zarr), which napari
    asks when this reader declines.
    """
    from pfmseg_engine.labelstore.detect import is_label_store

    return is_label_store(path)
