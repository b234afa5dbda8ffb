"""Position tables: which grid a checkpoint stores, and how each vendor resamples it at run time.

A ViT trained at one grid (224 px / 16 = 14x14 patches) runs at other input sizes by resampling its
position table on every forward. Every vendor here does that bicubically with ``align_corners=False``,
but not with the same kernel: timm antialiases (so every checkpoint whose vendor model is a timm ViT:
UNI, Virchow, CONCH, H-optimus, Kaiko, ...), and in PyTorch that also selects a different cubic kernel
(a = -0.5 instead of -0.75) when *upsampling*, so the two disagree even on a 14x14 -> 32x32 resize.
transformers' ``ViTModel`` (Phikon) and ``Dinov2Model`` (Phikon-v2, Midnight) do not antialias;
``Dinov2WithRegistersModel`` (Hibou) does. A converted transformers checkpoint therefore runs in
:class:`VendorResampledViT`, a timm ``VisionTransformer`` whose run-time resampling uses the vendor's
kernel; together with keeping the checkpoint's own grid at load time
(:func:`~pfmseg_engine.backbones.backbone.adopt_checkpoint_grid`) the table is resampled once, from the
checkpoint's grid to the run grid, exactly as the vendor model computes it at every input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import cast

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# Published layouts whose vendor resamples positions with another kernel than timm: layout -> whether
# the vendor antialiases, given the built model. Layouts not listed run timm's own resampling.
ANTIALIAS_BY_LAYOUT: MappingProxyType[str, Callable[[nn.Module], bool]] = MappingProxyType({
    "hf_vit": lambda vit: False,  # ViTModel.interpolate_pos_encoding
    # Dinov2Model: no antialiasing; Dinov2WithRegistersModel: antialias=True (the timm builds with registers)
    "hf_dinov2": lambda vit: int(getattr(vit, "num_reg_tokens", 0)) > 0,
})

# Layouts whose vendor model resamples its table on every forward, so the converted model keeps the
# checkpoint's grid and resamples at run time. MUSK ('beit3_musk') accepts only its trained size and
# is absent on purpose.
RUNTIME_RESAMPLED_LAYOUTS = ("timm", "open_clip_conch", "conch_v1_5", *ANTIALIAS_BY_LAYOUT)

# Names of a stored position table: timm's, and transformers' (whose table holds the class position only).
TIMM_TABLE, TRANSFORMERS_TABLE = "pos_embed", "embeddings.position_embeddings"


def antialias_for(layout: str, vit: nn.Module) -> bool | None:
    """Whether the vendor of ``layout`` antialiases when resampling (None: timm's own resampling)."""
    rule = ANTIALIAS_BY_LAYOUT.get(layout)
    return None if rule is None else rule(vit)


class VendorResampledViT(VisionTransformer):
    """A timm ViT whose per-forward position resampling uses its checkpoint vendor's kernel.

    Only :meth:`_pos_embed` differs from timm's: the table is resampled with ``position_antialias`` instead
    of timm's fixed ``antialias=True``. Instances come from :func:`use_vendor_resampling`, which re-types
    a model timm built, so timm's registry still decides the architecture.
    """

    position_antialias: bool = False

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None or not self.dynamic_img_size:
            return super()._pos_embed(x)
        batch, height, width, channels = x.shape
        table = resample_abs_pos_embed(
            self.pos_embed,
            new_size=[height, width],
            old_size=list(self.patch_embed.grid_size),
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            antialias=self.position_antialias,
            align_corners=False,
        )
        x = x.view(batch, -1, channels)
        prefix = [token.expand(batch, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        # with no_embed_class the prefix tokens carry no table position (theirs is folded into them)
        tokens = torch.cat([*prefix, x + table], dim=1) if self.no_embed_class else torch.cat([*prefix, x], 1) + table
        return self.pos_drop(tokens)


def use_vendor_resampling(vit: nn.Module, layout: str) -> nn.Module:
    """Make ``vit`` resample positions as the vendor of ``layout`` does (unchanged for timm's vendors)."""
    antialias = antialias_for(layout, vit)
    if antialias is None:
        return vit
    if type(vit) not in (VisionTransformer, VendorResampledViT):
        raise TypeError(f"Layout '{layout}' needs a timm VisionTransformer, got {type(vit).__name__}.")
    vit.__class__ = VendorResampledViT
    resampled = cast(VendorResampledViT, vit)
    resampled.position_antialias = antialias
    return resampled


def checkpoint_position_grid(state: dict[str, torch.Tensor], vit: VisionTransformer) -> tuple[int, int] | None:
    """The square patch grid of the one position table in ``state`` (None if absent or ambiguous).

    A timm table holds a position for every prefix token unless the model uses ``no_embed_class``; a
    transformers table holds the class position only (registers have none).
    """
    tables = [(key, value) for key, value in state.items() if value.ndim == 3 and any(
        key == name or key.endswith("." + name) for name in (TIMM_TABLE, TRANSFORMERS_TABLE))]
    if len(tables) != 1:
        return None
    key, table = tables[0]
    if key.endswith(TRANSFORMERS_TABLE):
        prefix = 1
    else:
        prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    cells = table.shape[1] - prefix
    side = math.isqrt(max(0, cells))
    return (side, side) if side and side * side == cells else None
