"""``lora_impl: seed`` computes what the seed framework's LoRA and DoRA layers compute.

The reference is a transcription of the seed's modules (PFM-DenseBench ``models/lora.py``
``LoRALinear`` and ``models/dora.py`` ``DoraLinear``), below. Layer for layer, ours must start from
the same numbers (same RNG stream: the seed draws the linear layer, then A; timm's ``nn.Linear``
draws the same weight and bias, then our wrapper draws A), compute the same outputs, and end in the
same weights after optimiser steps on fixed data.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from pfmseg_engine import CheckpointError, ModelConfig, TuningConfig, build_model, load_checkpoint, save_checkpoint
from pfmseg_engine.backbones import SPECS, build_backbone, get_spec
from pfmseg_engine.checkpoint import load_into, read_checkpoint
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.training import config_from_dict
from pfmseg_engine.tuning.seed_lora import SeedDoRALinear, SeedLoRALinear


# --- the reference: the seed's modules, transcribed -----------------------------------------------------
class RefLoRALinear(nn.Module):
    """models/lora.py LoRALinear (lingxitong/PFM_Segmentation)."""

    def __init__(self, in_features, out_features, bias=True, r=4, lora_alpha=1.0):
        super().__init__()
        self.r = r
        self.in_features = in_features
        self.out_features = out_features
        self.lora_alpha = lora_alpha
        self.weight = nn.Parameter(torch.empty((out_features, in_features)))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.lora_a = nn.Parameter(torch.zeros(in_features, r), requires_grad=True)
        self.lora_b = nn.Parameter(torch.zeros(r, out_features), requires_grad=True)
        self.scale = lora_alpha
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x):
        ori_output = F.linear(x, self.weight, self.bias)
        lora_output = ((x @ self.lora_a) @ self.lora_b) * self.scale
        return ori_output + lora_output


class RefDoraLinear(nn.Module):
    """models/dora.py DoraLinear (lingxitong/PFM_Segmentation)."""

    def __init__(self, in_features, out_features, bias=True, r=4, lora_alpha=1.0):
        super().__init__()
        self.r = r
        self.in_features = in_features
        self.out_features = out_features
        self.lora_alpha = lora_alpha
        self.weight = nn.Parameter(torch.empty((out_features, in_features)), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_a = nn.Parameter(torch.zeros(in_features, r), requires_grad=True)
        self.lora_b = nn.Parameter(torch.zeros(r, out_features), requires_grad=True)
        self.scale = lora_alpha
        self.m = nn.Parameter(torch.ones(1), requires_grad=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        nn.init.ones_(self.m)

    def forward(self, x):
        lora_update = self.lora_a @ self.lora_b
        lora_update = lora_update * self.scale
        weight_norm = self.weight.norm(p="fro")
        updated_weight = self.weight + lora_update.t()
        updated_norm = updated_weight.norm(p="fro")
        direction = updated_weight / updated_norm
        dora_weight = self.m * direction * weight_norm
        return F.linear(x, dora_weight, self.bias)


# --- helpers ---------------------------------------------------------------------------------------------
PAIRS = {"lora": (RefLoRALinear, SeedLoRALinear), "dora": (RefDoraLinear, SeedDoRALinear)}
# (in, out, bias): a qkv-like layer with bias and a proj-like one without; rank 16 and alpha 1.0 are the
# seed's config.yaml values
SHAPES = [(96, 288, True), (64, 64, False)]
RANK, ALPHA = 16, 1.0


def pair(kind: str, in_features: int, out_features: int, bias: bool, seed: int = 7):
    """The seed's layer and ours over the same frozen weights, each built from the same RNG state."""
    ref_cls, our_cls = PAIRS[kind]
    torch.manual_seed(seed)
    ref = ref_cls(in_features, out_features, bias=bias, r=RANK, lora_alpha=ALPHA)
    ref.weight.requires_grad_(False)  # equip_model_with_lora/dora freeze everything but the adapter
    if ref.bias is not None:
        ref.bias.requires_grad_(False)
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    return ref, our_cls(base, RANK, ALPHA)


