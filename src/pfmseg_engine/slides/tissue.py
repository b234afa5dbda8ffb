"""Tissue detection on a low-resolution thumbnail, so background is never read or computed.

H&E (and most stains) are coloured, glass and background are grey. On a ~8 um/px thumbnail (block
means of a finer level, plus the grey-level spread inside each block as a texture measure):

* **Pen marks are not tissue.** Blue, green and black marker ink is recognised by colour (H&E absorbs
  green most, so stained tissue always has green as its lowest channel; blue ink has red lowest and blue
  far above it, green ink has green highest, black ink is dark and grey) and removed, with a small margin
  for the stroke edges, before anything else, so a heavily inked slide does not raise the saturation
  threshold either.
* **Stained tissue** is where the saturation (median-blurred against dust and JPEG noise) exceeds an Otsu
  threshold over the non-ink pixels, never below a floor (a blank slide finds no tissue).
* **Pale tissue is not dropped.** Loose stroma and fat are barely coloured: pixels that are faintly
  coloured, darker than the glass, or textured (fat's thin membranes) are tissue when they are connected
  to stained or faintly coloured textured tissue (hysteresis), so faint glass shading, dust and scratches
  away from tissue are not; holes enclosed by tissue (fat cells, lumina) up to :data:`MAX_HOLE_UM2` are filled.
  A section of pure fat with no coloured tissue at all is the case this cannot see: give an ROI.
* Morphology removes specks smaller than :data:`MIN_AREA_UM2`.

**Bounded whatever the slide claims.** The thumbnail holds at most :data:`THUMBNAIL_MAX_PIXELS` (a slide
too large for that at 8 um/px is detected at a coarser resolution), and is built block by block from the
coarsest level fine enough, so memory stays at one block plus the thumbnail. A slide without such a
level (no pyramid) has a finer level scanned, up to ``SCAN_FACTOR`` x ``PFMSEG_MAX_PIXELS`` pixels
(:mod:`pfmseg_engine.limits`); a larger one (a forged header, a giant single-level file) is refused
with what to do, rather than read for hours.

**Your own mask.** ``detect_tissue(slide, roi=...)`` takes a QuPath GeoJSON (its areas are the tissue;
"Ignore*" areas are cut out), a label store or mask image, a shapely geometry or a boolean array, and
either replaces the detection (``roi_mode="replace"``, the default: your mask is the truth) or restricts
it (``roi_mode="intersect"``). ``TissueMask.from_geojson`` / ``TissueMask.from_mask`` build one directly.

The mask is dilated by the inference window halo so windows that touch tissue edges are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlidePixelLimitError
from ..limits import SCAN_FACTOR, check_pixels, max_pixels
from .slide import Slide

#: Detection resolution (um/px): coarse enough to be cheap, fine enough for small biopsies.
TISSUE_MPP = 8.0
#: Saturation never counted as tissue, whatever Otsu says (blank or nearly blank slides).
MIN_SATURATION = 0.07
#: Objects and holes smaller than this (um^2) are noise.
MIN_AREA_UM2 = 20_000.0
#: Holes enclosed by tissue up to this area (um^2: 4 mm^2) are filled (fat cells, lumina, vessels).
MAX_HOLE_UM2 = 4_000_000.0
#: Faint colour of pale tissue (loose stroma, fat membranes): above glass noise, below the Otsu threshold.
PALE_SATURATION = 0.04
#: Pixels this much darker (grey levels) than the glass are pale tissue when connected to tissue.
DARKER_THAN_GLASS = 18.0
#: Grey-level spread inside a thumbnail block that counts as texture (at least; more on noisy glass).
MIN_TEXTURE = 8.0
#: Black ink: darker than this grey level (0-255) at thumbnail resolution.
BLACK_INK_GREY = 60.0
#: The thumbnail holds at most this many pixels (fewer when ``PFMSEG_MAX_PIXELS`` is lower): 2^25, about
#: 5,800 x 5,800 px, a 46 x 46 mm section at 8 um/px; larger slides are detected at a coarser resolution.
THUMBNAIL_MAX_PIXELS = 1 << 25
#: What to do with a slide whose thumbnail would need a level too large to scan.
SCAN_REMEDY = ("Turn tissue detection off (tissue=False) or give the slide a pyramid (e.g. vips tiffsave in.tif "
               "out.tif --tile --pyramid).")
#: ROI modes of :func:`detect_tissue`.
ROI_MODES = ("replace", "intersect")


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
    ink: np.ndarray | None = None  # pen marks found (thumbnail grid), for QC
    source: str = "detected"  # "detected", or what the user's ROI was ("roi: slide.geojson")

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

    @classmethod
    def from_mask(cls, slide: Slide, mask: Any, *, halo_um: float = 0.0, mpp: float = TISSUE_MPP,
                  source: str = "mask") -> TissueMask:
        """A tissue mask from your own boolean mask covering the whole slide (any resolution)."""
        return detect_tissue(slide, halo_um=halo_um, mpp=mpp, roi=np.asarray(mask, bool), roi_name=source)

    @classmethod
    def from_geojson(cls, slide: Slide, path: str | Path, *, halo_um: float = 0.0, mpp: float = TISSUE_MPP,
                     frame: str = "qupath") -> TissueMask:
        """A tissue mask from the areas of a QuPath GeoJSON (any class; "Ignore*" areas are cut out)."""
        return detect_tissue(slide, halo_um=halo_um, mpp=mpp, roi=Path(path), roi_frame=frame)


def thumbnail(slide: Slide, mpp: float = TISSUE_MPP, block: int = 2048) -> tuple[np.ndarray, float]:
    """(thumbnail, level-0 pixels per thumbnail pixel) near ``mpp``, built block by block.

    Uses the coarsest level not coarser than ``mpp`` and an integer block mean, so memory stays at
    one block plus the thumbnail, which holds at most :data:`THUMBNAIL_MAX_PIXELS` (coarser than ``mpp``
    for a slide too large for that) whatever the slide size.
    """
    thumb, _, downsample = thumbnail_with_texture(slide, mpp, block)
    return thumb, downsample


def thumbnail_with_texture(slide: Slide, mpp: float = TISSUE_MPP, block: int = 2048
                           ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(thumbnail, texture, downsample): :func:`thumbnail` plus the grey-level standard deviation inside
    each thumbnail pixel's block (None when the level is used as is and blocks are single pixels).

    Raises a :class:`~pfmseg_engine.errors.SlidePixelLimitError` before reading anything when the level
    it would scan is over the scan limit (see the module docstring)."""
    level, factor = thumbnail_source(slide, mpp)
    reader = slide.readers[level]
    full_h, full_w = reader.shape[:2]
    height, width = -(-full_h // factor), -(-full_w // factor)  # partial edge blocks count too
    out = np.zeros((height, width, 3), np.uint8)
    texture = np.zeros((height, width), np.float32) if factor > 1 else None
    step = max(1, min(block, math.isqrt(max_pixels())) // factor)  # a block is read whole: within the limit
    for y in range(0, height, step):
        for x in range(0, width, step):
            h, w = min(step, height - y), min(step, width - x)
            src = np.asarray(reader[y * factor:(y + h) * factor, x * factor:(x + w) * factor])[..., :3]
            pad = ((0, h * factor - src.shape[0]), (0, w * factor - src.shape[1]), (0, 0))
            src = np.pad(src, pad, mode="edge") if pad[0][1] or pad[1][1] else src
            blocks = src.reshape(h, factor, w, factor, 3).astype(np.uint32).sum(axis=(1, 3))
            out[y:y + h, x:x + w] = (blocks + factor * factor // 2) // (factor * factor)
            if texture is not None:
                grey = src.astype(np.float32).mean(axis=2).reshape(h, factor, w, factor)
                texture[y:y + h, x:x + w] = grey.std(axis=(1, 3))
    return out, texture, slide.downsamples[level] * factor


def thumbnail_source(slide: Slide, mpp: float = TISSUE_MPP) -> tuple[int, int]:
    """(level, integer block factor) the thumbnail near ``mpp`` is built from; checked before anything is read.

    The level is the coarsest not coarser than ``mpp`` (5 % tolerance); ``mpp`` itself is coarsened when the
    thumbnail would hold more than :data:`THUMBNAIL_MAX_PIXELS` (or ``PFMSEG_MAX_PIXELS``, if lower). The level is
    read whole, block by block, so it may hold up to ``SCAN_FACTOR`` times the pixel limit.
    """
    slide_mpp = slide.require_mpp()
    cap = min(THUMBNAIL_MAX_PIXELS, max_pixels())
    width0, height0 = slide.dimensions
    mpp = max(mpp, slide_mpp * math.sqrt(width0 * height0 / cap))
    mpps = slide.require_level_mpps()
    candidates = [i for i, m in enumerate(mpps) if m <= mpp * 1.05] or [0]
    level = max(candidates, key=lambda i: mpps[i])
    height, width = slide.readers[level].shape[:2]
    check_pixels(height, width, f"Level {level} of '{slide.path or slide.name}', which tissue detection would scan "
                 f"whole (the slide has no level near {mpp:.3g} um/px),", error=SlidePixelLimitError,
                 remedy=SCAN_REMEDY, fix_with=("tissue=False",), scale=SCAN_FACTOR)
    factor = max(1, round(mpp / mpps[level]), math.isqrt(height * width // cap))
    while -(-height // factor) * -(-width // factor) > cap:  # rounding (or cropped bounds) left it over the cap
        factor += 1
    return level, factor


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pen marks (blue, green, black marker ink) in an RGB thumbnail.

    Stained tissue absorbs green most (haematoxylin and eosin both do), so green is its lowest channel.
    Blue ink has red lowest and blue well above red; green ink has green highest; black ink is dark and
    grey. Tissue-marking dyes of the same colours count as ink too.
    """
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    grey = (r + g + b) / 3.0
    high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    sat = np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0)
    blue = (b - r > 40) & (g - r > -10) & (b >= g)
    green = (g - r > 20) & (g >= b - 10)
    black = (grey < BLACK_INK_GREY) & (sat < 0.45)
    return blue | green | black


def tissue_from_thumbnail(thumb: np.ndarray, mpp: float, texture: np.ndarray | None = None,
                          ) -> tuple[np.ndarray, float]:
    """(tissue mask, saturation threshold) of an RGB thumbnail at ``mpp`` um/px (see the module docstring).

    ``texture`` is the grey-level spread inside each thumbnail pixel (:func:`thumbnail_with_texture`);
    without it (a level read as is) texture is not used.
    """
    mask, threshold, _ = _detect(thumb, mpp, texture)
    return mask, threshold


def _detect(thumb: np.ndarray, mpp: float, texture: np.ndarray | None) -> tuple[np.ndarray, float, np.ndarray]:
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if thumb.size == 0:
        empty = np.zeros(thumb.shape[:2], bool)
        return empty, MIN_SATURATION, empty
    smooth = ndimage.median_filter(thumb, size=(5, 5, 1), mode="nearest")
    sat = ndimage.median_filter(_saturation(thumb), size=5, mode="nearest")
    grey = smooth.astype(np.float32).mean(axis=2)
    ink = ink_mask(smooth)
    clean = ~ndimage.binary_dilation(ink, iterations=2)  # stroke edges blend with glass or tissue
    threshold = MIN_SATURATION
    values = sat[clean]
    if values.size and values.max() > values.min():
        threshold = max(MIN_SATURATION, float(threshold_otsu(values)))
    strong = (sat > threshold) & clean
    # glass: bright, colourless, smooth; its level and its noise set the pale-tissue criteria
    glassy = clean & (sat < PALE_SATURATION) & (grey > 150)
    glass_grey, glass_texture = None, 0.0
    if glassy.sum() >= max(16, 0.02 * glassy.size):
        glass_grey = float(np.median(grey[glassy]))
        glass_texture = float(np.median(texture[glassy])) if texture is not None else 0.0
    # texture (fat membranes, loose fibres) needs the spread inside blocks of a finer level; a thumbnail read
    # as is has none, and its own pixel-to-pixel spread would only outline every tissue edge
    textured = texture > max(MIN_TEXTURE, 4.0 * glass_texture) if texture is not None else np.zeros_like(clean)
    faint = sat > PALE_SATURATION
    pale = faint | textured
    if glass_grey is not None:
        pale |= grey < glass_grey - DARKER_THAN_GLASS
    seeds = strong | (faint & textured & clean)
    candidates = (pale | strong) & clean
    candidates = ndimage.binary_closing(candidates, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    # holes enclosed by tissue up to MAX_HOLE_UM2 (fat cells inside their membranes, lumina), before the opening
    # erases thin membranes
    max_hole = int(MAX_HOLE_UM2 / (mpp * mpp)) + 1
    small_holes = ~candidates & ~_drop_small(~candidates, max_hole)
    candidates |= small_holes & ndimage.binary_fill_holes(candidates)
    candidates = ndimage.binary_opening(candidates, structure=np.ones((3, 3), bool), iterations=1) & clean
    # hysteresis: pale pixels count where they connect to stained (or faintly coloured, textured) tissue
    components, _ = ndimage.label(candidates)
    keep = np.zeros(components.max() + 1, bool)
    keep[np.unique(components[seeds & candidates])] = True
    keep[0] = False
    mask = keep[components]
    # a fixed floor would erase every object of a small crop or biopsy: cap it at 1 % of the image
    min_px = max(1, int(min(MIN_AREA_UM2 / (mpp * mpp), 0.01 * mask.size)))
    mask = _drop_small(mask, min_px)
    mask = ~_drop_small(~mask, min_px) & clean  # fill small holes; pen marks are never tissue
    return mask, threshold, ink


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


def detect_tissue(slide: Slide, *, halo_um: float = 0.0, mpp: float = TISSUE_MPP, roi: Any = None,
                  roi_mode: str = "replace", roi_frame: str = "qupath", roi_name: str | None = None) -> TissueMask:
    """Detect tissue at about ``mpp`` um/px and dilate the mask by ``halo_um`` micrometres.

    ``roi`` is your own tissue mask or region of interest: a QuPath GeoJSON path (its areas, any class,
    are tissue; "Ignore*" areas are cut out; ``roi_frame`` as in :func:`~pfmseg_engine.annotations.read_geojson`),
    a label store folder (labels > 0) or a mask image (non-zero = tissue, stretched over the slide),
    a shapely geometry in level-0 pixels, or a boolean array covering the whole slide at any resolution.
    ``roi_mode="replace"`` (default) uses it instead of the detection, ``"intersect"`` keeps only detected
    tissue inside it.
    """
    if roi_mode not in ROI_MODES:
        from ..errors import ConfigError

        raise ConfigError(f"roi_mode must be one of {', '.join(ROI_MODES)}, got '{roi_mode}'.")
    thumb, texture, downsample = thumbnail_with_texture(slide, mpp)
    thumb_mpp = slide.require_mpp() * downsample
    tissue, threshold, ink = _detect(thumb, thumb_mpp, texture)
    source = "detected"
    if roi is not None:
        from ..annotations.roi import roi_mask  # GeoJSON, label stores, rasterisers: only when an ROI is given

        region, source = roi_mask(slide, roi, thumb.shape[:2], downsample, frame=roi_frame)
        source = roi_name or source
        tissue = region if roi_mode == "replace" else tissue & region
        source = source if roi_mode == "replace" else f"detected within {source}"
    mask = dilate(tissue, math.ceil(halo_um / thumb_mpp) if halo_um > 0 else 0)
    return TissueMask(mask=mask, tissue=tissue, thumbnail=thumb, mpp=thumb_mpp, downsample=downsample,
                      threshold=threshold, ink=ink, source=source)


def tissue_qc_image(tissue: TissueMask) -> np.ndarray:
    """Thumbnail with tissue tinted green, the dilation halo blue and pen marks found red (RGB uint8)."""
    image = tissue.thumbnail.astype(np.float32)
    halo = tissue.mask & ~tissue.tissue
    ink = tissue.ink if tissue.ink is not None else np.zeros_like(tissue.tissue)
    for region, colour in ((tissue.tissue, (0, 200, 0)), (halo, (40, 90, 255)), (ink & ~tissue.mask, (230, 30, 30))):
        image[region] = 0.6 * image[region] + 0.4 * np.asarray(colour, np.float32)
    return image.round().astype(np.uint8)


def save_tissue_qc(tissue: TissueMask, path: str | Path) -> Path:
    """Write the QC PNG (tissue mask over the thumbnail) for a quick visual check."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tissue_qc_image(tissue)).save(path)
    return path
