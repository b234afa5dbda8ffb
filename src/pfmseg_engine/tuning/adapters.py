"""Trainable modules that strategies add beside or after a frozen backbone."""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    groups = 8 if out_ch % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_ch),
        nn.ReLU(inplace=True),
    )


class CNNAdapter(nn.Module):
    """A small convolutional branch run on the image in parallel with the ViT.

    ViT token grids are 1/8 to 1/16 of the input: too coarse for nuclei and gland borders. This branch
    adds locality with three stride-2 stages whose outputs (1/2, 1/4, 1/8) all reach the head as
    skips, so nothing it computes is thrown away. GroupNorm keeps it batch-size independent, which
    matters for the small batches of whole-slide fine-tuning.
    """

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        widths = (3, *channels)
        self.stages = nn.ModuleList(_conv_block(widths[i], widths[i + 1], stride=2) for i in range(3))
        self.out_channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


def _num_heads(dim: int) -> int:
    """Largest head count with head size >= 64 that divides ``dim`` (at least one head)."""
    for heads in range(max(1, dim // 64), 0, -1):
        if dim % heads == 0:
            return heads
    return 1


class TransformerAdapter(nn.Module):
    """Trainable transformer blocks on top of the frozen encoder's last token grid.

    The frozen encoder's representation is kept intact; these blocks learn the task-specific global
    mixing and replace the last tapped grid that the head sees.
    """

    def __init__(self, dim: int, depth: int = 2, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, init_values: float | None = 1e-5,
                 qk_norm: bool = False):
        super().__init__()
        from timm.models.vision_transformer import Block

        # stochastic depth grows linearly over the blocks, as in timm's ViT
        drop_paths = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(dim, _num_heads(dim), mlp_ratio=mlp_ratio, qkv_bias=True, qk_norm=qk_norm, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=drop_paths[i], init_values=init_values)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        n, c, h, w = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)
        tokens = self.norm(self.blocks(tokens))
        return tokens.transpose(1, 2).reshape(n, c, h, w)
