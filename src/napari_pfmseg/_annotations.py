"""Annotation labels layers: created on a working resolution of a slide, with classes as metadata.

A gigapixel labels layer cannot be painted in napari, so annotations live on a *working
resolution* (e.g. 2 um/px): a labels array of that size whose ``scale``/``translate`` place it
exactly over the slide. The engine's resolution plan for that mpp is stored with the layer, so the
training patches are read from the slide at the very same resolution (:func:`training_pairs`).
Label 0 means "not annotated", label k means class k-1 (the engine's sparse-label convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._layers import META, class_features, label_colormap, layer_name, placement

KIND = "annotation"


def is_annotation_layer(layer: Any) -> bool:
    return layer.metadata.get(META, {}).get("kind") == KIND


def is_trainable_labels(layer: Any) -> bool:
    """Layers training can read labels from: annotation layers, and any single-scale labels layer."""
    return is_annotation_layer(layer) or (layer.__class__.__name__ == "Labels" and not layer.multiscale)


def working_plan(slide: Any, target_mpp: float | None) -> Any:
    """The engine's resolution plan (level, resampling, shape) for annotating at ``target_mpp``."""
    from pfmseg_engine.slides import plan_resolution

    return plan_resolution(slide, target_mpp or slide.require_mpp())


def new_annotation_layer(image: Any, slide: Any, target_mpp: float | None, class_names: Sequence[str],
                         colours: Sequence[Sequence[int]], name: str | None = None) -> tuple[np.ndarray, dict]:
    """(zeros, layer kwargs) of an annotation layer over ``image`` at ``target_mpp`` (um/px)."""
    plan = working_plan(slide, target_mpp)
    unit = float(image.scale[-1])
    offset = np.asarray(image.translate[-2:], float) / unit
    kwargs = {
        "name": name or layer_name(image.name, "annotations"),
        "metadata": {META: {"kind": KIND, "image": image.name, "slide_path": str(slide.path) if slide.path else None,
                            "slide_mpp": slide.mpp, "target_mpp": plan.mpp, "downsample": plan.downsample,
                            "shape": list(plan.shape), "class_names": list(class_names),
                            "colours": [list(c) for c in colours]}},
        "units": tuple(image.units[-2:]),
        "opacity": 0.7,
        **placement(unit, plan.downsample, (float(offset[0]), float(offset[1]))),
    }
    kwargs.update(class_kwargs(class_names, colours))
    return np.zeros(plan.shape, dtype=np.uint8), kwargs


def annotation_store_layer(path: Any, name: str | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """A saved annotation store (labels written by the plugin) as a paintable annotation layer tuple.

    Whatever its size (a store larger than one chunk is saved as a pyramid), the full-resolution level is
    read into memory as a plain array, so napari can paint it and the Train widget can train on it; its
    classes, colours, resolution and placement come from the store.
    """
    from pathlib import Path

    from pfmseg_engine.labelstore.omezarr import LabelOutput

    from ._layers import default_colours, world_units

    output = LabelOutput(path)
    names = output.class_names
    stored = output.colours()
    defaults = default_colours(len(names))
    colours = [list(stored.get(i + 1, defaults[i]))[:3] for i in range(len(names))]
    data = np.asarray(output.levels[0][:], dtype=np.uint8)
    slide_mpp = output.pfmseg.get("slide", {}).get("mpp") or output.mpp / output.downsample
    unit, units = world_units(slide_mpp)
    offset = output.region_offset
    meta = {"kind": KIND, "image": None, "slide_path": None, "slide_mpp": slide_mpp, "target_mpp": output.mpp,
            "downsample": output.downsample, "shape": list(data.shape), "class_names": list(names),
            "colours": colours, "store": str(output.path), "offset_px": [float(o) for o in offset]}
    kwargs = {"name": name or Path(output.path).name.removesuffix(".ome.zarr").removesuffix(".zarr"),
              "metadata": {META: meta}, "units": (units, units), "opacity": 0.7,
              **placement(unit, output.downsample, offset), **class_kwargs(names, colours)}
    return data, kwargs, "labels"


def class_kwargs(class_names: Sequence[str], colours: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Colormap and features of a labels layer for these classes."""
    return {"colormap": label_colormap({i + 1: c for i, c in enumerate(colours)}),
            "features": class_features(class_names, "not annotated")}


def set_classes(layer: Any, class_names: Sequence[str], colours: Sequence[Sequence[int]]) -> None:
    """Rename/recolour the classes of an annotation layer (label values stay)."""
    meta = dict(layer.metadata.get(META, {}))
    meta.update(class_names=list(class_names), colours=[list(c) for c in colours])
    layer.metadata = {**layer.metadata, META: meta}
    kwargs = class_kwargs(class_names, colours)
    layer.colormap = kwargs["colormap"]
    layer.features = kwargs["features"]


def classes_of(layer: Any) -> tuple[list[str], list[list[int]]]:
    """(class names, colours) of an annotation layer; labels layers of other origin get defaults."""
    from pfmseg_engine.classes import default_class_names

    from ._layers import default_colours

    meta = layer.metadata.get(META, {})
    names = list(meta.get("class_names") or [])
    if not names:
        top = int(np.asarray(layer.data).max()) if np.asarray(layer.data).size else 0
        names = list(default_class_names(max(1, top)))
    colours = [list(c) for c in meta.get("colours") or []]
    if len(colours) < len(names):
        colours += default_colours(len(names))[len(colours):]
    return names, colours[: len(names)]


def pixel_counts(labels: Any, num_classes: int) -> list[int]:
    """Annotated pixels per class (index k-1 counts label k)."""
    values = np.asarray(labels)
    counts = np.bincount(values.ravel(), minlength=num_classes + 1) if values.size else np.zeros(num_classes + 1)
    return [int(c) for c in counts[1:num_classes + 1]]


def training_pairs(slide: Any, image: Any, labels_layer: Any) -> tuple[Any, np.ndarray, Any]:
    """(image source at the working resolution, labels snapshot, resolution plan) for the engine.

    The labels are copied, so painting while training runs never changes what the trainer reads.
    """
    from pfmseg_engine import DataError

    labels = np.array(labels_layer.data, copy=True)
    if labels.ndim != 2:
        raise DataError(f"Annotation layer '{labels_layer.name}' has {labels.ndim} dimensions; annotations are 2-D.")
    from ._slides import require_slide_mpp

    meta = labels_layer.metadata.get(META, {})
    chosen = bool(meta.get("target_mpp"))
    if chosen:
        target = float(meta["target_mpp"])
    else:  # a labels layer made by hand: infer its resolution from the scale ratio
        target = require_slide_mpp(slide, image) * float(labels_layer.scale[-1]) / float(image.scale[-1])
    plan = working_plan(slide, target)
    if tuple(plan.shape) != tuple(labels.shape):
        # quote the layer's own resolution only when one was chosen for it; an inferred one means nothing to the user
        at = f" at its {plan.mpp:.3g} µm/px" if chosen else ""
        raise DataError(
            f"Annotation layer '{labels_layer.name}' is {labels.shape[1]}x{labels.shape[0]} px but does not line up "
            f"with slide '{image.name}' (which{at} is {plan.shape[1]}x{plan.shape[0]} px); create the annotation "
            "layer with the Annotate widget so it lines up with the slide."
        )
    if not labels.any():
        raise DataError(f"Annotation layer '{labels_layer.name}' is empty; paint at least one class (label 1 = "
                        "first class) before training.")
    return plan.source(slide), labels, plan
