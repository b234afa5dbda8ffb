"""The constant-size light decoder of the frozen-encoder benchmark protocol."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LightDecoder(nn.Module):
    """1x1 projection to 256 channels, (x2 bilinear up, 3x3 conv, ReLU) stages, 1x1 to classes.

    Its size does not depend on the encoder beyond the first projection (about 2.46-2.75 M parameters
    for patch 14/16 encoders of width 384-1536), so frozen-encoder comparisons measure the encoder, not
    the decoder. There are ceil(log2 patch) upsampling stages (3 for patch 8, 4 for 14 and 16): just
    enough to reach at least the input resolution, so a patch-8 encoder is not decoded at twice the
    input size and then shrunk (which costs compute and one 256x256 conv stage, about 0.59 M
    parameters fewer). It reads the last tapped grid only and ignores CNN-adapter skips (so it cannot
    pair with a CNN adapter); a final resize maps the upsampled grid to the exact input size.

    ``final_norm`` (config ``model.light_head.final_norm``): decode the encoder's output, i.e. the last
    tapped block after the ViT's final LayerNorm, as the frozen-encoder benchmark decodes its encoders
    (``protocol: frozen_light_decoder`` turns it on). Off, the head reads the raw last block, before
    that norm: how it was built before the option existed, which checkpoints without the key keep.
    """

    uses_skips = False
    reads_final_tokens = False  # the default; an instance follows its ``final_norm`` option

    def __init__(self, in_channels: list[int], skip_channels: list[int], num_classes: int,
                 patch_size: int = 16, channels: int = 256, num_upsamples: int | None = None,
                 final_norm: bool = False):
        super().__init__()
        if num_upsamples is None:
            num_upsamples = max(1, math.ceil(math.log2(patch_size)))
        self.patch_size = patch_size
        self.reads_final_tokens = bool(final_norm)
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
