"""Trainable modules that strategies add beside or after a frozen backbone."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

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


class SmallCNNAdapter(nn.Module):
    """A small convolutional branch run on the image in parallel with the ViT (``cnn_adapter_small``).

    ViT token grids are 1/8 to 1/16 of the input: too coarse for nuclei and gland borders. This branch
    adds locality with three stride-2 stages whose outputs (1/2, 1/4, 1/8) all reach the head as
    skips, so nothing it computes is thrown away. GroupNorm keeps it batch-size independent, which
    matters for the small batches of whole-slide fine-tuning. It is a light (about 0.29 M parameters
    at the default widths) alternative to the seed's ResNetV2 branch (:class:`ResNetV2Adapter`), cheap
    enough for CPU demos.
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


def _projection(in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1, preact: bool = False,
                conv_layer: type[nn.Module] | None = None, norm_layer: object = None, **kwargs) -> nn.Module:
    """Shortcut projection of a unit's first block: 1x1 weight-standardised conv + per-channel GroupNorm.

    TransUNet (and so the seed) normalises the projected shortcut with ``GroupNorm(cout, cout)`` (one
    group per channel, default eps 1e-5) rather than with the 32-group norm of the residual branch, so
    the ``norm_layer`` timm's Bottleneck passes in is replaced here.
    """
    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import DownsampleConv

    return DownsampleConv(in_chs, out_chs, stride=stride, dilation=dilation, preact=False, conv_layer=conv_layer,
                          norm_layer=partial(GroupNormAct, num_groups=out_chs, eps=1e-5), **kwargs)


class ResNetV2Adapter(nn.Module):
    """The seed's CNN adapter (strategy ``cnn_adapter``): TransUNet's ResNetV2 branch beside the ViT.

    Run on the normalised image in parallel with the frozen PFM, it gives the decoder the locality a
    ViT lacks (token grids are 1/8 to 1/16 of the input; nuclei and gland borders need 1/2). Structure,
    built from timm's ResNetV2 parts (``StdConv2d``, ``GroupNormAct``, the non-pre-activation
    ``Bottleneck`` TransUNet and timm's R50+ViT hybrids use, and its ``fixed`` stem):

    - root: 7x7 stride-2 weight-standardised conv to ``width = int(64 * width_factor)`` channels,
      GroupNorm(32) + ReLU -> skip at 1/2 (``width`` channels);
    - 3x3 stride-2 max-pool, block 1: ``block_units[0]`` bottleneck units to ``4 * width`` channels
      -> skip at 1/4;
    - block 2: ``block_units[1]`` units to ``8 * width`` channels, the first with stride 2 -> skip at 1/8.

    The seed also runs a third block (``block_units[2]`` units to ``16 * width`` channels, 1/16) whose
    output it discards when the PFM, not the CNN, feeds the transformer; it is neither built nor run
    here (no parameters that could never train, no wasted compute). ``block_units[2]`` is accepted so
    seed configs load, and is unused. Root + blocks 1-2 at width 1 hold 1,444,928 parameters.

    Numerics follow the seed: weight standardisation with eps 1e-5, GroupNorm eps 1e-6, per-channel
    GroupNorm on projected shortcuts. One deliberate difference: the seed max-pools without padding and
    zero-fills the missing last row/column of the 1/4 map (TransUNet's workaround), so block 2 sees an
    (H/4 - 1)-sized map; here the pool pads by one (timm's ``fixed`` stem; after the ReLU, zero padding
    equals -inf padding), so every skip is exactly ceil(H/2), ceil(H/4), ceil(H/8) for any input and the
    1/4 skip has real values in its last row and column.
    """

    def __init__(self, width_factor: float = 1.0, block_units: Sequence[int] = (3, 4, 9), in_chans: int = 3):
        super().__init__()
        from timm.layers import GroupNormAct, StdConv2d
        from timm.models.resnetv2 import Bottleneck, create_resnetv2_stem

        width = int(64 * width_factor)
        if width < 32 or width % 32:
            raise ValueError(f"width_factor {width_factor} gives {width} channels; GroupNorm(32) needs a multiple "
                             "of 32 (width_factor 0.5, 1, 1.5, 2, ...).")
        conv = partial(StdConv2d, eps=1e-5)
        norm = partial(GroupNormAct, num_groups=32, eps=1e-6)

        def block(in_chs: int, out_chs: int, units: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*[
                Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride=stride if i == 0 else 1,
                           conv_layer=conv, norm_layer=norm, proj_layer=_projection if i == 0 else None)
                for i in range(units)
            ])

        self.width = width
        self.block_units = tuple(int(u) for u in block_units)
        self.root = create_resnetv2_stem(in_chans, width, stem_type="fixed", preact=False,
                                         conv_layer=conv, norm_layer=norm)
        self.block1 = block(width, 4 * width, self.block_units[0], stride=1)
        self.block2 = block(4 * width, 8 * width, self.block_units[1], stride=2)
        self.out_channels = (width, 4 * width, 8 * width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skips ``[1/2, 1/4, 1/8]`` of normalised image ``x``."""
        stem = self.root.get_submodule  # timm's stem: conv, norm, pad, pool
        half = stem("norm")(stem("conv")(x))
        quarter = self.block1(stem("pool")(stem("pad")(half)))
        eighth = self.block2(quarter)
        return [half, quarter, eighth]


def _num_heads(dim: int) -> int:
    """Largest head count with head size >= 64 that divides ``dim`` (at least one head)."""
    for heads in range(max(1, dim // 64), 0, -1):
        if dim % heads == 0:
            return heads
    return 1


def _init_vit_weights(module: nn.Module) -> None:
    """The seed's adapter init (ViT convention): truncated-normal linear weights (std 0.02), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TransformerAdapter(nn.Module):
    """Trainable transformer blocks on top of the frozen encoder's output token sequence.

    The frozen encoder's representation is kept intact; these blocks learn the task-specific global
    mixing. As in the seed they see the whole sequence of the last tapped block after the encoder's
    final norm (class and register tokens included, so the global summary tokens can steer every
    patch), followed by their own norm; the encoder then drops the prefix tokens and reshapes the patch
    tokens into the grid that replaces the last tapped grid.
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
        self.apply(_init_vit_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, prefix + h*w, C) tokens -> adapted tokens of the same shape."""
        return self.norm(self.blocks(tokens))
