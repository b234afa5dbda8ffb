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

# what the engine's reader backends open (tiffslide; OpenSlide: MIRAX, Hamamatsu, Leica, Ventana, Sakura, Zeiss;
# DICOM WSI as .dcm files or a folder of them)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".qptiff", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide",
                  ".czi", ".dcm")


def _accepts(path: Path) -> bool:
    if path.is_dir():
        return is_prediction_store(path) or _is_dicom_folder(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _is_rgb_tiff(path)
    return suffix in SLIDE_SUFFIXES


def _is_dicom_folder(path: Path) -> bool:
    """A DICOM WSI series folder (its instances as .dcm files)."""
    return next(path.glob("*.dcm"), None) is not None


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

    slide = open_slide(path, require_mpp=False)
    try:
        _check_viewable(slide, path)
    except Exception:
        slide.close()
        raise
    return slide_layer(slide)


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
    return {"suffixes": SLIDE_SUFFIXES, "directories": "OME-Zarr stores written by pfmseg"}
