"""Tuning strategies: what trains, what stays fixed, and that adapters start as the base model."""

from __future__ import annotations

import re

import pytest
import torch

from pfmseg_engine import STRATEGIES, ModelConfig, TuningConfig, build_model
from pfmseg_engine.backbones import SPECS, build_backbone, get_spec
from pfmseg_engine.errors import ConfigError

FAMILIES = [spec.name for spec in {s.family: s for s in SPECS}.values()]


def make(backbone: str, strategy: str, **tuning) -> torch.nn.Module:
    size = 4 * get_spec(backbone).patch_size
    config = ModelConfig(backbone=backbone, tiny=True, num_classes=3, input_size=size,
                         tuning=TuningConfig(strategy=strategy, **tuning))
    return build_model(config)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("backbone", FAMILIES)
def test_trainable_set_is_exactly_what_the_strategy_declares(backbone, strategy):
    model = make(backbone, strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    declared = {n for n, _ in model.named_parameters() if model.is_trainable_name(n)}
    assert trainable == declared
    assert any(n.startswith("head.") for n in trainable)
    backbone_trainable = {n for n in trainable if n.startswith("encoder.backbone.")}
    expectations = {
        "frozen": lambda names: not names,
        "full": lambda names: len(names) == sum(1 for n, _ in model.named_parameters()
                                                  if n.startswith("encoder.backbone.")),
        "lora": lambda names: names and all(re.search(r"\.lora_[AB]\.", n) for n in names),
        "dora": lambda names: any("lora_magnitude_vector" in n for n in names),
        "cnn_adapter": lambda names: not names,
        "cnn_adapter_small": lambda names: not names,
        "transformer_adapter": lambda names: not names,
    }
    assert expectations[strategy](backbone_trainable)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_one_optimizer_step_changes_only_trainable_parameters(strategy):
    model = make("kaiko-vits16", strategy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    x = torch.rand(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    # LoRA B starts at zero, so A gets no gradient on step one; two steps move both (Adam also moves
    # parameters whose gradients are tiny, like the LayerScale-damped adapter norms)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if param.requires_grad:
            assert changed, f"{name} should have trained"
        else:
            assert not changed, f"{name} is frozen but changed"


@pytest.mark.parametrize("strategy", ["frozen", "cnn_adapter", "transformer_adapter"])
def test_frozen_backbone_output_is_unchanged_by_training(strategy):
    model = make("kaiko-vits16", strategy)
    x = torch.rand(1, 3, 64, 64)
    backbone = model.encoder.backbone
    with torch.no_grad():
        before = [g.clone() for g in backbone.features(x)]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        after = backbone.features(x)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["lora", "dora"])
@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("lora_mlp", [False, True])
def test_lora_and_dora_start_equal_to_the_base_model(backbone, strategy, lora_mlp):
    base = build_backbone(backbone, tiny=True).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = base.features(x)
    model = make(backbone, strategy, lora_mlp=lora_mlp).eval()
    with torch.no_grad():
        got = model.encoder.backbone.features(x)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5)
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    kinds = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert kinds == ({"qkv", "proj", "fc1", "fc2"} if lora_mlp else {"qkv", "proj"})
    assert not any("patch_embed" in n for n in wrapped)
    assert len(wrapped) == model.encoder.backbone.depth * len(kinds)


def test_lora_rank_and_alpha_are_honoured():
    model = make("kaiko-vits16", "lora", rank=4, alpha=8)
    qkv = model.encoder.backbone.vit.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape[0] == 4
    assert qkv.scaling["default"] == pytest.approx(2.0)


def test_cnn_adapter_skips_reach_the_head_at_half_quarter_eighth():
    model = make("kaiko-vits16", "cnn_adapter_small", adapter_channels=(8, 16, 24))
    out = model.encoder(torch.rand(1, 3, 64, 64))
    assert [s.shape[-1] for s in out.skips] == [32, 16, 8]
    assert [s.shape[1] for s in out.skips] == [8, 16, 24]
    # every adapter stage feeds the head: all of them receive gradient
    model(torch.rand(1, 3, 64, 64)).sum().backward()
    for name, param in model.encoder.cnn_adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_transformer_adapter_depth_is_configurable():
    model = make("kaiko-vits16", "transformer_adapter", adapter_depth=3)
    assert len(model.encoder.transformer_adapter.blocks) == 3


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        TuningConfig(strategy="loar")


def test_transformer_adapter_block_settings_are_honoured():
    model = make("kaiko-vits16", "transformer_adapter", adapter_depth=3, adapter_mlp_ratio=2.0,
                 adapter_drop_path_rate=0.2, adapter_init_values=None, adapter_qk_norm=True,
                 adapter_attn_drop_rate=0.1)
    blocks = model.encoder.transformer_adapter.blocks
    dim = model.encoder.backbone.embed_dim
    assert blocks[0].mlp.fc1.out_features == 2 * dim
    assert [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in blocks] == \
        pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(blocks[0].ls1, torch.nn.Identity)
    assert not isinstance(blocks[0].attn.q_norm, torch.nn.Identity)
    assert blocks[0].attn.attn_drop.p == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="adapter_drop_path_rate"):
        TuningConfig(strategy="transformer_adapter", adapter_drop_path_rate=1.5)
