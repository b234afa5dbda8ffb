"""The constant-size light decoder of the frozen-encoder benchmark protocol."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LightDecoder(nn.Module):
    """1x1 projection to 256 channels, four (x2 bilinear up, 3x3 conv, ReLU) stages, 1x1 to classes.

    Its size (about 2.6 M parameters) does not depend on the encoder beyond the first projection, so
    frozen-encoder comparisons measure the encoder, not the decoder. It reads the last tapped grid
    only; a final resize maps the 16x upsampled grid to the exact input size for any patch size.
    """

    def __init__(self, in_channels: list[int], skip_channels: list[int], num_classes: int,
                 channels: int = 256, num_upsamples: int = 4):
        super().__init__()
        self.project = nn.Conv2d(in_channels[-1], channels, 1)
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
            for _ in range(num_upsamples)
        )
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, grids: list[torch.Tensor], skips: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.project(grids[-1])
        for stage in self.up:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return F.interpolate(self.classify(x), size=out_size, mode="bilinear", align_corners=False)
