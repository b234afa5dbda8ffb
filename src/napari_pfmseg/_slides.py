"""From napari layers back to engine slides, and from viewer geometry to slide pixel boxes.

An image layer opened by our reader remembers its file, so the engine reopens it with tile-granular
readers; any other RGB image layer (a PNG dropped on napari, a numpy array) becomes an in-memory
slide. Boxes are always (y0, y1, x0, x1) in slide level-0 pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._layers import META, MICRON


def level_arrays(layer: Any) -> list[Any]:
    """The pyramid levels of an image layer (one level for a single-scale layer)."""
    return list(layer.data) if layer.multiscale else [layer.data]


def layer_mpp(layer: Any) -> float | None:
    """Microns per level-0 pixel of an image layer: our metadata, else its scale when in micrometres."""
    meta = layer.metadata.get(META, {})
    if meta.get("mpp"):
        return float(meta["mpp"])
    units = [str(u) for u in getattr(layer, "units", ())]
    if units and units[-1] in (MICRON, "micrometer", "um"):
        return float(layer.scale[-1])
    return None


def slide_from_layer(layer: Any, mpp: float | None = None) -> Any:
    """The engine ``Slide`` behind ``layer`` with ``mpp`` (default: what the layer knows)."""
    from pfmseg_engine import SlideError
    from pfmseg_engine.slides import Slide, open_slide

    if not getattr(layer, "rgb", False):
        raise SlideError(f"Layer '{layer.name}' is not an RGB image; choose the slide's image layer.")
    mpp = mpp or layer_mpp(layer)
    path = layer.metadata.get(META, {}).get("path")
    if path:
        return open_slide(path, mpp=mpp, require_mpp=False)
    levels = [_as_uint8(level) for level in level_arrays(layer)]
    return Slide.from_array(levels, mpp, name=layer.name)


#: Where a user gives a slide without calibration its µm/px (named by every message that asks for it).
MPP_FIELD = "the Annotate dock's 'slide µm/px' field"


def set_slide_mpp(layer: Any, mpp: float) -> None:
    """Give a slide layer without calibration its microns per pixel: metadata, scale and units (µm)."""
    meta = {**layer.metadata.get(META, {}), "mpp": float(mpp), "mpp_entered": True}
    layer.metadata = {**layer.metadata, META: meta}
    layer.scale = (float(mpp), float(mpp))
    layer.units = (MICRON, MICRON)


def calibrate_slide(layer: Any, mpp: float) -> None:
    """The user's µm/px for a slide whose file has none: the layer moves to µm, and the value is
    remembered for the file, so the slide opens calibrated next time."""
    from . import _preferences

    set_slide_mpp(layer, mpp)
    path = layer.metadata.get(META, {}).get("path")
    if path:
        _preferences.set_slide_mpp(path, mpp)


def entered_mpp_allowed(layer: Any) -> bool:
    """Whether the user may set ``layer``'s µm/px: its file has none (or the user gave it before)."""
    meta = layer.metadata.get(META, {})
    return not meta.get("mpp") or bool(meta.get("mpp_entered"))


def require_slide_mpp(slide: Any, layer: Any) -> float:
    """``slide``'s µm/px, or a :class:`SlideError` that says where the napari user enters it."""
    if slide.mpp:
        return float(slide.mpp)
    from pfmseg_engine import SlideError

    raise SlideError(f"Slide '{layer.name}' has no microns per pixel in its file. Enter it in {MPP_FIELD} "
                     "(remembered for this file); the slide and its layers are then shown in µm.")


def _as_uint8(array: Any) -> Any:
    if np.dtype(array.dtype) == np.uint8:
        return array
    from pfmseg_engine import SlideError

    raise SlideError(f"Image data of dtype {array.dtype} is not 8-bit RGB; convert the layer to uint8 first.")


def world_per_pixel(layer: Any) -> float:
    """World units per level-0 pixel of an image layer (its scale)."""
    return float(layer.scale[-1])


def visible_box(viewer: Any, layer: Any) -> tuple[float, float, float, float]:
    """The level-0 pixel box of ``layer`` currently in view (clipped to the slide)."""
    canvas = _canvas_world_box(viewer)
    unit = world_per_pixel(layer)
    origin = np.asarray(layer.translate[-2:], float)
    height, width = level_arrays(layer)[0].shape[:2]
    y0, y1 = ((canvas[0] - origin[0]) / unit, (canvas[1] - origin[0]) / unit)
    x0, x1 = ((canvas[2] - origin[1]) / unit, (canvas[3] - origin[1]) / unit)
    return max(0.0, y0), min(float(height), y1), max(0.0, x0), min(float(width), x1)


def canvas_size(viewer: Any) -> tuple[float, float]:
    """The canvas's (height, width) in screen pixels, from napari's public canvas model (``viewer.canvas``,
    napari >= 0.9); 600 x 800 where there is none (older napari, a viewer model without a window)."""
    size = getattr(getattr(viewer, "canvas", None), "size", None)
    if size is None:
        return 600.0, 800.0
    height, width = (float(v) for v in size)
    return height, width


def _canvas_world_box(viewer: Any) -> tuple[float, float, float, float]:
    """World (y0, y1, x0, x1) under the canvas, from the camera and canvas models (napari's public
    ``viewer.camera`` and ``viewer.canvas.size``, height x width).

    Both models are up to date as soon as they are set (vispy's own transforms only after the next
    draw), so a view set programmatically is honoured at once.
    """
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 moved it
    centre = np.asarray(camera.center[-2:], float)
    height, width = canvas_size(viewer)
    half = np.asarray((height, width)) / float(camera.zoom) / 2.0
    return centre[0] - half[0], centre[0] + half[0], centre[1] - half[1], centre[1] + half[1]


def shapes_box(shapes: Any, image: Any, index: int | None = None) -> tuple[float, float, float, float]:
    """Level-0 box around the selected (else all) shapes of a shapes layer."""
    from pfmseg_engine import DataError

    if not len(shapes.data):
        raise DataError(f"Shapes layer '{shapes.name}' holds no shape; draw a rectangle around the region first.")
    chosen = sorted(shapes.selected_data) or range(len(shapes.data))
    if index is not None:
        chosen = [index]
    points = np.concatenate([np.asarray(shapes.data[i])[:, -2:] for i in chosen])
    world = np.asarray([shapes.data_to_world(p) for p in points])[:, -2:]
    unit = world_per_pixel(image)
    origin = np.asarray(image.translate[-2:], float)
    pix = (world - origin) / unit
    height, width = level_arrays(image)[0].shape[:2]
    y0, x0 = np.maximum(pix.min(0), 0)
    y1, x1 = pix.max(0)
    return float(y0), float(min(height, y1)), float(x0), float(min(width, x1))


def box_area(box: tuple[float, float, float, float]) -> float:
    return max(0.0, box[1] - box[0]) * max(0.0, box[3] - box[2])


def round_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return (math.floor(box[0]), math.ceil(box[1]), math.floor(box[2]), math.ceil(box[3]))
