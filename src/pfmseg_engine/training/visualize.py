"""Validation pictures: image | ground truth | prediction, side by side, as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

IGNORE_COLOUR = (40, 40, 40)


def palette(num_classes: int, class_colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the dataset's own, else matplotlib's tab10/tab20."""
    if class_colors:
        return np.asarray(class_colors, dtype=np.uint8)[:num_classes]
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return (np.asarray([cmap(i % cmap.N)[:3] for i in range(num_classes)]) * 255).astype(np.uint8)


def colorize(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class-index mask -> RGB; values outside the palette (ignore) are dark grey."""
    out = np.empty((*mask.shape, 3), dtype=np.uint8)
    out[:] = IGNORE_COLOUR
    valid = (mask >= 0) & (mask < len(colours))
    out[valid] = colours[mask[valid]]
    return out


def save_panel(path: Path, image: np.ndarray, target: np.ndarray | None, prediction: np.ndarray,
               colours: np.ndarray) -> Path:
    """Write image | target (if any) | prediction, each at native size, separated by white bars."""
    from PIL import Image

    tiles = [np.asarray(image)[..., :3].astype(np.uint8)]
    if target is not None:
        tiles.append(colorize(target, colours))
    tiles.append(colorize(prediction, colours))
    bar = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
    parts = [tiles[0]]
    for tile in tiles[1:]:
        parts += [bar, tile]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(parts, axis=1)).save(path)
    return path
