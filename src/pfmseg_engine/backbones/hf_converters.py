"""Hugging Face ``transformers`` checkpoints -> timm ``VisionTransformer`` keys.

Phikon is published as a ``ViTModel``; Phikon-v2 and Midnight as a ``Dinov2Model``; Hibou as DINOv2 with
registers. Their hub files use the transformers v4 names (``attention.attention.query``,
``mlp.weights_in``, ...), which transformers v5 still writes with ``save_pretrained``; the in-memory v5
modules use new names (``attention.q_proj``, ``mlp.gate_proj``/``up_proj``, ``layers.N``). Both are
accepted, so a state dict taken from a live transformers model loads as well as a downloaded file.

The renaming is data: a :class:`KeyMap` lists module-path renames for top-level keys and for keys inside
a block. A target written ``name#k`` is part ``k`` of a tensor that timm keeps fused (q/k/v into
``attn.qkv``, SwiGLU gate/up into ``mlp.fc1``); the parts are concatenated in index order. Keys that no
rule knows are passed through so the strict load names them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._registry import StateDict, register_converter
from .converters import convert_timm
from .positions import antialias_for

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

_PART = re.compile(r"^(?P<head>.*)#(?P<index>\d+)(?P<tail>(\..*)?)$")


@dataclass(frozen=True)
class KeyMap:
    """Module-path renames of one published layout.

    ``top`` applies to keys outside the transformer blocks, ``block`` to the part of a key after the
    block prefix matched by ``block_prefix`` (whose first group is the block index). A ``None`` target
    drops the tensor on purpose (pretraining-only parameters). Sources match whole path components, the
    longest first, so ``attention.output.dense`` is never mistaken for ``output.dense``.
    """

    top: Mapping[str, str | None]
    block_prefix: str
    block: Mapping[str, str | None]

    def rename(self, key: str) -> str | None:
        """The timm name of ``key`` (``None`` when dropped, the key itself when unknown)."""
        match = re.match(self.block_prefix, key)
        if match:
            prefix, rest, table = f"blocks.{match.group(1)}.", key[match.end():], self.block
        else:
            prefix, rest, table = "", key, self.top
        for source in sorted(table, key=len, reverse=True):
            if rest == source or rest.startswith(source + "."):
                target = table[source]
                return None if target is None else prefix + target + rest[len(source):]
        return prefix + rest


def rename_keys(state: StateDict, keymap: KeyMap) -> StateDict:
    """Apply ``keymap`` to every key, then fuse ``name#k`` parts into one tensor."""
    renamed: StateDict = {}
    for key, value in state.items():
        new_key = keymap.rename(key)
        if new_key is not None:
            renamed[new_key] = value
    return fuse_parts(renamed)


def fuse_parts(state: StateDict) -> StateDict:
    """Concatenate ``x#0.weight``, ``x#1.weight``, ... into ``x.weight`` (dim 0, index order).

    An incomplete set (say ``k`` missing) is left unfused, so the strict load reports both the stray
    parts and the missing fused tensor by name instead of loading a wrongly shaped guess.
    """
    groups: dict[str, dict[int, str]] = {}
    for key in state:
        match = _PART.match(key)
        if match:
            groups.setdefault(match["head"] + match["tail"], {})[int(match["index"])] = key
    fused = dict(state)
    for target, parts in groups.items():
        if sorted(parts) != list(range(len(parts))) or len(parts) < 2:
            continue
        fused[target] = torch.cat([fused.pop(parts[i]) for i in range(len(parts))], dim=0)
    return fused


def strip_model_prefix(state: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Remove a task-model prefix (``vit.``, ``dinov2.``) shared by the backbone keys.

    Task models (``ViTForImageClassification``, ``Dinov2ForImageClassification``) keep the backbone
    under such an attribute and their classifier beside it; the classifier keys keep their names.
    """
    for prefix in prefixes:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def resample_patch_grid(
    grid_pos: torch.Tensor, new_grid: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Resize a square ``(1, h*w, C)`` patch position table the way the vendor code does at run time.

    Bicubic with ``align_corners=False``, as transformers does; ``antialias`` as the vendor class does
    (``positions.ANTIALIAS_BY_LAYOUT``), so a model built at another size than its checkpoint's grid
    matches the vendor model run at that size. MUSK's table is only ever placed at its own 384 px grid.
    """
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        grid_pos, new_size=list(new_grid), num_prefix_tokens=0, antialias=antialias, align_corners=False
    )


