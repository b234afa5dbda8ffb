"""Stand-in models shared by the whole-slide tests (this module holds no tests).

``PixelModel`` computes logits as a fixed function of each input pixel, like the identity predictor
of MONAI's sliding-window tests: any correct tiling and blending must give back exactly the direct
per-pixel result, so a misplaced window, a wrong crop or a missing weight shows up as a mismatch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PixelModel(nn.Module):
    """Logits = fixed per-pixel function of RGB; 3 classes with well separated scores."""

    patch_size = 16
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        return torch.stack([4 * r - 2 * g, 3 * g + b, 5 * b - r], dim=1) * self.scale


def pixel_logits(image: np.ndarray) -> np.ndarray:
    """What PixelModel gives for a whole (H, W, 3) uint8 image, as (3, H, W) float32."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    return PixelModel()(x)[0].numpy()


def pixel_labels(image: np.ndarray) -> np.ndarray:
    """Expected slide labels (class + 1) for PixelModel."""
    return (pixel_logits(image).argmax(0) + 1).astype(np.uint8)


def decided(image: np.ndarray, margin: float = 1e-3) -> np.ndarray:
    """Pixels whose best class beats the runner-up clearly (float rounding cannot flip them)."""
    top2 = np.sort(pixel_logits(image), axis=0)[-2:]
    return (top2[1] - top2[0]) > margin


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
