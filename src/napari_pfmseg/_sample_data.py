"""Sample data: a small pyramidal TIFF demo slide built at run time, no download.

The pixels are scikit-image's immunohistochemistry image (colonic glands, DAB + hematoxylin,
"no known copyright restrictions"), which ships inside scikit-image itself. It is written once as a
tiled, pyramidal TIFF with a resolution tag into a cache folder and then opened through the same
reader as any slide, so the demo exercises the real slide path (tiffslide, lazy levels, mpp).
The microns per pixel are nominal (the source image has no calibration).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._layers import LayerDataTuple

#: Nominal resolution of the demo slide (micrometres per pixel).
DEMO_MPP = 0.5
DEMO_NAME = "pfmseg-demo-ihc"
TILE = 128
#: Bump when the file layout changes, so stale caches are rebuilt.
VERSION = 1


def cache_dir() -> Path:
    """``$PFMSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/pfmseg``, else ``~/.cache/pfmseg``."""
    if os.environ.get("PFMSEG_CACHE_DIR"):
        return Path(os.environ["PFMSEG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pfmseg"


def demo_image() -> np.ndarray:
    """The (512, 512, 3) uint8 IHC image bundled with scikit-image."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry())


def _halve(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def write_pyramid_tiff(image: np.ndarray, path: Path, mpp: float, levels: int = 3, tile: int = TILE) -> Path:
    """Write an RGB image as a tiled pyramidal TIFF (sub-resolutions as SubIFDs) atomically."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pyramid = [image]
    while len(pyramid) < levels and min(pyramid[-1].shape[:2]) >= 2 * tile:
        pyramid.append(_halve(pyramid[-1]))
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(tmp) as tif:
        for i, level in enumerate(pyramid):
            scale = mpp * image.shape[1] / level.shape[1]
            tif.write(level, subifds=len(pyramid) - 1 if i == 0 else None, subfiletype=1 if i else 0,
                      resolution=(1e4 / scale, 1e4 / scale), description="pfmseg demo slide" if i == 0 else None,
                      **options)
    os.replace(tmp, path)
    return path


def demo_slide_path() -> Path:
    """The demo slide file, written on first use."""
    path = cache_dir() / f"{DEMO_NAME}-v{VERSION}.tif"
    if not path.is_file():
        write_pyramid_tiff(demo_image(), path, DEMO_MPP)
    return path


def demo_slide() -> list[LayerDataTuple]:
    """napari sample data: the demo slide as a lazy multiscale RGB layer."""
    from ._reader import read_one

    data, meta, kind = read_one(demo_slide_path())
    meta["name"] = "demo slide (IHC)"
    return [(data, meta, kind)]
