"""Class colours and overlays shared by every output (OME-Zarr metadata, PNG overlays, GeoJSON)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: matplotlib tab20 as in the seed framework, HSV beyond 20."""
    from matplotlib import colormaps

    if num_classes <= 20:
        colours = colormaps["tab20"](np.linspace(0, 1, 20))[:num_classes, :3]
    else:
        colours = colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))[:, :3]
    return (colours * 255).round().astype(np.uint8)


def colourise(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class-index mask -> RGB (values outside the palette, e.g. ignore_index, stay black)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette[:256]
    lut[ignore_index % 256] = 0
    return lut[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised class mask over an RGB image."""
    coloured = colourise(mask, palette).astype(np.float32)
    return ((1 - alpha) * image.astype(np.float32) + alpha * coloured).round().astype(np.uint8)


def label_colors(class_names: Sequence[str], palette: np.ndarray | None = None) -> list[dict]:
    """NGFF image-label ``colors``: label 0 (no prediction) transparent, label k = class k-1."""
    palette = class_palette(len(class_names)) if palette is None else np.asarray(palette, np.uint8)
    colours = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colours += [{"label-value": i + 1, "rgba": [int(v) for v in palette[i]] + [255]}
                for i in range(len(class_names))]
    return colours
