"""Class colours, the one palette every output uses (OME-Zarr metadata, PNG panels, overlays, napari).

Training panels, image-set overlays, slide outputs and the napari plugin all ask here, so class k has
the same colour everywhere. The default palette puts the ten well separated tab10-like colours (the
even entries of matplotlib's tab20) first and their pale partners (the odd entries) after them: taken
in tab20's own order, classes 1 and 2 would be a blue and a near-identical light blue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Colour of ``ignore_index`` pixels in training/evaluation panels (not a class).
IGNORE_COLOUR = (40, 40, 40)

ClassColors = Sequence[Sequence[int]] | Mapping[str, Sequence[int]]


def class_palette(num_classes: int, class_colors: ClassColors | None = None,
                  class_names: Sequence[str] | None = None) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the given ones, else tab20's even then odd entries, HSV beyond 20.

    ``class_colors`` is a list (class i -> RGB) or a mapping class name -> RGB (needs ``class_names``);
    classes it does not cover keep their default colour.
    """
    from matplotlib import colormaps

    if num_classes <= 20:
        tab20 = colormaps["tab20"](np.arange(20))[:, :3]
        colours = np.concatenate([tab20[0::2], tab20[1::2]])[:num_classes]
    else:
        colours = colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))[:, :3]
    palette = (colours * 255).round().astype(np.uint8)
    if class_colors:
        if isinstance(class_colors, Mapping):
            names = list(class_names or [])
            given = {names.index(n): c for n, c in class_colors.items() if n in names}
        else:
            given = dict(enumerate(class_colors))
        for index, colour in given.items():
            if index < num_classes and colour is not None:
                palette[index] = np.asarray(list(colour)[:3], dtype=np.uint8)
    return palette


def colourise(mask: np.ndarray, palette: np.ndarray, ignore_index: int | None = 255,
              ignore_colour: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Class-index mask -> RGB; values outside the palette (and ``ignore_index``) get ``ignore_colour``."""
    mask = np.asarray(mask)
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[:] = np.asarray(ignore_colour, np.uint8)
    palette = np.asarray(palette, np.uint8)[:, :3]
    valid = (mask >= 0) & (mask < len(palette))
    if ignore_index is not None:
        valid &= mask != ignore_index
    out[valid] = palette[mask[valid]]
    return out


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised class mask over an RGB image."""
    coloured = colourise(mask, palette).astype(np.float32)
    return ((1 - alpha) * image.astype(np.float32) + alpha * coloured).round().astype(np.uint8)


def label_colors(class_names: Sequence[str], palette: np.ndarray | None = None,
                 class_colors: ClassColors | None = None) -> list[dict]:
    """NGFF image-label ``colors``: label 0 (no prediction) transparent, label k = class k-1."""
    if palette is None:
        palette = class_palette(len(class_names), class_colors, class_names)
    palette = np.asarray(palette, np.uint8)
    colours = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colours += [{"label-value": i + 1, "rgba": [int(v) for v in palette[i][:3]] + [255]}
                for i in range(len(class_names))]
    return colours


def composite_on_white(image: np.ndarray) -> np.ndarray:
    """(H, W, 4) RGBA (uint8, or float in [0, 1]) -> (H, W, 3) RGB of the same dtype, over white.

    Transparent pixels are glass, which is white in brightfield histology; dropping the alpha channel
    would show whatever the exporter left under it (often black), a colour tissue never has. Used by
    image reading (training data) and by slide readers alike.

    Arrays with three channels are returned unchanged, so callers may pass any RGB(A) array.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 4:
        return image
    if np.issubdtype(image.dtype, np.integer):
        top = float(np.iinfo(image.dtype).max)
        rgb = image[..., :3].astype(np.float32)
        alpha = image[..., 3:].astype(np.float32) / top
        return np.rint(rgb * alpha + top * (1.0 - alpha)).clip(0, top).astype(image.dtype)
    alpha = image[..., 3:]
    return (image[..., :3] * alpha + (1.0 - alpha)).astype(image.dtype, copy=False)
