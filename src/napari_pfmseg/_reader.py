"""Reader: whole-slide images as lazy multiscale RGB layers, engine predictions as labels layers.

Labels saved from napari by this plugin (annotation layers) reopen as paintable annotation layers, at
any size, so they can be painted and trained on again; engine predictions open as read-only multiscale
labels.

Slides open through the engine's ``open_slide`` (tiffslide, OpenSlide or wsidicom, chosen per file), so the viewer
sees exactly the pyramid and microns per pixel that training and inference use. Nothing is read
until napari asks for the tiles in view. Returns layer data tuples only; never builds Qt objects.

The reader claims only what it opens: slide files, and zarr folders that pfmseg wrote (predictions,
saved annotation layers). Any other OME-Zarr image is declined, so napari hands it to
napari-ome-zarr.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._layers import LayerDataTuple, is_annotation_store, is_prediction_store, prediction_layer, slide_layer
from ._torch_guard import guard_triton

#: Plain images: napari's own reader opens them; this reader leaves them to it.
PLAIN_IMAGES = (".png", ".jpg", ".jpeg")


def _accepts(path: Path) -> bool:
    """Whether this reader claims ``path``: what the engine opens (its ``can_open``), less what other readers
    serve better: plain images (napari's own reader), zarr folders pfmseg did not write (napari-ome-zarr)
    and TIFFs that are not 2-D RGB images (stacks, grey images)."""
    from pfmseg_engine.slides.formats import can_open

    if path.is_dir() and (is_prediction_store(path) or is_annotation_store(path)):
        return True
    if path.suffix.lower() in (*PLAIN_IMAGES, ".zarr") or not can_open(path):
        return False
    if path.suffix.lower() in (".tif", ".tiff"):
        return _is_rgb_tiff(path)
    return True


def _is_rgb_tiff(path: Path) -> bool:
    """Whether a TIFF is a 2-D RGB(A) image (a slide); other TIFFs (stacks, gray) are left to other readers."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return len(series.shape) == 3 and series.shape[-1] in (3, 4) and series.axes[-1] in "SC"
    except Exception:  # unreadable or not a TIFF at all: not ours
        return False


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerDataTuple]] | None:
    """Return :func:`read_slides` when every path is something we open, else None (napari asks others)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_accepts(Path(p)) for p in paths):
        return None
    return read_slides


def read_slides(path: str | list[str]) -> list[LayerDataTuple]:
    """One layer per path: engine prediction stores as labels, everything else as an RGB slide."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [read_one(Path(p)) for p in paths]


def read_one(path: Path) -> LayerDataTuple:
    """Open one slide or prediction store lazily (errors name the file and what to do)."""
    guard_triton()
    if path.is_dir() and is_annotation_store(path):  # saved annotations: paintable and trainable again
        from ._annotations import annotation_store_layer

        return annotation_store_layer(path)
    if path.is_dir() and is_prediction_store(path):
        return prediction_layer(path)
    from pfmseg_engine.slides import open_slide

    from . import _preferences

    slide = open_slide(path, require_mpp=False)
    entered = _preferences.slide_mpp(path) if not slide.mpp else None
    if entered:  # the µm/px the user gave this file before: open it calibrated, in µm
        slide.close()
        slide = open_slide(path, mpp=entered)
    try:
        _check_viewable(slide, path)
    except Exception:
        slide.close()
        raise
    data, meta, kind = slide_layer(slide)
    if entered:
        meta["metadata"]["pfmseg"]["mpp_entered"] = True
    return data, meta, kind


def _check_viewable(slide: Any, path: Path) -> None:
    """Refuse a slide without a pyramid over the engine's pixel limit: napari draws a single-level layer whole,
    so its one level would be decoded at once (``PFMSEG_MAX_PIXELS``, see :mod:`pfmseg_engine.limits`)."""
    if slide.level_count > 1:
        return
    from pfmseg_engine.errors import SlidePixelLimitError
    from pfmseg_engine.limits import check_pixels

    width, height = slide.dimensions
    check_pixels(height, width, f"Slide '{path}' (one level, no pyramid: napari shows it whole)",
                 error=SlidePixelLimitError,
                 remedy="Give it a pyramid (e.g. vips tiffsave in.tif out.tif --tile --pyramid) to view it.")


def reader_info() -> dict[str, Any]:
    """What this reader accepts (for documentation and tests)."""
    return {"files": "what pfmseg_engine.slides.can_open accepts, except plain PNG/JPEG images and TIFFs that "
                     "are not 2-D RGB",
            "directories": "DICOM WSI series folders, and OME-Zarr stores written by pfmseg"}
