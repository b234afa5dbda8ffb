"""Checkpoint converters, proven numerically against each vendor's own model class.

Each test builds the vendor model (transformers ViT/DINOv2, CONCH's timm trunk inside its CoCa wrapper,
a DINO teacher, a torchscale-structured BEiT3 for MUSK) at a tiny size with random weights, saves it the
way the vendor publishes it, loads the file through ``build_backbone`` and checks that our token grids
equal the vendor's own hidden states. No network: hub downloads are monkeypatched.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from torch import nn

from pfmseg_engine.backbones import CONVERTERS, build_backbone, count_parameters, create_vit, get_spec
from pfmseg_engine.backbones.musk import BEIT3_MUSK_KEYS
from pfmseg_engine.errors import WeightsError

ATOL = 1e-4


# ----------------------------------------------------------------------------------------------- helpers
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter distinct random values, so swapped or dropped tensors cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                is_norm_weight = isinstance(sub, nn.LayerNorm) and name == "weight"
                param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.2 * noise)
    return module.eval()


def to_grid(tokens: torch.Tensor, prefix: int, hw: tuple[int, int]) -> torch.Tensor:
    """Vendor hidden state (B, prefix + h*w, C) -> NCHW patch grid."""
    b, _, c = tokens.shape
    return tokens[:, prefix:].reshape(b, *hw, c).permute(0, 3, 1, 2)


def save(state: dict, path) -> str:
    """Write a state dict as the vendors do: safetensors or a pickled ``.bin``/``.pth``."""
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def assert_features_match(backbone, x, indices, expected) -> None:
    with torch.no_grad():
        ours = backbone.features(x, indices=indices)
    for got, want in zip(ours, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def timm_block_outputs(vit: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Token sequences after each block of a vendor timm trunk (its own forward path)."""
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        outs = []
        for block in vit.blocks:
            h = block(h)
            outs.append(h)
    return outs


def hf_hidden_states(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states


# ------------------------------------------------------------------------------ transformers ViT (Phikon)
def _phikon_vendor(image_size: int = 64):
    config = transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=192,
        image_size=image_size, patch_size=16, layer_norm_eps=1e-12, qkv_bias=True,
    )
    return randomize_(transformers.ViTModel(config), seed=1)


@pytest.mark.parametrize("layout", ["hub_safetensors", "v5_state_nested", "task_model_bin"])
def test_phikon_vit_model_matches_transformers(tmp_path, layout):
    vendor = _phikon_vendor()
    if layout == "hub_safetensors":  # save_pretrained writes the hub (v4) names
        vendor.save_pretrained(tmp_path)
        path = str(tmp_path / "model.safetensors")
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            assert "encoder.layer.0.attention.attention.query.weight" in set(f.keys())
    elif layout == "v5_state_nested":  # live v5 module names, wrapped as a training checkpoint
        state = {"module." + k: v for k, v in vendor.state_dict().items()}
        path = save({"model": state, "epoch": 3}, tmp_path / "phikon.pth")
    else:  # ViTForImageClassification: backbone under "vit.", classifier beside it
        state = {"vit." + k: v for k, v in vendor.state_dict().items() if not k.startswith("pooler")}
        state["classifier.weight"] = torch.zeros(2, 48)
        path = save(state, tmp_path / "pytorch_model.bin")

    backbone = build_backbone("phikon", weights=path, tiny=True, overrides={"img_size": 64})
    x = torch.randn(2, 3, 64, 64)
    hidden = hf_hidden_states(vendor, x)
    expected = [to_grid(hidden[i + 1], 1, (4, 4)) for i in (1, 3)]
    assert_features_match(backbone, x, [1, 3], expected)


# ---------------------------------------------------------------- transformers DINOv2 (Phikon-v2, Midnight)
def _dinov2_vendor(patch: int, image_size: int, swiglu: bool, registers: int = 0):
    common = dict(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=4, patch_size=patch,
        image_size=image_size, layer_norm_eps=1e-6, use_swiglu_ffn=swiglu, layerscale_value=1e-5,
    )
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        return randomize_(transformers.Dinov2WithRegistersModel(config), seed=3)
    return randomize_(transformers.Dinov2Model(transformers.Dinov2Config(**common)), seed=2)


