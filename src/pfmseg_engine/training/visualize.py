"""Validation pictures: image | ground truth | prediction, side by side, as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..colors import IGNORE_COLOUR, class_palette, colourise


def palette(num_classes: int, class_colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the dataset's own, else the shared class palette."""
    return class_palette(num_classes, class_colors)


def colorize(mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class-index mask -> RGB; values outside the palette (ignore) are dark grey."""
    return colourise(mask, colours, ignore_index=None, ignore_colour=IGNORE_COLOUR)


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
