"""A tissue region of interest as a mask on a slide's grid: a QuPath GeoJSON, a label store, a mask image,
a shapely geometry or an array, whichever a user has.

Tissue detection (:func:`pfmseg_engine.slides.detect_tissue`) takes one to replace or limit what it finds;
the conversion lives here, beside the GeoJSON reader and the rasterisers it uses, so that the slide
package only asks for the mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DataError, PixelLimitError
from ..limits import open_image
from ..paths import check_input_path
from .geojson import read_geojson
from .rasterize import PolygonLabels, StoreLabels


class SlideFrame(Protocol):
    """What an ROI needs of its slide: level-0 size, the QuPath bounds offset and a name for messages."""

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def bounds_offset(self) -> tuple[int, int]: ...

    @property
    def path(self) -> Path | None: ...

    @property
    def name(self) -> str: ...


def roi_mask(slide: SlideFrame, roi: Any, shape: tuple[int, int], downsample: float, frame: str = "qupath"
             ) -> tuple[np.ndarray, str]:
    """(boolean mask on the ``shape`` grid of ``downsample`` level-0 px per pixel, description) of an ROI."""
    if isinstance(roi, (str, Path)):
        path = Path(roi).expanduser()
        name = f"roi: {path.name}"
        check_input_path(path, "Tissue ROI", folders=True, error=DataError,  # a pipe would block its reader
                         hint="give a QuPath GeoJSON, a label store or a mask image")
        if path.is_dir():
            labels = StoreLabels(path, shape, downsample)
            return np.asarray(labels) > 0, name
        if path.suffix.lower() in (".geojson", ".json"):
            found = read_geojson(path, frame=frame, bounds_offset=slide.bounds_offset, keep_unclassified=True)
            if not found.features:
                raise DataError(f"Tissue ROI '{path}' holds no areas (Polygon/MultiPolygon); draw the tissue regions "
                                "in QuPath and export them with File > Export objects as GeoJSON.")
            _check_roi_on_slide([f.geometry for f in found.features if not f.ignored], slide, f"'{path}'")
            return _polygon_mask([f.geometry for f in found.features], [not f.ignored for f in found.features],
                                 shape, downsample), name
        try:
            with open_image(path, f"Tissue ROI '{path}'") as img:  # decoded whole: within the pixel limit
                image = np.asarray(img.convert("L")) > 0
        except PixelLimitError:
            raise
        except Exception as exc:
            raise DataError(f"Tissue ROI '{path}' is not GeoJSON, a label store or an image ({exc}).") from exc
        return _resize_mask(image, slide, shape, downsample), name
    if hasattr(roi, "geom_type"):
        _check_roi_on_slide([roi], slide, "geometry")
        return _polygon_mask([roi], [True], shape, downsample), "roi: geometry"
    array = np.asarray(roi)
    if array.ndim != 2:
        raise DataError(f"A tissue ROI array must be 2-D (H, W), got shape {array.shape}.")
    return _resize_mask(array != 0, slide, shape, downsample), "roi: mask"


def _check_roi_on_slide(geometries: list[Any], slide: SlideFrame, what: str) -> None:
    """Refuse an ROI whose areas all lie off the slide: it would select no tissue, so a run would plan
    0 windows and end "successfully" with an empty prediction."""
    import shapely

    geometries = [g for g in geometries if not g.is_empty]
    if not geometries:
        return
    x0, y0, x1, y1 = shapely.total_bounds(geometries)
    width, height = slide.dimensions
    if x1 > 0 and y1 > 0 and x0 < width and y0 < height:
        return
    raise DataError(f"Tissue ROI {what} lies at x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f} but slide "
                    f"'{slide.path or slide.name}' is {width} x {height} level-0 px: the ROI covers none of the "
                    "slide. Fix: give the ROI drawn on this slide (level-0 pixel coordinates, as QuPath shows it).")


def _polygon_mask(geometries: list[Any], inside: list[bool], shape: tuple[int, int], downsample: float) -> np.ndarray:
    labels = PolygonLabels(geometries, [1 if keep else 0 for keep in inside], shape, downsample)
    return np.asarray(labels) > 0


def _resize_mask(mask: np.ndarray, slide: SlideFrame, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """A whole-slide mask at any resolution, sampled (nearest, at pixel centres) onto the thumbnail grid."""
    width0, height0 = slide.dimensions
    rows = ((np.arange(shape[0]) + 0.5) * downsample * mask.shape[0] / height0).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * downsample * mask.shape[1] / width0).astype(np.int64)
    return mask[np.ix_(np.clip(rows, 0, mask.shape[0] - 1), np.clip(cols, 0, mask.shape[1] - 1))]