def adapter_params(layer: nn.Module) -> list[nn.Parameter]:
    """A, B (and the magnitude) in one order for both implementations."""
    magnitude = [layer.m] if hasattr(layer, "m") else [layer.lora_magnitude] if hasattr(layer, "lora_magnitude") else []
    return [layer.lora_a, layer.lora_b, *magnitude]


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer applies: its output at the identity basis, without the bias."""
    eye = torch.eye(layer.in_features)
    bias = layer.bias if isinstance(layer, RefLoRALinear | RefDoraLinear) else layer.base_layer.bias
    out = layer(eye)
    return (out - bias if bias is not None else out).t()


def make(backbone: str, strategy: str, **tuning) -> nn.Module:
    size = 4 * get_spec(backbone).patch_size
    config = ModelConfig(backbone=backbone, tiny=True, num_classes=3, input_size=size,
                         tuning=TuningConfig(strategy=strategy, **tuning))
    return build_model(config)


# --- the layers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize(("in_features", "out_features", "bias"), SHAPES)
def test_initialisation_equals_the_seed(kind, in_features, out_features, bias):
    ref, ours = pair(kind, in_features, out_features, bias)
    assert torch.equal(ours.base_layer.weight, ref.weight)
    if bias:
        assert torch.equal(ours.base_layer.bias, ref.bias)
    for theirs, mine in zip(adapter_params(ref), adapter_params(ours), strict=True):
        assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    assert ours.lora_a.shape == (in_features, RANK) and not ours.lora_b.any()
    # kaiming_uniform_(a=sqrt(5)) over (in_features, rank): fan-in is the rank, so A ~ U(+-1/sqrt(rank))
    bound = 1 / math.sqrt(RANK)
    assert ours.lora_a.abs().max() <= bound and ours.lora_a.abs().max() > 0.95 * bound
    if kind == "dora":
        assert ours.lora_magnitude.shape == (1,) and ours.lora_magnitude.item() == 1.0  # one scalar per layer


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize(("in_features", "out_features", "bias"), SHAPES)
def test_forward_equals_the_seed(kind, in_features, out_features, bias):
    ref, ours = pair(kind, in_features, out_features, bias)
    with torch.no_grad():  # a nonzero update, so the low-rank path and the scale count
        b = torch.randn(RANK, out_features) * 0.1
        ref.lora_b.copy_(b)
        ours.lora_b.copy_(b)
        if kind == "dora":
            ref.m.fill_(1.3)
            ours.lora_magnitude.fill_(1.3)
    x = torch.randn(2, 5, in_features)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
        base = ours.base_layer(x)
    assert torch.equal(got, expected)  # the same operations in the same order: bit for bit
    assert not torch.allclose(got, base, atol=1e-3)  # the update does change the output


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize(("in_features", "out_features", "bias"), SHAPES)
def test_adam_steps_give_the_seeds_weights(kind, in_features, out_features, bias):
    ref, ours = pair(kind, in_features, out_features, bias)
    start = effective_weight(ours).detach()
    torch.manual_seed(1)
    x = torch.randn(4, 7, in_features)
    target = torch.randn(4, 7, out_features)
    optimisers = [torch.optim.Adam(adapter_params(layer), lr=1e-3) for layer in (ref, ours)]
    for _ in range(10):
        for layer, optimiser in zip((ref, ours), optimisers, strict=True):
            optimiser.zero_grad()
            F.mse_loss(layer(x), target).backward()
            optimiser.step()
    for theirs, mine in zip(adapter_params(ref), adapter_params(ours), strict=True):
        assert torch.equal(mine, theirs)
    with torch.no_grad():
        expected, got = effective_weight(ref), effective_weight(ours)
    assert torch.equal(got, expected)
    # 10 steps at lr 1e-3 move B by about 1e-2; through A ~ +-1/sqrt(16) and scale 1 that is a visible change
    assert (got - start).abs().max() > 1e-3


def test_seed_scale_is_alpha_itself_where_peft_divides_by_the_rank():
    seed = make("kaiko-vits16", "lora", lora_impl="seed", rank=4, alpha=0.5).encoder.backbone.vit.blocks[0].attn.qkv
    peft = make("kaiko-vits16", "lora", rank=4, alpha=0.5).encoder.backbone.vit.blocks[0].attn.qkv
    assert isinstance(seed, SeedLoRALinear) and seed.scale == 0.5 and seed.lora_a.shape == (seed.in_features, 4)
    assert peft.scaling["default"] == pytest.approx(0.125)


# --- in the model ----------------------------------------------------------------------------------------
FAMILIES = [spec.name for spec in {s.family: s for s in SPECS}.values()]


@pytest.mark.parametrize("strategy", ["lora", "dora"])
@pytest.mark.parametrize("backbone", FAMILIES)
def test_seed_layers_wrap_the_same_targets_and_train_only_the_adapters(backbone, strategy):
    lora_mlp = backbone == "kaiko-vitl14"  # the MLP option once, on one family
    base = build_backbone(backbone, tiny=True).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = base.features(x)
    model = make(backbone, strategy, lora_impl="seed", lora_mlp=lora_mlp).eval()
    with torch.no_grad():
        got = model.encoder.backbone.features(x)
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5)  # B = 0 (and m = 1): the adapted model starts as the base
    layer = SeedDoRALinear if strategy == "dora" else SeedLoRALinear
    wrapped = {n for n, m in model.encoder.backbone.vit.named_modules() if isinstance(m, layer)}
    kinds = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert kinds == ({"qkv", "proj", "fc1", "fc2"} if lora_mlp else {"qkv", "proj"})
    assert all(re.fullmatch(r"blocks\.\d+\.(attn|mlp)\.\w+", n) for n in wrapped)
    assert len(wrapped) == model.encoder.backbone.depth * len(kinds)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    leaves = {"lora_a", "lora_b", "lora_magnitude"} if strategy == "dora" else {"lora_a", "lora_b"}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == leaves
    assert len(trainable) == len(wrapped) * len(leaves)
    assert trainable == {n for n, _ in model.named_parameters() if model.is_trainable_name(n)} - {
        n for n, _ in model.named_parameters() if n.startswith("head.")}


def test_backbone_weights_stay_the_loaded_ones():
    """The wrapper holds the backbone's own linear layer: its weight is the one built (and loaded)."""
    torch.manual_seed(3)
    base = build_backbone("kaiko-vits16", tiny=True)
    weight = base.vit.blocks[1].attn.qkv.weight
    torch.manual_seed(3)
    model = make("kaiko-vits16", "dora", lora_impl="seed")
    wrapped = model.encoder.backbone.vit.blocks[1].attn.qkv
    assert torch.equal(wrapped.base_layer.weight, weight) and not wrapped.base_layer.weight.requires_grad


