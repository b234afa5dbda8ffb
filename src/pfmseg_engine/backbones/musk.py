"""MUSK (BEiT3 multiway transformer, torchscale) -> timm ``VisionTransformer``.

MUSK's image path runs only the ``A`` expert of every multiway module (``split_position == -1``), and that
path is a pre-LayerNorm ViT-L/16 with the torchscale "sub-LN" extras: a LayerNorm on the attention output
before ``out_proj`` (``inner_attn_ln``) and one on the MLP hidden activations before ``fc2``
(``ffn_layernorm``). timm's ViT has both (``scale_attn_norm=True`` -> ``attn.norm``,
``scale_mlp_norm=True`` -> ``mlp.norm``), so the vision branch becomes a plain timm model and LoRA, the
adapters and ``forward_intermediates`` work on it unchanged. Checked details of torchscale:

- q is scaled by ``head_dim ** -0.5`` after its bias, as timm's attention does, so no weight rescaling;
  q, k and v all carry a bias and are concatenated into ``attn.qkv``.
- positions follow fairseq and start at 2: the table ``embed_positions.A.weight`` has ``N + 1 + 2`` rows,
  row 2 is the class token's, rows 3.. the patch grid's. Rows 0 and 1 are never used.
- no embedding scale (``no_scale_embedding`` defaults to True), no embedding LayerNorm, no LayerScale;
  the encoder output goes through ``encoder.layer_norm`` (``normalize_output=True``) -> timm ``norm``.
- LayerNorm eps is torchscale's default 1e-5 (the spec row sets ``norm_eps``); GELU is the exact one.

The text branch (``B`` experts, ``text_embed``, ``embed_positions.B``), the retrieval heads and the mask
token are dropped by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._registry import StateDict, register_converter
from .converters import convert_timm
from .hf_converters import KeyMap, place_class_position, rename_keys

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# fairseq convention kept by torchscale's PositionalEmbedding: position ids start at 2.
POSITION_OFFSET = 2

_VISION_BLOCK = {
    "self_attn.q_proj.A": "attn.qkv#0",
    "self_attn.k_proj.A": "attn.qkv#1",
    "self_attn.v_proj.A": "attn.qkv#2",
    "self_attn.out_proj.A": "attn.proj",
    "self_attn.inner_attn_ln.A": "attn.norm",
    "self_attn_layer_norm.A": "norm1",
    "final_layer_norm.A": "norm2",
    "ffn.A.fc1": "mlp.fc1",
    "ffn.A.ffn_layernorm": "mlp.norm",
    "ffn.A.fc2": "mlp.fc2",
}
_TEXT_BLOCK: dict[str, str | None] = {
    source.replace(".A", ".B"): None for source in _VISION_BLOCK
}

BEIT3_MUSK_KEYS = KeyMap(
    top={
        "beit3.vision_embed.cls_token": "cls_token",
        "beit3.vision_embed.proj": "patch_embed.proj",
        "beit3.vision_embed.mask_token": None,
        "beit3.encoder.embed_positions.A.weight": "pos_embed",
        "beit3.encoder.embed_positions.B": None,
        "beit3.encoder.layer_norm.A": "norm",
        "beit3.encoder.layer_norm.B": None,
        "beit3.text_embed": None,
        "vision_head": None,
        "language_head": None,
        "logit_scale": None,
    },
    block_prefix=r"beit3\.encoder\.layers\.(\d+)\.",
    block={**_VISION_BLOCK, **_TEXT_BLOCK},
)


@register_converter("beit3_musk")
def convert_beit3_musk(state: StateDict, model: VisionTransformer) -> StateDict:
    """MUSK checkpoint (``beit3.*`` multiway keys) -> timm ViT-L/16 with sub-LayerNorms."""
    state = rename_keys(state, BEIT3_MUSK_KEYS)
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 2:  # nn.Embedding table, not yet a (1, tokens, dim) parameter
        state["pos_embed"] = pos[POSITION_OFFSET:].unsqueeze(0)
    return convert_timm(place_class_position(state, model), model)
