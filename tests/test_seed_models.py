"""The seed framework's models: ResNetV2 CNN adapter, cup head, Transformer adapter, light decoder.

Parameter counts are exact, and the adapter and the cup head are checked against a plain-torch
re-statement of their equations (written here from the seed/TransUNet definitions, reading the
modules' parameters by name) on fixed random weights, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pfmseg_engine import STRATEGIES, ModelConfig, TuningConfig, build_model, load_checkpoint, save_checkpoint
from pfmseg_engine.backbones import build_backbone, create_vit, get_spec
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.heads import CupDecoder, LightDecoder
from pfmseg_engine.tuning.adapters import ResNetV2Adapter

EMBED_DIMS = (384, 768, 1024, 1280, 1536)
CUP_PARAMS = {  # 2 classes: (without skips, with the width-1 ResNetV2 skips)
    384: (4_106_594, 5_618_018),
    768: (5_876_066, 7_387_490),
    1024: (7_055_714, 8_567_138),
    1280: (8_235_362, 9_746_786),
    1536: (9_415_010, 10_926_434),
}
RESNET_SKIPS = [64, 256, 512]  # [1/2, 1/4, 1/8], the encoder's order


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fixed random weights everywhere, including norm affines and BatchNorm running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "1.weight")):
                values = 1.0 + 0.3 * values
            elif tensor.ndim == 4:  # conv filters: unit gain, so activations stay of order one
                values = values / math.sqrt(tensor[0].numel())
            else:
                values = 0.3 * values
            tensor.copy_(values)
    return module


def make(backbone: str, strategy: str, head: str = "cup", **tuning) -> nn.Module:
    size = 4 * get_spec(backbone).patch_size
    config = ModelConfig(backbone=backbone, tiny=True, num_classes=3, input_size=size, head=head,
                         tuning=TuningConfig(strategy=strategy, **tuning))
    return build_model(config)


# ----------------------------------------------------------------------------- plain-torch re-statements
def std_conv(x, weight, stride=1, padding=0, eps=1e-5):
    """Weight-standardised convolution: each filter to zero mean, unit (biased) variance."""
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return F.conv2d(x, (weight - mean) / torch.sqrt(var + eps), None, stride, padding)


def ref_unit(x, p, name, stride, project):
    """One TransUNet ResNetV2 unit: conv-GN-ReLU x2, conv-GN, plus (projected) shortcut, ReLU."""
    def gn(t, key, groups=32, eps=1e-6):
        return F.group_norm(t, groups, p[f"{name}.{key}.weight"], p[f"{name}.{key}.bias"], eps)

    shortcut = x
    if project:
        shortcut = std_conv(x, p[f"{name}.downsample.conv.weight"], stride)
        cout = shortcut.shape[1]
        shortcut = gn(shortcut, "downsample.norm", groups=cout, eps=1e-5)  # GroupNorm(cout, cout)
    y = F.relu(gn(std_conv(x, p[f"{name}.conv1.weight"]), "norm1"))
    y = F.relu(gn(std_conv(y, p[f"{name}.conv2.weight"], stride, 1), "norm2"))
    y = gn(std_conv(y, p[f"{name}.conv3.weight"]), "norm3")
    return F.relu(y + shortcut)


def ref_adapter(x, p, units=(3, 4)):
    half = std_conv(x, p["root.conv.weight"], 2, 3)
    half = F.relu(F.group_norm(half, 32, p["root.norm.weight"], p["root.norm.bias"], 1e-6))
    y = F.max_pool2d(F.pad(half, (1, 1, 1, 1)), 3, 2)
    for i in range(units[0]):
        y = ref_unit(y, p, f"block1.{i}", 1, project=i == 0)
    quarter = y
    for i in range(units[1]):
        y = ref_unit(y, p, f"block2.{i}", 2 if i == 0 else 1, project=i == 0)
    return [half, quarter, y]


def ref_conv_bn_relu(x, p, name):
    x = F.conv2d(x, p[f"{name}.0.weight"], None, 1, 1)
    x = F.batch_norm(x, p[f"{name}.1.running_mean"], p[f"{name}.1.running_var"], p[f"{name}.1.weight"],
                     p[f"{name}.1.bias"], training=False, eps=1e-5)
    return F.relu(x)


def ref_cup(grid, skips, p, patch):
    """The seed's DecoderCup: seed scales (2, 2, 2, patch/8) by nn.UpsamplingBilinear2d (align_corners=True),
    skips [1/8, 1/4, 1/2] concatenated after upsampling, 3x3 segmentation conv with bias."""
    x = ref_conv_bn_relu(grid, p, "conv_more")
    coarse_first = list(reversed(skips))
    for i, scale in enumerate((2, 2, 2, 2 if coarse_first else patch / 8)):
        if scale != 1:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
        if i < len(coarse_first):
            x = torch.cat([x, coarse_first[i]], dim=1)
        x = ref_conv_bn_relu(ref_conv_bn_relu(x, p, f"blocks.{i}.conv1"), p, f"blocks.{i}.conv2")
    return F.conv2d(x, p["segmentation_head.weight"], p["segmentation_head.bias"], 1, 1)


# ------------------------------------------------------------------------------------ parameter counts
def test_resnetv2_adapter_has_the_seed_parameter_count():
    assert n_params(ResNetV2Adapter()) == 1_444_928
    model = make("kaiko-vits16", "cnn_adapter", head="multilevel")
    assert n_params(model.encoder.cnn_adapter) == 1_444_928
    # the seed's third block is accepted for compatibility and never built
    assert n_params(ResNetV2Adapter(block_units=(3, 4, 1))) == 1_444_928
    assert not any(name.startswith("block3") for name, _ in ResNetV2Adapter().named_parameters())


@pytest.mark.parametrize("dim", EMBED_DIMS)
def test_cup_head_has_the_seed_parameter_count(dim):
    without, with_skips = CUP_PARAMS[dim]
    assert n_params(CupDecoder([dim], [], num_classes=2)) == without
    assert n_params(CupDecoder([dim] * 4, RESNET_SKIPS, num_classes=2)) == with_skips


def test_cup_skip_widths_follow_the_adapter_width_factor():
    adapter = ResNetV2Adapter(width_factor=0.5)
    assert adapter.out_channels == (32, 128, 256)
    model = make("kaiko-vits16", "cnn_adapter", adapter_width_factor=0.5)
    assert [b.skip_channels for b in model.head.blocks] == [256, 128, 32, 0]
    assert model.head.blocks[0].conv1[0].in_channels == 512 + 256


# ------------------------------------------------------------------------------------ equations
@pytest.mark.parametrize("size", [64, 70, 112])
def test_resnetv2_adapter_matches_the_restated_equations(size):
    adapter = randomize_(ResNetV2Adapter(), seed=1).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        got = adapter(x)
        expected = ref_adapter(x, dict(adapter.state_dict()))
    assert [tuple(t.shape[-2:]) for t in got] == [(math.ceil(size / f),) * 2 for f in (2, 4, 8)]
    assert [t.shape[1] for t in got] == [64, 256, 512]
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-5, rtol=0), (g - e).abs().max()


@pytest.mark.parametrize("patch,grid", [(16, 4), (14, 4), (8, 6), (14, (3, 5))])
def test_cup_head_matches_the_restated_equations(patch, grid):
    grid = (grid, grid) if isinstance(grid, int) else grid
    head = randomize_(CupDecoder([24, 24], [], num_classes=3, patch_size=patch), seed=2).double().eval()
    grids = [torch.randn(2, 24, *grid, dtype=torch.float64) for _ in range(2)]
    out_size = (grid[0] * patch, grid[1] * patch)
    with torch.no_grad():
        got = head(grids, [], out_size=out_size)
        expected = ref_cup(grids[-1], [], dict(head.state_dict()), patch)
    assert got.shape == (2, 3, *out_size)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_cup_head_with_resnetv2_skips_matches_the_restated_equations():
    head = randomize_(CupDecoder([24], [8, 16, 32], num_classes=2, patch_size=16), seed=3).double().eval()
    grid = torch.randn(1, 24, 4, 5, dtype=torch.float64)
    skips = [torch.randn(1, c, 64 // f, 80 // f, dtype=torch.float64) for c, f in ((8, 2), (16, 4), (32, 8))]
    with torch.no_grad():
        got = head([grid], skips, out_size=(64, 80))
        expected = ref_cup(grid, skips, dict(head.state_dict()), 16)
    assert got.shape == (1, 2, 64, 80)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_cup_model_decodes_the_final_normalised_tokens_and_the_adapter_skips():
    """End to end: adapter on the normalised image, cup on vit.norm(last block) without prefix tokens."""
    model = make("hoptimus_0", "cnn_adapter")
    randomize_(model.head, seed=4)  # random BatchNorm statistics, so eval-mode BN is really exercised
    model = model.double().eval()
    x = torch.rand(1, 3, 50, 60, dtype=torch.float64)
    vit = model.encoder.backbone.vit
    with torch.no_grad():
        logits = model(x)
        normalised = F.pad((x - model.mean) / model.std, (0, 10, 0, 6))  # to the patch-14 multiple 56x70
        tokens = vit.forward_features(normalised)  # blocks + final norm, as the seed reads the PFM
        grid = tokens[:, vit.num_prefix_tokens:].transpose(1, 2).reshape(1, -1, 4, 5)
        skips = ref_adapter(normalised, dict(model.encoder.cnn_adapter.state_dict()))
        p = dict(model.head.state_dict())
        # patch 14 with skips: each block goes straight to its skip's size, the last to the input size
        y = ref_conv_bn_relu(grid, p, "conv_more")
        for i, target in enumerate([s.shape[-2:] for s in reversed(skips)] + [(56, 70)]):
            y = F.interpolate(y, size=tuple(target), mode="bilinear", align_corners=True)
            if i < 3:
                y = torch.cat([y, skips[2 - i]], dim=1)
            y = ref_conv_bn_relu(ref_conv_bn_relu(y, p, f"blocks.{i}.conv1"), p, f"blocks.{i}.conv2")
        expected = F.conv2d(y, p["segmentation_head.weight"], p["segmentation_head.bias"], 1, 1)[..., :50, :60]
    assert torch.allclose(logits, expected, atol=1e-6, rtol=0), (logits - expected).abs().max()


# ------------------------------------------------------------------------------------ transformer adapter
class ShiftPrefixTokens(nn.Module):
    """Wraps the last block: perturbs the prefix tokens of its output, patch tokens untouched."""

    def __init__(self, block: nn.Module, prefix: int, dim: int):
        super().__init__()
        self.block, self.prefix = block, prefix
        # not a constant: the final LayerNorm would remove a constant shift of a token
        self.delta = 3.0 * torch.randn(prefix, dim, generator=torch.Generator().manual_seed(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x).clone()
        y[:, : self.prefix] += self.delta
        return y


@pytest.mark.parametrize("backbone", ["kaiko-vits16", "hoptimus_0"])  # class token only; class + 4 registers
def test_transformer_adapter_sees_the_class_and_register_tokens(backbone):
    model = make(backbone, "transformer_adapter", head="multilevel", adapter_init_values=None).eval()
    encoder = model.encoder
    x = torch.randn(1, 3, 56, 56) if get_spec(backbone).patch_size == 14 else torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before_grids = encoder.backbone.features(x)
        before = encoder(x).grids[-1]
        vit = encoder.backbone.vit
        vit.blocks[-1] = ShiftPrefixTokens(vit.blocks[-1], vit.num_prefix_tokens, vit.embed_dim)
        after_grids = encoder.backbone.features(x)
        after = encoder(x).grids[-1]
    # the patch tokens of the frozen encoder did not change (an adapter fed only those could not react) ...
    for a, b in zip(before_grids, after_grids, strict=True):
        assert torch.equal(a, b)
    # ... but the adapter's output did: it attends over the prefix tokens too
    change = (before - after).abs().max()
    assert change > 1e-3


def test_transformer_adapter_reads_the_normalised_encoder_output():
    model = make("kaiko-vits16", "transformer_adapter", head="multilevel").eval()
    seen = {}
    model.encoder.transformer_adapter.register_forward_pre_hook(lambda m, a: seen.setdefault("tokens", a[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        expected = model.encoder.backbone.vit.forward_features((x - model.mean) / model.std)
    assert seen["tokens"].shape == (1, 1 + 16, 48)
    assert torch.allclose(seen["tokens"], expected, atol=1e-6)


# ------------------------------------------------------------------------------------ light decoder
@pytest.mark.parametrize("backbone,ups", [("lunit_vits8", 3), ("uni_v2", 4), ("kaiko-vits16", 4)])
def test_light_decoder_upsamples_ceil_log2_patch_times(backbone, ups):
    model = make(backbone, "frozen", head="light").eval()
    assert len(model.head.up) == ups
    patch = get_spec(backbone).patch_size
    assert len(model.head.up) == math.ceil(math.log2(patch))
    for size in [(4 * patch, 4 * patch), (45, 83)]:
        with torch.no_grad():
            assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize("patch,blocks", [(8, 3), (14, 4), (16, 4)])
@pytest.mark.parametrize("dim", EMBED_DIMS)
def test_light_decoder_parameter_count(dim, patch, blocks):
    head = LightDecoder([dim], [], num_classes=2, patch_size=patch)
    assert n_params(head) == dim * 256 + 256 + blocks * (256 * 256 * 9 + 256) + 256 * 2 + 2
    if patch != 8:
        assert 2.45e6 < n_params(head) < 2.76e6  # 2.46 M (width 384) to 2.75 M (width 1536)


# ------------------------------------------------------------------------------------ refused pairings
@pytest.mark.parametrize("strategy", ["cnn_adapter", "cnn_adapter_small"])
def test_light_head_with_a_cnn_adapter_is_refused(strategy):
    with pytest.raises(ConfigError, match=r"Head 'light' ignores CNN-adapter skips.*multilevel, cup"):
        ModelConfig(backbone="kaiko-vits16", num_classes=2, head="light", tuning=TuningConfig(strategy=strategy))
    config = ModelConfig(backbone="kaiko-vits16", num_classes=2, head="light").to_dict()
    with pytest.raises(ConfigError, match="never train"):
        ModelConfig.from_dict({**config, "tuning": {"strategy": strategy}})
    # every other pairing is allowed
    ModelConfig(backbone="kaiko-vits16", num_classes=2, head="light",
                tuning=TuningConfig(strategy="transformer_adapter"))
    ModelConfig(backbone="kaiko-vits16", num_classes=2, head="cup", tuning=TuningConfig(strategy=strategy))


def test_adapter_settings_are_validated():
    with pytest.raises(ConfigError, match="adapter_width_factor"):
        TuningConfig(strategy="cnn_adapter", adapter_width_factor=0.3)
    with pytest.raises(ConfigError, match="adapter_width_factor"):
        TuningConfig(strategy="cnn_adapter", adapter_width_factor=0)
    with pytest.raises(ConfigError, match="adapter_block_units"):
        TuningConfig(strategy="cnn_adapter", adapter_block_units=(3,))
    with pytest.raises(ConfigError, match="adapter_block_units"):
        TuningConfig(strategy="cnn_adapter", adapter_block_units=(3, 0, 9))
    cfg = TuningConfig(strategy="cnn_adapter", adapter_width_factor=1.5, adapter_block_units=[2, 3])
    assert cfg.adapter_block_units == (2, 3)
    assert TuningConfig.from_dict(cfg.to_dict()) == cfg
    model = make("kaiko-vits16", "cnn_adapter", adapter_block_units=(1, 2, 9))
    assert (len(model.encoder.cnn_adapter.block1), len(model.encoder.cnn_adapter.block2)) == (1, 2)


# ------------------------------------------------------------------------------------ every strategy + cup
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_with_the_cup_head(strategy):
    model = make("kaiko-vits16", strategy)  # build_model checks the declared trainable set
    assert isinstance(model.head, CupDecoder)
    assert model.encoder.backbone.keeps_final_norm
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ("encoder.backbone.vit.norm.weight" in trainable) == (strategy == "full")
    x = torch.rand(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3, 64, 64)
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    for name, param in model.named_parameters():
        if name.startswith("encoder.backbone.") and not param.requires_grad:
            assert param.grad is None, name
    if STRATEGIES[strategy].adds_skips:
        for name, param in model.encoder.cnn_adapter.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_other_heads_keep_dropping_the_final_norm():
    """Checkpoints of the multilevel/light heads keep their keys (no final norm in a full fine-tune)."""
    for head in ("multilevel", "light"):
        model = make("kaiko-vits16", "full", head=head)
        assert not model.encoder.backbone.keeps_final_norm
        assert isinstance(model.encoder.backbone.vit.norm, nn.Identity)


def test_cup_with_cnn_adapter_checkpoint_round_trip(tmp_path):
    model = make("kaiko-vits16", "cnn_adapter")
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        optimizer.step()
    model.eval()
    state = model.trainable_state_dict()
    assert any(k.startswith("encoder.cnn_adapter.block2.") for k in state)
    assert any(k.endswith("running_var") for k in state)  # BatchNorm statistics of the cup travel too
    path = save_checkpoint(tmp_path / "cup.pt", model)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)


# ------------------------------------------------------------------------------------ position tables
def test_checkpoint_position_grid_is_resampled_once(tmp_path):
    """A timm checkpoint saved at a 4x4 grid keeps it; timm resamples it once per forward, as the vendor."""
    torch.manual_seed(3)
    vendor = create_vit(get_spec("kaiko-vits16"), tiny=True, overrides={"img_size": 64}).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in vendor.state_dict().items()}, str(path))
    backbone = build_backbone("kaiko-vits16", weights=path, tiny=True).eval()  # spec build size: 224 (14x14)
    assert tuple(backbone.vit.patch_embed.grid_size) == (4, 4)
    assert torch.equal(backbone.vit.pos_embed, vendor.pos_embed)
    for size in (64, 128, 96):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            expected = vendor.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
            got = backbone.features(x, indices=[3])[0]
        assert torch.allclose(got, expected, atol=1e-5), size
    # an explicit build size is kept (the table is then resampled to it at load time)
    fixed = build_backbone("kaiko-vits16", weights=path, tiny=True, overrides={"img_size": 224})
    assert tuple(fixed.vit.patch_embed.grid_size) == (14, 14)
