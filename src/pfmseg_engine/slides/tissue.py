"""Tissue detection on a low-resolution thumbnail, so background is never read or computed.

H&E (and most stains) are coloured, glass and background are grey: the HSV saturation of a
~8 um/px thumbnail, median-blurred against dust and JPEG noise and thresholded with Otsu (never
below a floor, so a blank slide finds no tissue), then cleaned with morphology, separates them well.
The mask is dilated by the inference window halo so windows that touch tissue edges are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .slide import Slide

#: Detection resolution (um/px): coarse enough to be cheap, fine enough for small biopsies.
TISSUE_MPP = 8.0
#: Saturation never counted as tissue, whatever Otsu says (blank or nearly blank slides).
MIN_SATURATION = 0.07
#: Objects and holes smaller than this (um^2) are noise.
MIN_AREA_UM2 = 20_000.0


@dataclass
class TissueMask:
    """Boolean tissue mask at ``mpp`` um/px; ``downsample`` = level-0 pixels per mask pixel.

    ``mask`` is dilated by the halo, ``tissue`` is the detection before dilation (for QC/statistics).
    Box queries use a summed-area table, so checking thousands of windows costs nothing.
    """

    mask: np.ndarray
    tissue: np.ndarray
    thumbnail: np.ndarray
    mpp: float
    downsample: float
    threshold: float

    def __post_init__(self) -> None:
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int32)
        table[1:, 1:] = self.mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
        self._table = table

    @property
    def fraction(self) -> float:
        """Fraction of the slide area detected as tissue (before dilation)."""
        return float(self.tissue.mean()) if self.tissue.size else 0.0

    def any_in(self, y0: float, y1: float, x0: float, x1: float) -> bool:
        """Whether the (dilated) mask has tissue in a box given in level-0 pixels."""
        d = self.downsample
        h, w = self.mask.shape
        r0, r1 = max(0, math.floor(y0 / d)), min(h, math.ceil(y1 / d))
        c0, c1 = max(0, math.floor(x0 / d)), min(w, math.ceil(x1 / d))
        if r1 <= r0 or c1 <= c0:
            return False
        t = self._table
        return bool(t[r1, c1] - t[r0, c1] - t[r1, c0] + t[r0, c0] > 0)


def thumbnail(slide: Slide, mpp: float = TISSUE_MPP, block: int = 2048) -> tuple[np.ndarray, float]:
    """(thumbnail, level-0 pixels per thumbnail pixel) near ``mpp``, built block by block.

    Uses the coarsest level not coarser than ``mpp`` and an integer block mean, so memory stays at
    one block whatever the slide size.
    """
    slide.require_mpp()
    mpps = slide.level_mpps
    candidates = [i for i, m in enumerate(mpps) if m <= mpp * 1.05] or [0]
    level = max(candidates, key=lambda i: mpps[i])
    factor = max(1, round(mpp / mpps[level]))
    reader = slide.readers[level]
    full_h, full_w = reader.shape[:2]
    height, width = -(-full_h // factor), -(-full_w // factor)  # partial edge blocks count too
    out = np.zeros((height, width, 3), np.uint8)
    step = max(1, block // factor)
    for y in range(0, height, step):
        for x in range(0, width, step):
            h, w = min(step, height - y), min(step, width - x)
            src = np.asarray(reader[y * factor:(y + h) * factor, x * factor:(x + w) * factor])
            pad = ((0, h * factor - src.shape[0]), (0, w * factor - src.shape[1]), (0, 0))
            src = np.pad(src, pad, mode="edge") if pad[0][1] or pad[1][1] else src
            blocks = src.reshape(h, factor, w, factor, 3).astype(np.uint32).sum(axis=(1, 3))
            out[y:y + h, x:x + w] = (blocks + factor * factor // 2) // (factor * factor)
    return out, slide.downsamples[level] * factor


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def tissue_from_thumbnail(thumb: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
    """(tissue mask, saturation threshold) of an RGB thumbnail at ``mpp`` um/px."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    sat = ndimage.median_filter(_saturation(thumb), size=5, mode="nearest")
    threshold = MIN_SATURATION
    if sat.size and sat.max() > sat.min():
        threshold = max(MIN_SATURATION, float(threshold_otsu(sat)))
    mask = sat > threshold
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool), iterations=1)
    # a fixed floor would erase every object of a small crop or biopsy: cap it at 1 % of the image
    min_px = max(1, int(min(MIN_AREA_UM2 / (mpp * mpp), 0.01 * mask.size)))
    mask = _drop_small(mask, min_px)
    mask = ~_drop_small(~mask, min_px)  # fill small holes
    return mask, threshold


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove connected components smaller than ``min_px`` pixels."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilate a boolean mask by a disc of ``radius`` pixels (distance transform: any radius is cheap)."""
    from scipy import ndimage

    if radius <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def detect_tissue(slide: Slide, *, halo_um: float = 0.0, mpp: float = TISSUE_MPP) -> TissueMask:
    """Detect tissue at about ``mpp`` um/px and dilate the mask by ``halo_um`` micrometres."""
    thumb, downsample = thumbnail(slide, mpp)
    thumb_mpp = slide.require_mpp() * downsample
    tissue, threshold = tissue_from_thumbnail(thumb, thumb_mpp)
    mask = dilate(tissue, math.ceil(halo_um / thumb_mpp) if halo_um > 0 else 0)
    return TissueMask(mask=mask, tissue=tissue, thumbnail=thumb, mpp=thumb_mpp, downsample=downsample,
                      threshold=threshold)


def tissue_qc_image(tissue: TissueMask) -> np.ndarray:
    """Thumbnail with tissue tinted green and the dilation halo tinted blue (RGB uint8)."""
    image = tissue.thumbnail.astype(np.float32)
    halo = tissue.mask & ~tissue.tissue
    for region, colour in ((tissue.tissue, (0, 200, 0)), (halo, (40, 90, 255))):
        image[region] = 0.6 * image[region] + 0.4 * np.asarray(colour, np.float32)
    return image.round().astype(np.uint8)


def save_tissue_qc(tissue: TissueMask, path: str | Path) -> Path:
    """Write the QC PNG (tissue mask over the thumbnail) for a quick visual check."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tissue_qc_image(tissue)).save(path)
    return path