# --- configuration ---------------------------------------------------------------------------------------
def cfg(data=None, options=None):
    data = dict(data or {})
    data.setdefault("dataset", {"num_classes": 2})
    return config_from_dict(data, check_dataset=False, options=options)


def test_densebench_selects_the_seed_layers_with_the_seeds_alpha():
    tuning = cfg({"protocol": "densebench"}).model_config().tuning
    assert tuning.lora_impl == "seed" and tuning.alpha == 1.0 and tuning.rank == 16 and tuning.dropout == 0.0


def test_the_seeds_own_config_under_densebench_gives_the_seeds_update():
    # configs/config.yaml: finetune_mode {type, rank: 16, alpha: 1.0}, with type lora
    config = cfg({"protocol": "densebench",
                  "model": {"pfm_name": "kaiko-vits16", "tiny": True,
                            "finetune_mode": {"type": "lora", "rank": 16, "alpha": 1.0}},
                  "training": {"augmentation": {"RandomResizedCropSize": 64}}})
    model = build_model(config.model_config())
    qkv = model.encoder.backbone.vit.blocks[0].attn.qkv
    assert isinstance(qkv, SeedLoRALinear) and qkv.scale == 1.0 and qkv.lora_a.shape == (qkv.in_features, 16)


def test_default_is_peft():
    assert TuningConfig().lora_impl == "peft"
    tuning = cfg({"model": {"finetune_mode": {"type": "lora"}}}).model_config().tuning
    assert tuning.lora_impl == "peft" and tuning.alpha == 16.0
    qkv = make("kaiko-vits16", "dora").encoder.backbone.vit.blocks[0].attn.qkv
    assert not isinstance(qkv, SeedLoRALinear) and "default" in qkv.lora_magnitude_vector  # peft's layer


def test_unknown_impl_and_seed_dropout_are_clear_errors():
    with pytest.raises(ConfigError, match=r"model\.finetune_mode\.lora_impl.*Did you mean 'seed'"):
        cfg(options=["model.finetune_mode.lora_impl=sead"])
    with pytest.raises(ConfigError, match="no LoRA dropout"):
        TuningConfig(strategy="lora", lora_impl="seed", dropout=0.1)
    TuningConfig(strategy="lora", lora_impl="peft", dropout=0.1)  # peft has dropout


# --- checkpoints -----------------------------------------------------------------------------------------
def trained(strategy: str, lora_impl: str) -> nn.Module:
    model = make("kaiko-vits16", strategy, lora_impl=lora_impl, rank=4, alpha=1.0)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        optimiser.zero_grad()
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        optimiser.step()
    return model.eval()


@pytest.mark.parametrize("strategy", ["lora", "dora"])
def test_seed_checkpoint_round_trip(tmp_path, strategy):
    model = trained(strategy, "seed")
    path = save_checkpoint(tmp_path / "m.pt", model)
    state = read_checkpoint(path)["state"]
    adapters = {k.rsplit(".", 1)[-1] for k in state if not k.startswith("head.")}
    assert adapters == ({"lora_a", "lora_b", "lora_magnitude"} if strategy == "dora" else {"lora_a", "lora_b"})
    loaded = load_checkpoint(path)
    assert loaded.config.tuning.lora_impl == "seed"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_refuses_a_model_of_the_other_impl(tmp_path):
    payload = read_checkpoint(save_checkpoint(tmp_path / "m.pt", trained("lora", "seed")))
    with pytest.raises(CheckpointError, match="lora_impl='seed'"):
        load_into(make("kaiko-vits16", "lora", rank=4, alpha=1.0), payload)


def test_checkpoint_without_the_key_rebuilds_as_peft(tmp_path):
    """Checkpoints written before the key existed were peft's: they rebuild as peft and load."""
    model = trained("lora", "peft")
    path = save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["tuning"]["lora_impl"]
    torch.save(payload, path)
    loaded = load_checkpoint(path)
    assert loaded.config.tuning.lora_impl == "peft"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
