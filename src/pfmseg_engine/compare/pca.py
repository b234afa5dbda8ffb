"""A picture of what a backbone sees: the first three principal components of its token features as RGB.

Useful next to a leaderboard: tissue structures that a backbone separates show up as distinct colours,
so two PFMs with similar scores can still be told apart by eye.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError


def _backbone_and_normalisation(model_or_backbone: Any) -> tuple[Any, torch.Tensor, torch.Tensor, int]:
    """(backbone, mean, std, default window) of a SegmentationModel or a Backbone."""
    if hasattr(model_or_backbone, "encoder"):
        model = model_or_backbone
        backbone = model.encoder.backbone
        return backbone, model.mean.detach().cpu(), model.std.detach().cpu(), int(model.config.input_size)
    backbone = model_or_backbone
    spec = backbone.spec
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return backbone, mean, std, 224 // spec.patch_size * spec.patch_size


def feature_pca(model_or_backbone: Any, image: Any, *, window: int | None = None, level: int = -1,
                batch_size: int = 4, device: Any = None) -> np.ndarray:
    """(H, W, 3) uint8: the first three principal components of the backbone's tokens over ``image``.

    ``model_or_backbone`` is a :class:`~pfmseg_engine.model.SegmentationModel` (its backbone and
    normalisation) or a :class:`~pfmseg_engine.backbones.Backbone`. ``image`` is (H, W, 3) RGB (uint8,
    or float in [0, 1]; RGBA is composited on white). The image is cut into non-overlapping windows of
    ``window`` pixels (default: the model's input size; padded at the edges), the tokens of tapped block
    ``level`` (index into the backbone's feature indices, default the last) of every window are
    gathered, and their first three principal components (over the whole image, so colours are
    comparable across windows) are scaled to 0-255 between their 1st and 99th percentiles. Each token
    colours its patch (nearest-neighbour), so the patch grid stays visible. Component signs are fixed
    (largest loading positive), so the same input always gives the same colours.
    """
    from ..data.images import composite_on_white

    backbone, mean, std, default_window = _backbone_and_normalisation(model_or_backbone)
    if getattr(backbone.spec, "from_scratch", False):
        raise ConfigError(f"'{backbone.spec.name}' has no token features to show; choose a foundation-model backbone.")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DataError(f"feature_pca needs an (H, W, 3) RGB image, got shape {array.shape}.")
    array = composite_on_white(array)[..., :3]
    height, width = array.shape[:2]
    patch = backbone.patch_size
    window = int(window or default_window)
    window = max(patch, window // patch * patch)
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    if array.dtype == np.uint8:
        pixels = pixels / 255.0
    rows, cols = -(-height // window), -(-width // window)
    padded = torch.zeros(3, rows * window, cols * window)
    padded[:, :height, :width] = pixels
    tiles = padded.unfold(1, window, window).unfold(2, window, window)  # (3, rows, cols, window, window)
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, window, window)
    index = backbone.feature_indices[level]
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    grids = []
    try:
        with torch.inference_mode():
            for start in range(0, len(tiles), batch_size):
                x = ((tiles[start:start + batch_size] - mean) / std).to(device)
                grids.append(backbone.features(x, indices=[index])[0].float().cpu())
    finally:
        backbone.train(was_training)
    grid = torch.cat(grids)  # (tiles, C, g, g)
    channels, side = grid.shape[1], grid.shape[-1]
    grid = grid.view(rows, cols, channels, side, side).permute(2, 0, 3, 1, 4).reshape(channels, rows * side,
                                                                                     cols * side)
    tokens_h, tokens_w = -(-height // patch), -(-width // patch)
    grid = grid[:, :tokens_h, :tokens_w]
    tokens = grid.reshape(channels, -1).T.double().numpy()
    tokens = tokens - tokens.mean(0, keepdims=True)
    components = np.zeros((tokens.shape[0], 3))
    if tokens.shape[0] > 1:
        covariance = tokens.T @ tokens / max(1, tokens.shape[0] - 1)
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1][:3]
        vectors = vectors[:, order]
        signs = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(vectors.shape[1])])
        vectors = vectors * np.where(signs == 0, 1.0, signs)
        components[:, :vectors.shape[1]] = tokens @ vectors
    rgb = np.zeros_like(components)
    for c in range(3):
        low, high = np.percentile(components[:, c], [1, 99])
        if high > low:
            rgb[:, c] = np.clip((components[:, c] - low) / (high - low), 0, 1)
    rgb = (rgb.reshape(tokens_h, tokens_w, 3) * 255).round().astype(np.uint8)
    return np.repeat(np.repeat(rgb, patch, axis=0), patch, axis=1)[:height, :width]
