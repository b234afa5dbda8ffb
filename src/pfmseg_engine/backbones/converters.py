"""Checkpoint layout converters: published key names -> timm ``VisionTransformer`` key names.

One function per published layout, registered (:mod:`._registry`) under the name used in the
``checkpoint_layout`` column of the backbone table (the way timm keeps a ``checkpoint_filter_fn`` per
model family). Every converter returns a dict ready for a strict ``load_state_dict``; anything it
does not recognise is passed through so the strict load reports it by name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._registry import StateDict, register_converter

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)

# Heads that pretraining checkpoints carry but a feature extractor never uses.
UNUSED_HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.", "fc_norm.", "mask_token")


def drop_unused_heads(state: StateDict, model: VisionTransformer) -> StateDict:
    """Drop classifier/projection heads the timm build (``num_classes=0``) does not have."""
    own = set(model.state_dict())
    kept = {}
    dropped = []
    for key, value in state.items():
        if key not in own and key.startswith(UNUSED_HEAD_PREFIXES):
            dropped.append(key)
        else:
            kept[key] = value
    if dropped:
        log.info("Ignoring %d pretraining-head tensors (e.g. %s)", len(dropped), dropped[0])
    return kept


def fit_position_embedding(state: StateDict, model: VisionTransformer) -> StateDict:
    """Resample ``pos_embed`` when the checkpoint was saved at another image size."""
    target = model.state_dict().get("pos_embed")
    source = state.get("pos_embed")
    if target is None or source is None or source.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        source, new_size=list(grid), num_prefix_tokens=prefix, verbose=False
    )
    return state


@register_converter("timm")
def convert_timm(state: StateDict, model: VisionTransformer) -> StateDict:
    """Checkpoints already in timm layout (UNI, Virchow, GigaPath, H-optimus, Kaiko, Lunit, ...)."""
    return fit_position_embedding(drop_unused_heads(state, model), model)


def take_prefixed(state: StateDict, prefix: str) -> StateDict:
    """Keep only the keys under ``prefix`` and remove it (other towers are ignored on purpose)."""
    taken = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return taken or state


@register_converter("open_clip_conch")
def convert_open_clip_conch(state: StateDict, model: VisionTransformer) -> StateDict:
    """CONCH v1: an open_clip CoCa model whose vision trunk is a timm ViT under ``visual.trunk.``."""
    return convert_timm(take_prefixed(state, "visual.trunk."), model)


@register_converter("conch_v1_5")
def convert_conch_v1_5(state: StateDict, model: VisionTransformer) -> StateDict:
    """CONCH v1.5: a timm ViT-L under ``trunk.`` plus an attentional pooler unused here."""
    return convert_timm(take_prefixed(state, "trunk."), model)

