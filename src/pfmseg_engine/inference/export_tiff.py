"""Export a label store as a pyramidal OME-TIFF (tiled, zlib, sub-resolutions as SubIFDs).

For tools that do not read OME-Zarr yet (QuPath's image server, ImageJ/Bio-Formats, vips). Written
tile by tile from the zarr chunks, so memory stays at one tile whatever the slide size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..storage import writing
from .omezarr import LabelOutput


def _tiles(array, tile: int) -> Iterator[np.ndarray]:
    height, width = array.shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.asarray(array[y:y + tile, x:x + tile])
            if block.shape != (tile, tile):
                block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1])))
            yield block


def export_ome_tiff(store: str | Path, path: str | Path | None = None, *, tile: int | None = None,
                    compression: str = "zlib") -> Path:
    """Write ``store``'s label pyramid to ``path`` (default: ``<name>.labels.ome.tif`` beside it)."""
    import tifffile

    output = LabelOutput(store)
    name = output.path.name.removesuffix(".ome.zarr")
    path = Path(path) if path else output.path.with_name(f"{name}.labels.ome.tif")
    chunk = int(output.levels[0].chunks[-1])
    tile = tile or (chunk if chunk % 16 == 0 and chunk <= 2048 else 512)
    mpp = output.mpp
    classes = "; ".join(f"{i + 1}={n}" for i, n in enumerate(output.class_names))
    metadata = {"axes": "YX", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm", "Name": name,
                "Description": f"pfmseg labels: 0=no prediction; {classes}"}
    tmp = path.with_name(path.name + ".partial")
    options = {"tile": (tile, tile), "compression": compression, "photometric": "minisblack",
               "dtype": np.uint8}
    with writing(path, "the OME-TIFF export"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                base = output.levels[0]
                tif.write(_tiles(base, tile), shape=base.shape, subifds=len(output.levels) - 1, metadata=metadata,
                          resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **options)
                for level, array in enumerate(output.levels[1:], start=1):
                    scale = mpp * 2**level
                    tif.write(_tiles(array, tile), shape=array.shape, subfiletype=1, metadata=None,
                              resolution=(1e4 / scale, 1e4 / scale), resolutionunit="CENTIMETER", **options)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never leave a torn export behind
            raise
        tmp.replace(path)
    return path
