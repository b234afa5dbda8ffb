"""The seed framework's decoder: TransUNet's cascaded upsampler ("cup") on the PFM's final tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """TransUNet's Conv2dReLU: 3x3 conv without bias (BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class CupBlock(nn.Module):
    """Bilinear upsampling (align_corners=True, as the seed's ``nn.UpsamplingBilinear2d``), optional
    skip concatenated after upsampling, then two 3x3 conv + BatchNorm + ReLU (the skip widens conv1)."""

    def __init__(self, in_ch: int, out_ch: int, skip_ch: int = 0):
        super().__init__()
        self.skip_channels = skip_ch
        self.conv1 = _conv_bn_relu(in_ch + skip_ch, out_ch)
        self.conv2 = _conv_bn_relu(out_ch, out_ch)

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class CupDecoder(nn.Module):
    """TransUNet's cascaded upsampler, as the seed framework decodes every PFM (head ``cup``).

    It decodes the PFM's final output: the last tapped block (the final block by default) after the
    ViT's final LayerNorm, prefix tokens dropped, as a grid (the model keeps the final norm for this
    head; with a Transformer adapter the adapter's normalised output takes that place). A 3x3 conv to
    512 channels + BatchNorm + ReLU, then four blocks of (bilinear up, two 3x3 conv + BN + ReLU) with
    256, 128, 64 and 16 channels, then a 3x3 conv (with bias) to the classes. About 4.1 M parameters
    for a 384-wide encoder, 9.4 M for a 1536-wide one (the first conv grows with the width).

    Scales: without skips, blocks 1-3 double the grid (1/patch -> 8/patch) and block 4 goes to the
    input size, i.e. x2 for patch 16, x1.75 for patch 14 and x1 (no upsampling) for patch 8, exactly as
    the seed's per-model scale table, so the total scale always equals the patch size. With CNN-adapter
    skips (``skip_channels`` in the encoder's order: 1/2, 1/4, 1/8) blocks 1-3 resize to the skip's
    size and concatenate the 1/8, 1/4 and 1/2 skip (TransUNet's DecoderBlock: conv1 reads
    ``in + skip`` channels) and block 4 goes to the input size. Where the seed first upsamples x2 and
    then resizes again to a skip of another size (patch 8 and 14), this resizes once, straight to the
    target: one interpolation instead of two. Any width of skips works (the ResNetV2 adapter's 64,
    256, 512 times its width factor, or the small adapter's), so the head pairs with every strategy.
    """

    uses_skips = True
    reads_final_tokens = True
    HEAD_CHANNELS = 512
    DECODER_CHANNELS = (256, 128, 64, 16)

    def __init__(self, in_channels: list[int], skip_channels: list[int], num_classes: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        if len(skip_channels) > len(self.DECODER_CHANNELS) - 1:
            raise ValueError(f"The cup head takes at most three skips (1/2, 1/4, 1/8), got {len(skip_channels)}.")
        # encoder skips arrive finest first ([1/2, 1/4, 1/8]); decoder blocks 1-3 want 1/8, 1/4, 1/2
        block_skips = [*reversed(skip_channels), *[0] * (len(self.DECODER_CHANNELS) - len(skip_channels))]
        self.conv_more = _conv_bn_relu(in_channels[-1], self.HEAD_CHANNELS)
        widths = (self.HEAD_CHANNELS, *self.DECODER_CHANNELS)
        self.blocks = nn.ModuleList(
            CupBlock(widths[i], widths[i + 1], block_skips[i]) for i in range(len(self.DECODER_CHANNELS))
        )
        self.segmentation_head = nn.Conv2d(self.DECODER_CHANNELS[-1], num_classes, 3, padding=1)

    def forward(self, grids: list[torch.Tensor], skips: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.conv_more(grids[-1])
        h, w = x.shape[-2:]
        coarse_first = list(reversed(skips))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            skip = coarse_first[i] if block.skip_channels and i < len(coarse_first) else None
            if skip is not None:
                size = tuple(skip.shape[-2:])
            elif i == last:
                size = tuple(out_size)
            else:
                size = (h * 2 ** (i + 1), w * 2 ** (i + 1))
            x = block(x, size, skip)
        return self.segmentation_head(x)
