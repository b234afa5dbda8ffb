"""Sliding windows over an in-memory image: where windows go, how they blend, and their stitching.

The same three pieces drive both image-set inference (:func:`predict_image`) and whole-slide
inference (:mod:`pfmseg_engine.inference.slide`), so a slide chunk and a whole image see exactly the
same window grid and blending. Logits of overlapping windows are averaged with a weight map that
falls off towards the window border (a Gaussian by default), because predictions at a window's edge
lack context and are the least reliable. Whole images never go to the device: windows travel in
batches, the accumulator of :func:`predict_image` stays in host memory (whole-slide inference keeps
its chunk accumulators on the model's device, :mod:`.stitch`). This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConfigError

#: Gaussian sigma as a fraction of the window side (MONAI's default importance map uses 1/8).
SIGMA_SCALE = 0.125
#: Smallest blending weight; keeps pixels seen by only one window (image corners) well defined.
MIN_WEIGHT = 1e-3


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)`` with the given stride.

    The last window is shifted inward so it ends exactly at ``length`` (never padded past the edge);
    when ``length < window`` there is one window at 0 and the caller pads the image.
    """
    if window < 1 or stride < 1:
        raise ConfigError(f"window ({window}) and stride ({stride}) must be positive.")
    if stride > window:
        raise ConfigError(f"stride {stride} is larger than window {window}; pixels would be skipped.")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _gaussian_1d(size: int) -> np.ndarray:
    sigma = SIGMA_SCALE * size
    centre = (size - 1) / 2.0
    x = np.arange(size, dtype=np.float64)
    return np.exp(-0.5 * ((x - centre) / sigma) ** 2)


BLEND_MODES: dict[str, Callable[[int], np.ndarray]] = {
    "gaussian": _gaussian_1d,
    "constant": lambda size: np.ones(size, dtype=np.float64),
}


def blend_weights(window: int | tuple[int, int], mode: str = "gaussian") -> np.ndarray:
    """(h, w) float32 weight map for blending overlapping windows (maximum 1, minimum ``MIN_WEIGHT``)."""
    if mode not in BLEND_MODES:
        raise ConfigError(f"Unknown blend mode '{mode}'; choose one of {', '.join(BLEND_MODES)}.")
    height, width = (window, window) if isinstance(window, int) else window
    weights = np.outer(BLEND_MODES[mode](height), BLEND_MODES[mode](width))
    weights /= weights.max()
    return np.maximum(weights, MIN_WEIGHT).astype(np.float32)


def stride_for(window: int, overlap: float) -> int:
    """Stride of windows of side ``window`` sharing ``overlap`` (a fraction of the window) with their neighbours.

    ``int(window * (1 - overlap))``, at least 1: MONAI's ``_get_scan_interval``, so together with
    :func:`window_starts` (MONAI's last-window-shifted-inward rule) a run computes exactly the windows
    ``monai.inferers.sliding_window_inference`` does. Only the window must be a multiple of the
    model's patch size (its token grid); the stride need not be.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}; 0.25 is a good default.")
    return max(1, int(window * (1.0 - overlap)))


def check_window(window: int, patch_size: int) -> int:
    """Windows must be positive multiples of the model's patch size (ViT token grid)."""
    window = int(window)
    if window < patch_size or window % patch_size:
        below = max(patch_size, window // patch_size * patch_size)
        raise ConfigError(
            f"window {window} is not a positive multiple of the model's patch size {patch_size}; "
            f"use {below} or {below + patch_size}."
        )
    return window


def pad_to_window(image: np.ndarray, window: int) -> np.ndarray:
    """Pad an (H, W, 3) image at the bottom/right up to ``window`` (reflection where possible)."""
    height, width = image.shape[:2]
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    if not pad_h and not pad_w:
        return image
    if pad_h < height and pad_w < width:
        return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _as_float_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"Expected an (H, W, 3) RGB image, got shape {image.shape}.")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise ConfigError(f"Image dtype {image.dtype} unsupported; give uint8 or float in [0, 1].")


def predict_image(
    model,
    image: np.ndarray,
    *,
    window: int,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 4,
    device=None,
) -> np.ndarray:
    """Softmax class probabilities (C, H, W) float32 of an in-memory (H, W, 3) uint8 or [0, 1] image.

    Windows of side ``window`` (a multiple of ``model.patch_size``) step by :func:`stride_for`'s stride
    (MONAI's); the last window in each direction is shifted inward; an image smaller than the window
    is padded and the prediction cropped back.
    """
    from .runner import ModelRunner  # torch: imported here so that planning (grid, plan) stays torch-free

    runner = ModelRunner(model, device=device, batch_size=batch_size)
    window = check_window(window, runner.patch_size)
    stride = stride_for(window, overlap)
    image = _as_float_image(image)
    height, width = image.shape[:2]
    padded = pad_to_window(image, window)
    ph, pw = padded.shape[:2]
    weights = blend_weights(window, blend)
    acc = np.zeros((runner.num_classes, ph, pw), dtype=np.float32)
    wsum = np.zeros((ph, pw), dtype=np.float32)
    boxes = [(y, x) for y in window_starts(ph, window, stride) for x in window_starts(pw, window, stride)]
    crops = (padded[y:y + window, x:x + window] for y, x in boxes)
    for (y, x), logits in zip(boxes, runner.predict_windows(crops), strict=True):
        acc[:, y:y + window, x:x + window] += logits * weights
        wsum[y:y + window, x:x + window] += weights
    logits = acc[:, :height, :width] / wsum[:height, :width]
    return softmax(logits, axis=0)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax in float32."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted.astype(np.float32, copy=False)