DINOV2_CASES = {
    # name: (patch, vendor image size, swiglu, registers)
    "phikon_v2": (16, 64, False, 0),
    "midnight12k": (14, 56, True, 0),
    "hibou_l": (14, 56, False, 4),
    "hibou_b": (14, 56, False, 4),
}


@pytest.mark.parametrize("hub_layout", [True, False], ids=["hub_v4_names", "v5_names"])
@pytest.mark.parametrize("name", list(DINOV2_CASES))
def test_dinov2_family_matches_transformers(tmp_path, name, hub_layout):
    patch, size, swiglu, registers = DINOV2_CASES[name]
    vendor = _dinov2_vendor(patch, size, swiglu, registers)
    if hub_layout:
        vendor.save_pretrained(tmp_path)
        path = str(tmp_path / "model.safetensors")
    else:
        path = save({"dinov2." + k: v for k, v in vendor.state_dict().items()}, tmp_path / "w.bin")

    backbone = build_backbone(name, weights=path, tiny=True, overrides={"img_size": size})
    assert backbone.num_prefix_tokens == 1 + registers
    if swiglu:  # HF: hidden (int(2/3 * 4 * 48) + 7) // 8 * 8 = 128 per half; timm packs both halves
        assert backbone.vit.blocks[0].mlp.fc1.out_features == 2 * 128
    x = torch.randn(2, 3, size, size)
    hidden = hf_hidden_states(vendor, x)
    grid = (size // patch, size // patch)
    expected = [to_grid(hidden[i + 1], 1 + registers, grid) for i in (1, 3)]
    assert_features_match(backbone, x, [1, 3], expected)


TRANSFORMERS_CASES = {"phikon": (16, 64, False, 0), **DINOV2_CASES}  # name: (patch, size, swiglu, registers)


def _transformers_vendor(name: str):
    patch, size, swiglu, registers = TRANSFORMERS_CASES[name]
    return _phikon_vendor(size) if name == "phikon" else _dinov2_vendor(patch, size, swiglu, registers)


@pytest.mark.parametrize("name", list(TRANSFORMERS_CASES))
def test_position_table_is_resampled_once_like_the_vendor_at_every_size(tmp_path, name):
    """Checkpoint at a 4x4 grid, spec build size 224: the grid is kept, and each run size (larger,
    smaller, non-square) is resampled once at run time with the vendor's kernel, as the vendor model does."""
    patch, _, _, registers = TRANSFORMERS_CASES[name]
    vendor = _transformers_vendor(name)
    path = save(vendor.state_dict(), tmp_path / "w.safetensors")
    backbone = build_backbone(name, weights=path, tiny=True).eval()
    assert backbone.vit.patch_embed.grid_size == (4, 4)
    vendor_kwargs = {"interpolate_pos_encoding": True} if name == "phikon" else {}
    for cells in [(4, 4), (8, 8), (3, 3), (6, 9), (7, 5)]:
        x = torch.randn(1, 3, cells[0] * patch, cells[1] * patch)
        hidden = hf_hidden_states(vendor, x, **vendor_kwargs)
        assert_features_match(backbone, x, [3], [to_grid(hidden[4], 1 + registers, cells)])


@pytest.mark.parametrize("name", ["phikon", "phikon_v2", "hibou_b"])
def test_explicit_build_size_resamples_at_load_like_the_vendor(tmp_path, name):
    """A caller who fixes the build size gets the table resampled once at load, to that size, with the
    vendor's kernel: equal to the vendor model run at that size."""
    _, size, _, registers = TRANSFORMERS_CASES[name]
    vendor = _transformers_vendor(name)
    path = save(vendor.state_dict(), tmp_path / "w.safetensors")
    backbone = build_backbone(name, weights=path, tiny=True, overrides={"img_size": 2 * size})
    assert backbone.vit.patch_embed.grid_size == (8, 8)
    x = torch.randn(1, 3, 2 * size, 2 * size)
    hidden = hf_hidden_states(vendor, x, **({"interpolate_pos_encoding": True} if name == "phikon" else {}))
    assert_features_match(backbone, x, [3], [to_grid(hidden[4], 1 + registers, (8, 8))])


@pytest.mark.parametrize("name", ["phikon", "midnight12k", "hibou_b"])
def test_the_vendor_kernel_matters(name):
    """The model resamples with the vendor's kernel (transformers' ViT/DINOv2: no antialias, DINOv2
    with registers: antialias), and the other kernel would differ clearly, even when upsampling."""
    from timm.layers import resample_abs_pos_embed

    patch, size, _, registers = TRANSFORMERS_CASES[name]
    vendor = _transformers_vendor(name)
    vit = create_vit(get_spec(name), tiny=True, overrides={"img_size": size}).eval()
    vit.load_state_dict(CONVERTERS[get_spec(name).checkpoint_layout](vendor.state_dict(), vit))
    assert vit.position_antialias == bool(registers)
    embeddings = vendor.embeddings.interpolate_pos_encoding(torch.zeros(1, 64 + 1, 48), 8 * patch, 8 * patch)
    grid = embeddings[:, 1:]
    with torch.no_grad():
        ours = vit._pos_embed(torch.zeros(1, 8, 8, 48))[:, vit.num_prefix_tokens:]
        other_kernel = resample_abs_pos_embed(vendor.embeddings.position_embeddings[:, 1:], [8, 8],
                                              num_prefix_tokens=0, antialias=not registers)
    torch.testing.assert_close(ours, grid, atol=1e-5, rtol=1e-5)
    assert (other_kernel - grid).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- CONCH v1, v1.5
def _attentional_pooler(d_model: int, context_dim: int, n_queries: int) -> nn.Module:
    """open_clip's AttentionalPooler, as CONCH uses it."""
    from open_clip.transformer import AttentionalPooler

    return AttentionalPooler(d_model=d_model, context_dim=context_dim, n_head=2, n_queries=n_queries)


def _vendor_trunk(name: str, seed: int, **overrides) -> nn.Module:
    """The vendor's trunk is a timm ViT itself: build it independently of the loader and randomize it."""
    return randomize_(create_vit(get_spec(name), tiny=True, overrides=overrides), seed)


def test_conch_v1_open_clip_timm_tower(tmp_path):
    """A stock open_clip timm tower (``visual.trunk.*`` + ``visual.head.*``) loads the same way."""
    import open_clip.timm_model as open_clip_timm
    visual = randomize_(open_clip_timm.TimmModel("vit_tiny_patch16_224", embed_dim=32, pool="", proj="linear"), 11)
    clip = nn.Module()
    clip.visual = visual
    clip.logit_scale = nn.Parameter(torch.ones([]))
    path = save(clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    overrides = {"img_size": 224, "embed_dim": 192, "depth": 12, "num_heads": 3}  # = vit_tiny_patch16_224
    backbone = build_backbone("conch_v1", weights=path, tiny=True, overrides=overrides)
    x = torch.randn(1, 3, 224, 224)
    outs = timm_block_outputs(visual.trunk, x)
    assert_features_match(backbone, x, [5, 11], [to_grid(outs[i], 1, (14, 14)) for i in (5, 11)])


def test_conch_v1_coca_checkpoint(tmp_path):
    trunk = _vendor_trunk("conch_v1", seed=4, img_size=64)
    visual = nn.Module()  # CONCH's VisualModel: timm trunk + attentional poolers for contrast/caption
    visual.trunk = trunk
    visual.attn_pool_contrast = _attentional_pooler(32, 48, 1)
    visual.ln_contrast = nn.LayerNorm(32)
    visual.proj_contrast = nn.Parameter(torch.randn(32, 32))
    visual.attn_pool_caption = _attentional_pooler(48, 48, 4)
    visual.ln_caption = nn.LayerNorm(48)
    coca = nn.Module()
    coca.visual = visual
    coca.text = nn.Module()
    coca.text.token_embedding = nn.Embedding(10, 48)
    coca.logit_scale = nn.Parameter(torch.ones([]))
    path = save(coca.state_dict(), tmp_path / "pytorch_model.bin")

    backbone = build_backbone("conch_v1", weights=path, tiny=True, overrides={"img_size": 64})
    x = torch.randn(2, 3, 64, 64)
    outs = timm_block_outputs(trunk, x)
    assert_features_match(backbone, x, [1, 3], [to_grid(outs[i], 1, (4, 4)) for i in (1, 3)])


def test_conch_v1_5_trunk_checkpoint(tmp_path):
    trunk = _vendor_trunk("conch_v1_5", seed=5, img_size=64)
    assert trunk.blocks[0].ls1.gamma.numel() == 48  # LayerScale is part of the architecture
    state = {"trunk." + k: v for k, v in trunk.state_dict().items()}
    state.update({"attn_pool_contrast." + k: v for k, v in _attentional_pooler(48, 48, 1).state_dict().items()})
    state.update({"ln_contrast.weight": torch.ones(48), "ln_contrast.bias": torch.zeros(48)})
    path = save(state, tmp_path / "pytorch_model_vision.bin")

    backbone = build_backbone("conch_v1_5", weights=path, tiny=True, overrides={"img_size": 64})
    x = torch.randn(1, 3, 64, 64)
    outs = timm_block_outputs(trunk, x)
    assert_features_match(backbone, x, [3], [to_grid(outs[3], 1, (4, 4))])


# ------------------------------------------------------------------------------------- DINO teacher dict
def test_patho3dmatrix_dino_teacher_checkpoint(tmp_path):
    teacher = _vendor_trunk("patho3dmatrix-vision", seed=6, img_size=64)
    student = _vendor_trunk("patho3dmatrix-vision", seed=7, img_size=64)
    head = {"head.mlp.0.weight": torch.randn(16, 48), "head.last_layer.weight_g": torch.ones(8, 1)}
    checkpoint = {
        "student": {"module.backbone." + k: v for k, v in student.state_dict().items()},
        "teacher": {**{"backbone." + k: v for k, v in teacher.state_dict().items()}, **head},
        "epoch": 10,
    }
    path = save(checkpoint, tmp_path / "checkpoint.pth")

    backbone = build_backbone("patho3dmatrix-vision", weights=path, tiny=True, overrides={"img_size": 64})
    x = torch.randn(1, 3, 64, 64)
    assert_features_match(backbone, x, [3], [to_grid(timm_block_outputs(teacher, x)[3], 1, (4, 4))])


# --------------------------------------------------------------------- MUSK: BEiT3 as torchscale builds it
class MultiwayNetwork(nn.Module):
    """torchscale's multiway wrapper: expert A for image tokens, B (a re-initialised copy) for text."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.A, self.B = module, copy.deepcopy(module)

    def forward(self, x):  # image-only input: split_position == -1, so only A runs
        return self.A(x)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scaling = heads, (dim // heads) ** -0.5
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, MultiwayNetwork(nn.Linear(dim, dim, bias=True)))
        self.inner_attn_ln = MultiwayNetwork(nn.LayerNorm(dim, eps=1e-5))

    def forward(self, x):
        b, n, c = x.shape
        q = self.q_proj(x) * self.scaling  # torchscale scales q after its bias
        k, v = self.k_proj(x), self.v_proj(x)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1) for t in (q, k, v))
        attn = torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
        attn = attn.view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(self.inner_attn_ln(attn))


class RefFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x):
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class RefEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RefAttention(dim, heads)
        self.self_attn_layer_norm = MultiwayNetwork(nn.LayerNorm(dim, eps=1e-5))
        self.ffn = MultiwayNetwork(RefFFN(dim, hidden))
        self.final_layer_norm = MultiwayNetwork(nn.LayerNorm(dim, eps=1e-5))

    def forward(self, x):  # subln => encoder_normalize_before; deepnorm off => residual alpha 1
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class RefBEiT3(nn.Module):
    """The image path of torchscale's BEiT3 with MUSK's config (multiway, subln, normalize_output)."""

    def __init__(self, img_size: int, patch: int = 16, dim: int = 48, depth: int = 4, heads: int = 3,
                 vocab: int = 20, max_source_positions: int = 12):
        super().__init__()
        self.text_embed = nn.Embedding(vocab, dim)
        self.vision_embed = nn.Module()
        self.vision_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.vision_embed.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.vision_embed.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        num_positions = (img_size // patch) ** 2 + 1
        self.encoder = nn.Module()
        self.encoder.embed_positions = nn.Module()  # MutliwayEmbedding: A vision table, B text table
        self.encoder.embed_positions.A = nn.Embedding(num_positions + 2, dim)
        self.encoder.embed_positions.B = nn.Embedding(max_source_positions, dim)
        self.encoder.layers = nn.ModuleList(RefEncoderLayer(dim, heads, 4 * dim) for _ in range(depth))
        self.encoder.layer_norm = MultiwayNetwork(nn.LayerNorm(dim, eps=1e-5))

    def forward(self, image):
        x = self.vision_embed.proj(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.vision_embed.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        positions = torch.arange(2, x.size(1) + 2).unsqueeze(0)  # fairseq: positions start at 2
        x = x + self.encoder.embed_positions.A(positions)
        states = []
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states, self.encoder.layer_norm(x)


class RefMUSK(nn.Module):
    def __init__(self, img_size: int, **kwargs):
        super().__init__()
        self.beit3 = RefBEiT3(img_size, **kwargs)
        dim = self.beit3.vision_embed.cls_token.shape[-1]
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))


@pytest.mark.parametrize("filename", ["model.safetensors", "musk.pth"])
def test_musk_vision_branch_matches_beit3(tmp_path, filename):
    vendor = randomize_(RefMUSK(img_size=64), seed=8)
    state = vendor.state_dict()
    path = save(state if filename.endswith("safetensors") else {"model": state}, tmp_path / filename)

    backbone = build_backbone("musk", weights=path, tiny=True, overrides={"img_size": 64})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        states, _ = vendor.beit3(x)
    assert_features_match(backbone, x, [1, 3], [to_grid(states[i], 1, (4, 4)) for i in (1, 3)])


@pytest.mark.parametrize("name", ["musk", "phikon", "midnight12k"])
def test_final_norm_and_class_token_match_vendor_output(name):
    """``build_backbone`` prunes the final norm, so load the converted dict strictly into a full build."""
    x = torch.randn(1, 3, 64 if name != "midnight12k" else 56, 64 if name != "midnight12k" else 56)
    if name == "musk":
        vendor = randomize_(RefMUSK(img_size=64), seed=10)
        with torch.no_grad():
            expected = vendor.beit3(x)[1]
    else:
        vendor = _phikon_vendor() if name == "phikon" else _dinov2_vendor(14, 56, True)
        with torch.no_grad():
            expected = vendor(pixel_values=x).last_hidden_state
    vit = create_vit(get_spec(name), tiny=True, overrides={"img_size": x.shape[-1]})
    vit.load_state_dict(CONVERTERS[get_spec(name).checkpoint_layout](vendor.state_dict(), vit))
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(x), expected, atol=ATOL, rtol=ATOL)


def test_musk_published_parameter_count_is_the_vision_branch():
    """Spec count = torchscale's image-path tensors minus the mask token and the 2 unused positions."""
    spec = get_spec("musk")
    with torch.device("meta"):
        vendor = RefMUSK(img_size=384, dim=1024, depth=24, heads=16, vocab=64010, max_source_positions=1024)
    vision = sum(p.numel() for k, p in vendor.state_dict().items() if BEIT3_MUSK_KEYS.rename(k) is not None)
    assert vision - 2 * 1024 == spec.num_params == count_parameters(build_backbone("musk", device="meta").vit)
    assert spec.params_exact and spec.fixed_input_size == 384 and spec.mean == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------ bad weights
@pytest.fixture
def uni_state():
    vit = _vendor_trunk("uni_v1", seed=9, img_size=32)
    return vit, {k: v.clone() for k, v in vit.state_dict().items()}


def test_wrong_checkpoint_names_file_architecture_and_keys(tmp_path, uni_state):
    _, state = uni_state
    state = {k: v for k, v in state.items() if not k.startswith("blocks.3.")}
    state["decoder.extra.weight"] = torch.zeros(3)
    path = save(state, tmp_path / "other_model.pth")
    with pytest.raises(WeightsError) as err:
        build_backbone("uni_v1", weights=path, tiny=True, overrides={"img_size": 32})
    message = str(err.value)
    for fragment in ("other_model.pth", "vit_large_patch16_224", "blocks.3.", "decoder.extra.weight", "strict"):
        assert fragment in message


def test_wrong_shapes_are_reported(tmp_path):
    vendor = _dinov2_vendor(14, 56, False)  # patch 14 DINOv2 given to the patch 16 Phikon
    path = save(vendor.state_dict(), tmp_path / "dinov2.safetensors")
    with pytest.raises(WeightsError, match=r"dinov2\.safetensors.*vit_base_patch16_224.*patch_embed\.proj\.weight"):
        build_backbone("phikon", weights=path, tiny=True, overrides={"img_size": 56})


def test_incomplete_qkv_is_not_guessed(tmp_path):
    vendor = _phikon_vendor()
    state = {k: v for k, v in vendor.state_dict().items() if "layers.0.attention.k_proj" not in k}
    path = save(state, tmp_path / "no_key.safetensors")
    with pytest.raises(WeightsError, match=r"blocks\.0\.attn\.qkv\.weight.*blocks\.0\.attn\.qkv#0\.weight"):
        build_backbone("phikon", weights=path, tiny=True, overrides={"img_size": 64})


def test_non_strict_load_keeps_matching_part_and_warns(tmp_path, uni_state, caplog):
    _, state = uni_state
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.3.")}
    path = save(partial, tmp_path / "partial.safetensors")
    random_init = build_backbone("uni_v1", tiny=True, overrides={"img_size": 32}).vit.state_dict()
    with caplog.at_level(logging.WARNING):
        backbone = build_backbone("uni_v1", weights=path, tiny=True, strict=False, overrides={"img_size": 32})
    loaded = backbone.vit.state_dict()
    torch.testing.assert_close(loaded["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(loaded["blocks.3.attn.qkv.weight"], random_init["blocks.3.attn.qkv.weight"])
    assert "Non-strict load" in caplog.text and "blocks.3." in caplog.text


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_file_gives_clear_error(tmp_path, uni_state, filename):
    _, state = uni_state
    path = tmp_path / filename
    save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(WeightsError, match=rf"Could not read weights file '.*{filename}'"):
        build_backbone("uni_v1", weights=str(path), tiny=True, overrides={"img_size": 32})


def test_hub_weights_go_through_hf_hub_download(tmp_path, monkeypatch):
    import huggingface_hub

    vendor = _phikon_vendor()
    vendor.save_pretrained(tmp_path)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if filename != "model.safetensors":
            raise FileNotFoundError(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    backbone = build_backbone("phikon", weights="hf-hub:", tiny=True, overrides={"img_size": 64})
    build_backbone("phikon", weights="hf-hub:lab/phikon-fork", tiny=True, overrides={"img_size": 64})
    assert calls == [("owkin/phikon", "model.safetensors"), ("lab/phikon-fork", "model.safetensors")]
    x = torch.randn(1, 3, 64, 64)
    assert_features_match(backbone, x, [3], [to_grid(hf_hidden_states(vendor, x)[4], 1, (4, 4))])

    def offline(repo_id, filename, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError, match=r"hub repo 'owkin/phikon'.*offline"):
        build_backbone("phikon", weights="hf-hub:", tiny=True, overrides={"img_size": 64})
