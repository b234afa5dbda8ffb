"""Reading label masks as class indices, whatever the file stores.

The seed framework converted every mask to luminance (``convert('L')``), which silently turns palette
indices and RGB colours into wrong class numbers. Here a mask is only ever read as indices:

* single-channel files (``1``, ``L``, ``I;16``, ``I``) give their pixel values;
* palette files (``P``) give their palette *indices*, never the colours;
* RGB/RGBA files are an error unless a colour-to-class map is given, in which case every colour must
  be in the map;
* ``.npy`` files give their array.

Values must be class indices in ``[0, num_classes)`` or ``ignore_index``; anything else is an error
naming the file and the offending values, because silently remapping them (as the seed did) hides
broken annotations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..limits import check_pixels, open_image
from .npy import load_npy, npy_header

INDEX_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")
COLOUR_MODES = ("RGB", "RGBA")


def _colour_table(class_colors: Sequence[Sequence[int]] | Mapping[int, Sequence[int]]) -> dict[int, int]:
    """Map packed 24-bit colour -> class index from a list (index = class) or a dict class -> colour."""
    items = class_colors.items() if isinstance(class_colors, Mapping) else enumerate(class_colors)
    table: dict[int, int] = {}
    for cls, colour in items:
        if len(colour) != 3:
            raise DataError(f"class_colors entry for class {cls} is {list(colour)}; give [r, g, b].")
        r, g, b = (int(c) for c in colour)
        key = (r << 16) | (g << 8) | b
        if key in table:
            raise DataError(f"Colour {[r, g, b]} is given for classes {table[key]} and {cls}; colours must differ.")
        table[key] = int(cls)
    return table


def decode_colour_mask(rgb: np.ndarray, class_colors, source: str = "mask") -> np.ndarray:
    """Turn an (H, W, 3) colour mask into class indices; unknown colours are an error."""
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = _colour_table(class_colors)
    colours, inverse = np.unique(packed, return_inverse=True)
    unknown = [int(c) for c in colours if int(c) not in table]
    if unknown:
        shown = ", ".join(str([c >> 16, (c >> 8) & 255, c & 255]) for c in unknown[:8])
        raise DataError(
            f"{source} contains colours not in class_colors: {shown}"
            f"{' ...' if len(unknown) > 8 else ''}. Add them to class_colors or fix the mask."
        )
    lut = np.array([table[int(c)] for c in colours], dtype=np.int64)
    return lut[inverse].reshape(rgb.shape[:2])


def read_mask_file(path: str | Path, class_colors=None) -> np.ndarray:
    """Read ``path`` as an (H, W) int64 array of class indices (no value check; see :func:`check_mask_values`).

    A mask claiming more pixels than ``PFMSEG_MAX_PIXELS`` is refused from its header, before it is read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Mask file '{path}' does not exist.")
    if path.suffix.lower() == ".npy":
        shape, dtype = npy_header(path, what="Mask")  # judged from the header, before any data is read
        if len(shape) != 2 or not np.issubdtype(dtype, np.integer):
            raise DataError(f"Mask '{path}' must be a 2-D integer array, got {dtype} {shape}.")
        check_pixels(shape[0], shape[1], f"Mask '{path}'")
        return load_npy(path, what="Mask").astype(np.int64)
    with open_image(path, f"Mask '{path}'") as img:
        mode = img.mode
        if mode in INDEX_MODES:
            return np.asarray(img).astype(np.int64)  # palette images keep their indices
        if mode in COLOUR_MODES:
            if class_colors is None:
                raise DataError(
                    f"Mask '{path}' is an {mode} colour image. Masks must hold class indices (single-channel "
                    "or palette PNG); for colour masks give dataset.class_colors (one [r, g, b] per class)."
                )
            return decode_colour_mask(np.asarray(img.convert("RGB")), class_colors, source=f"Mask '{path}'")
    raise DataError(
        f"Mask '{path}' has image mode {mode}, which cannot hold class indices; save it as a single-channel "
        "(L or I;16) or palette (P) PNG."
    )


def check_mask_values(mask: np.ndarray, num_classes: int, ignore_index: int, source: str = "mask") -> None:
    """Raise if ``mask`` holds values other than ``0..num_classes-1`` and ``ignore_index``."""
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore_index)]
    if bad:
        shown = ", ".join(map(str, bad[:12])) + (" ..." if len(bad) > 12 else "")
        raise DataError(
            f"{source} contains values {shown} outside the classes 0..{num_classes - 1} and the ignore "
            f"index {ignore_index}. Fix the mask, or set num_classes / ignore_index to match it."
        )


def read_mask(path: str | Path, num_classes: int, ignore_index: int = 255, class_colors=None) -> np.ndarray:
    """Read and validate a mask: class indices in ``[0, num_classes)`` or ``ignore_index``."""
    mask = read_mask_file(path, class_colors)
    check_mask_values(mask, num_classes, ignore_index, source=f"Mask '{path}'")
    return mask


def sparse_to_targets(labels: np.ndarray, num_classes: int, ignore_index: int = 255,
                      source: str = "labels") -> np.ndarray:
    """Napari convention -> training targets: 0 = not annotated -> ``ignore_index``; k -> class k-1."""
    labels = np.asarray(labels)
    bad = np.unique(labels[(labels < 0) | (labels > num_classes)])
    if bad.size:
        raise DataError(
            f"{source} contain values {', '.join(map(str, bad[:12].tolist()))}; with {num_classes} classes "
            f"annotations must be 0 (not annotated) or 1..{num_classes} (class k-1)."
        )
    out = labels.astype(np.int64) - 1
    out[labels == 0] = ignore_index
    return out
