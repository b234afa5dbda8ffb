"""Export a label store as a pyramidal OME-TIFF: the way to open a prediction in QuPath.

QuPath opens OME-TIFF with its Bio-Formats image server, which reads the image name, each channel's
name and colour, the pixel size in micrometres and the sub-resolutions, and nothing else it would
show (no OME-Zarr labels, no descriptions, no stage positions). So the export carries:

* **Pyramid**: level 0 and every coarser level of the store, as SubIFDs, tiled (the store's chunk
  side when it is a multiple of 16, else 512) and zlib-compressed; written tile by tile from the zarr
  chunks, so memory stays at one tile whatever the slide size.
* **Calibration**: ``PhysicalSizeX``/``PhysicalSizeY`` in µm (and the TIFF resolution tags, for
  readers that ignore OME-XML).
* **Classes**: the channel name, which QuPath shows (in *Brightness & contrast*), reads
  ``labels: 0=no prediction; 1=<class 0>; ...``; the image ``Description`` holds the same legend and a
  ``MapAnnotation`` (namespace :data:`CLASSES_NS`) maps each label value to its class name for scripts.
* **Placement**: ``Plane PositionX/PositionY`` are where the corner of pixel (0, 0) lies on the slide,
  in µm, in QuPath's frame of the slide (level-0 pixels of the scanned bounds, like the GeoJSON export);
  a ``MapAnnotation`` (namespace :data:`PLACEMENT_NS`) gives the same in slide level-0 pixels
  (``offset_x``, ``offset_y``) with ``downsample`` (slide level-0 pixels per TIFF pixel).

QuPath ignores stage positions and opens the TIFF as an image of its own, with (0, 0) at the
region's corner. A point at TIFF pixel (x, y) lies at slide pixel ``(offset_x + x * downsample,
offset_y + y * downsample)``; objects drawn on the TIFF move onto the slide with that transform
(QuPath script: ``PathObjectTools.transformObject(object, transform, true)`` with an
``AffineTransform`` that translates by the offset and scales by the downsample). Whole-slide outputs
have a zero offset, and the GeoJSON export is already in the slide's frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..labelstore.omezarr import LabelOutput
from ..storage import writing

#: OME ``MapAnnotation`` namespaces of the label legend and of the placement on the slide.
CLASSES_NS = "pfmseg/labels"
PLACEMENT_NS = "pfmseg/placement"
NO_PREDICTION = "no prediction"


def _tiles(array, tile: int) -> Iterator[np.ndarray]:
    height, width = array.shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.asarray(array[y:y + tile, x:x + tile])
            if block.shape != (tile, tile):
                block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1])))
            yield block


def class_legend(class_names: list[str]) -> str:
    """``0=no prediction; 1=<first class>; ...``: the label values as the TIFF's description names them."""
    return "; ".join(f"{value}={name}" for value, name in enumerate([NO_PREDICTION, *class_names]))


def ome_metadata(output: LabelOutput, name: str) -> dict[str, Any]:
    """The OME-XML of the export (tifffile ``metadata``): calibration, class names and placement."""
    mpp, slide_mpp = output.mpp, output.slide_mpp
    offset_y, offset_x = output.region_offset
    legend = class_legend(output.class_names)
    classes = {str(value): n for value, n in enumerate([NO_PREDICTION, *output.class_names])}
    placement = {"offset_x": f"{offset_x:g}", "offset_y": f"{offset_y:g}", "downsample": f"{output.downsample:g}",
                 "slide_mpp": f"{slide_mpp:g}", "frame": "slide level-0 pixels of the scanned bounds (QuPath's)"}
    return {
        "axes": "YX", "Name": name, "Description": f"pfmseg labels: {legend}",
        "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": [f"labels: {legend}"]},
        "Plane": {"PositionX": [offset_x * slide_mpp], "PositionXUnit": ["µm"],
                  "PositionY": [offset_y * slide_mpp], "PositionYUnit": ["µm"]},
        "MapAnnotation": [{"Namespace": CLASSES_NS, **classes}, {"Namespace": PLACEMENT_NS, **placement}],
    }


def export_ome_tiff(store: str | Path, path: str | Path | None = None, *, tile: int | None = None,
                    compression: str = "zlib") -> Path:
    """Write ``store``'s label pyramid to ``path`` (default: ``<name>.labels.ome.tif`` beside it).

    The file QuPath opens by drag and drop: pyramidal, calibrated, class names in the channel name,
    description and annotations, region offset in the plane position (see the module docstring).
    """
    import tifffile

    output = LabelOutput(store)
    name = output.path.name.removesuffix(".ome.zarr")
    path = Path(path) if path else output.path.with_name(f"{name}.labels.ome.tif")
    chunk = int(output.levels[0].chunks[-1])
    tile = tile or (chunk if chunk % 16 == 0 and chunk <= 2048 else 512)
    mpp = output.mpp
    tmp = path.with_name(path.name + ".partial")
    options = {"tile": (tile, tile), "compression": compression, "photometric": "minisblack",
               "dtype": np.uint8}
    with writing(path, "the OME-TIFF export"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                base = output.levels[0]
                tif.write(_tiles(base, tile), shape=base.shape, subifds=len(output.levels) - 1,
                          metadata=ome_metadata(output, name), resolution=(1e4 / mpp, 1e4 / mpp),
                          resolutionunit="CENTIMETER", **options)
                for level, array in enumerate(output.levels[1:], start=1):
                    scale = mpp * 2**level
                    tif.write(_tiles(array, tile), shape=array.shape, subfiletype=1, metadata=None,
                              resolution=(1e4 / scale, 1e4 / scale), resolutionunit="CENTIMETER", **options)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never leave a torn export behind
            raise
        tmp.replace(path)
    return path
