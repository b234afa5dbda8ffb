"""A demo slide any install can build offline, and an annotation derived from its stains.

The pixels are scikit-image's immunohistochemistry image (colonic glands, DAB + haematoxylin, no
known copyright restrictions), which ships inside scikit-image. It is written as a tiled pyramidal
TIFF so the demo goes through the same slide reader, resolution plan and tiling as a real slide. Its microns per
pixel are nominal: the source image carries no calibration.

The annotation comes from colour deconvolution, so the demo can be scored without any manual
labels: background (bright, unstained), DAB-negative tissue and DAB-positive tissue.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..paths import cache_dir

DEMO_MPP = 0.5
DEMO_NAME = "pfmseg-demo-ihc"
DEMO_CLASS_NAMES = ("background", "DAB-negative tissue", "DAB-positive tissue")
DEMO_VERSION = 1
TILE = 128


def demo_image() -> np.ndarray:
    """(512, 512, 3) uint8: the immunohistochemistry image bundled with scikit-image."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry())


def demo_annotation(image: np.ndarray) -> np.ndarray:
    """Class indices (0 background, 1 DAB-negative tissue, 2 DAB-positive tissue) by colour deconvolution.

    Gaussian smoothing before thresholding gives region-level classes (what a pathologist would
    paint) instead of pixel speckle. DAB-positive is Otsu's threshold on the DAB channel; among the
    rest, the brightest of three multi-Otsu classes is unstained background (lumina, glass), the
    others are haematoxylin-counterstained tissue.
    """
    from skimage.color import rgb2gray, rgb2hed
    from skimage.filters import gaussian, threshold_multiotsu, threshold_otsu

    rgb = image[..., :3]
    dab = gaussian(rgb2hed(rgb)[..., 2], sigma=3)
    brightness = gaussian(rgb2gray(rgb), sigma=6)
    positive = dab > threshold_otsu(dab)
    bright = threshold_multiotsu(brightness[~positive], classes=3)[-1] if (~positive).sum() > 16 else 1.0
    labels = np.ones(rgb.shape[:2], np.uint8)
    labels[brightness > bright] = 0
    labels[positive] = 2
    return labels


def _halve(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def write_pyramid_tiff(image: np.ndarray, path: Path, mpp: float, levels: int = 3, tile: int = TILE) -> Path:
    """Write RGB ``image`` as a tiled pyramidal TIFF (sub-resolutions as SubIFDs), atomically."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pyramid = [image]
    while len(pyramid) < levels and min(pyramid[-1].shape[:2]) >= 2 * tile:
        pyramid.append(_halve(pyramid[-1]))
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    try:
        with tifffile.TiffWriter(tmp) as tif:
            for i, level in enumerate(pyramid):
                scale = mpp * image.shape[1] / level.shape[1]
                tif.write(level, subifds=len(pyramid) - 1 if i == 0 else None, subfiletype=1 if i else 0,
                          resolution=(1e4 / scale, 1e4 / scale),
                          description="pfmseg demo slide" if i == 0 else None, **options)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def demo_slide_path(directory: Path | None = None) -> Path:
    """The demo slide file (written on first use into ``directory`` or the cache folder)."""
    path = (directory or cache_dir()) / f"{DEMO_NAME}-v{DEMO_VERSION}.tif"
    if not path.is_file():
        write_pyramid_tiff(demo_image(), path, DEMO_MPP)
    return path