def place_class_position(state: StateDict, model: VisionTransformer, antialias: bool = False) -> StateDict:
    """Lay out a ``[class, patch grid]`` position table the way ``model`` expects it.

    transformers and BEiT3 give the class token a position and registers none. timm either keeps the
    class position in ``pos_embed`` (then registers get zero positions) or, with ``no_embed_class``
    (the DINOv2-with-registers builds), adds no position to prefix tokens, so the class position is
    folded into ``cls_token``. Both are exact rewrites; the grid is resampled to the build size (a no-op
    when the model was built at the checkpoint's grid, the default).
    """
    pos = state.get("pos_embed")
    if pos is None:
        return state
    state = dict(state)
    grid = tuple(model.patch_embed.grid_size)
    class_pos, grid_pos = pos[:, :1], resample_patch_grid(pos[:, 1:], grid, antialias)
    if getattr(model, "no_embed_class", False):
        if "cls_token" in state:
            state["cls_token"] = state["cls_token"] + class_pos
        state["pos_embed"] = grid_pos
    else:
        registers = class_pos.new_zeros(1, int(getattr(model, "num_reg_tokens", 0)), pos.shape[-1])
        state["pos_embed"] = torch.cat([class_pos, registers, grid_pos], dim=1)
    return state


# Keys outside the blocks, shared by ViTModel and Dinov2Model (with or without registers).
HF_TOP_LEVEL: dict[str, str | None] = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "embeddings.mask_token": None,  # masked-image-modelling token, never used for features
    "layernorm": "norm",
    "pooler": None,  # ViTModel's tanh pooler on the class token
    "classifier": None,  # head of the *ForImageClassification task models
}
# transformers v4 names (hub files) and v5 names (live modules) of the attention projections.
HF_ATTENTION: dict[str, str | None] = {
    "attention.attention.query": "attn.qkv#0",
    "attention.attention.key": "attn.qkv#1",
    "attention.attention.value": "attn.qkv#2",
    "attention.output.dense": "attn.proj",
    "attention.q_proj": "attn.qkv#0",
    "attention.k_proj": "attn.qkv#1",
    "attention.v_proj": "attn.qkv#2",
    "attention.o_proj": "attn.proj",
}
HF_VIT_KEYS = KeyMap(
    top=HF_TOP_LEVEL,
    block_prefix=r"(?:encoder\.layer|layers)\.(\d+)\.",
    block={
        **HF_ATTENTION,
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    },
)
HF_DINOV2_KEYS = KeyMap(
    top=HF_TOP_LEVEL,
    block_prefix=r"(?:encoder\.layer|layers)\.(\d+)\.",
    block={
        **HF_ATTENTION,
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        # SwiGLU: v4 packs [gate; up] in weights_in (x1, x2 = chunk(2); silu(x1) * x2), exactly timm's
        # SwiGLUPacked fc1; v5 splits it into gate_proj/up_proj, fused back here in that order.
        "mlp.weights_in": "mlp.fc1",
        "mlp.weights_out": "mlp.fc2",
        "mlp.gate_proj": "mlp.fc1#0",
        "mlp.up_proj": "mlp.fc1#1",
        "mlp.down_proj": "mlp.fc2",
    },
)
HF_MODEL_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.")


def convert_hf(state: StateDict, model: VisionTransformer, keymap: KeyMap, layout: str) -> StateDict:
    """Shared path of the transformers layouts: unprefix, rename, fuse, place positions.

    The table keeps the checkpoint's grid when the model was built at it (the default, see
    ``adopt_checkpoint_grid``); a build at another size resamples it here with the vendor's kernel.
    """
    state = rename_keys(strip_model_prefix(state, HF_MODEL_PREFIXES), keymap)
    antialias = bool(antialias_for(layout, model))
    return convert_timm(place_class_position(state, model, antialias), model)


@register_converter("hf_vit")
def convert_hf_vit(state: StateDict, model: VisionTransformer) -> StateDict:
    """transformers ``ViTModel`` (Phikon) -> timm ViT."""
    return convert_hf(state, model, HF_VIT_KEYS, "hf_vit")


@register_converter("hf_dinov2")
def convert_hf_dinov2(state: StateDict, model: VisionTransformer) -> StateDict:
    """transformers ``Dinov2Model``/``Dinov2WithRegistersModel`` (Phikon-v2, Midnight, Hibou) -> timm."""
    return convert_hf(state, model, HF_DINOV2_KEYS, "hf_dinov2")
