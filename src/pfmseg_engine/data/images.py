"""Reading RGB images as (H, W, 3) uint8 arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..colors import composite_on_white
from ..errors import DataError
from ..limits import image_header_size, open_image
from .npy import npy_header


def read_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as (H, W, 3) uint8 RGB.

    Grey and palette images are converted. Images with transparency (RGBA, LA, palette with a
    transparent colour) are composited on **white**: transparent pixels are the slide background
    (glass), which is white in brightfield histology, whereas dropping the alpha channel would show
    whatever colour the exporter left under it (often black), a colour tissue never has.
    An image claiming more pixels than ``PFMSEG_MAX_PIXELS`` is refused before it is decoded
    (:mod:`pfmseg_engine.limits`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file '{path}' does not exist.")
    try:
        with open_image(path, f"Image '{path}'") as img:
            if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
                return composite_on_white(np.array(img.convert("RGBA")))
            return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except OSError as exc:
        raise DataError(f"Cannot read image '{path}': {exc}.") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image or ``.npy`` mask file without decoding its pixels."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        shape, _dtype = npy_header(path, what="Mask")
        return int(shape[0]), int(shape[1])
    return image_header_size(path)


def to_float_image(image: np.ndarray) -> np.ndarray:
    """uint8 or float image -> float32 in [0, 1] (floats are assumed to be in [0, 1] already)."""
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32, copy=False)
