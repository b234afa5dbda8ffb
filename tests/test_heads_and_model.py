"""Decoders and the SegmentationModel contract."""

from __future__ import annotations

import pytest
import torch

from pfmseg_engine import ModelConfig, TuningConfig, build_model
from pfmseg_engine.backbones import SPECS
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.heads import LightDecoder, MultiLevelDecoder, build_head


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dim", sorted({s.embed_dim for s in SPECS}))
def test_light_decoder_is_about_2_6_million_parameters_whatever_the_encoder(dim):
    head = LightDecoder([dim] * 4, [], num_classes=2)
    expected = dim * 256 + 256 + 4 * (256 * 256 * 9 + 256) + 256 * 2 + 2
    assert n_params(head) == expected
    assert 2.4e6 < n_params(head) < 2.8e6


def test_light_decoder_structure_follows_the_protocol():
    head = LightDecoder([768], [], num_classes=5)
    assert head.project.kernel_size == (1, 1) and head.project.out_channels == 256
    assert len(head.up) == 4
    assert all(stage[0].kernel_size == (3, 3) for stage in head.up)
    out = head([torch.randn(1, 768, 7, 9)], [], out_size=(98, 126))
    assert out.shape == (1, 5, 98, 126)


@pytest.mark.parametrize("name", ["multilevel", "light"])
@pytest.mark.parametrize("grid,out", [((4, 4), (64, 64)), ((5, 7), (70, 98)), ((8, 8), (64, 64))])
def test_heads_return_logits_at_the_requested_size(name, grid, out):
    head = build_head(name, [32, 32, 32, 32], [], num_classes=4)
    logits = head([torch.randn(2, 32, *grid) for _ in range(4)], [], out_size=out)
    assert logits.shape == (2, 4, *out)


def test_multilevel_decoder_uses_every_level_and_skip():
    head = MultiLevelDecoder([16, 16], [4, 8, 12], num_classes=3)
    grids = [torch.randn(1, 16, 4, 4, requires_grad=True) for _ in range(2)]
    skips = [torch.randn(1, c, 64 // f, 64 // f, requires_grad=True) for c, f in ((4, 2), (8, 4), (12, 8))]
    head(grids, skips, out_size=(64, 64)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in grids + skips)


def test_unknown_head_is_a_clear_error():
    with pytest.raises(ConfigError, match="Did you mean 'light'"):
        build_head("lite", [8], [], 2)


@pytest.mark.parametrize("backbone", ["kaiko-vits16", "uni_v2", "lunit_vits8"])
@pytest.mark.parametrize("size", [(64, 64), (45, 83), (1, 1)])
def test_model_returns_logits_at_input_size_for_any_size(backbone, size):
    patch = next(s for s in SPECS if s.name == backbone).patch_size
    config = ModelConfig(backbone=backbone, tiny=True, num_classes=3, input_size=patch * 4,
                         tuning=TuningConfig(strategy="cnn_adapter"))
    model = build_model(config).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_model_normalises_with_the_backbone_mean_and_std():
    config = ModelConfig(backbone="hoptimus_0", tiny=True, num_classes=2, input_size=56)
    model = build_model(config).eval()
    seen = {}
    model.encoder.backbone.vit.patch_embed.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x = torch.rand(1, 3, 56, 56)
    with torch.no_grad():
        model(x)
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    assert torch.allclose(seen["x"], (x - mean) / std, atol=1e-6)


def test_padding_does_not_leak_into_the_crop():
    """The crop of a padded input is the prediction of the image, not of its padding."""
    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=64)
    model = build_model(config).eval()
    x = torch.rand(1, 3, 50, 50)
    with torch.no_grad():
        a = model(x)
        padded = torch.zeros(1, 3, 64, 64)
        padded[..., :50, :50] = (x - model.mean) / model.std
        padded[..., 50:, :] = 0
        padded[..., :, 50:] = 0
        features = model.encoder(padded)
        b = model.head(features.grids, features.skips, out_size=(64, 64))[..., :50, :50]
    assert torch.allclose(a, b, atol=1e-5)


def test_model_config_validation():
    with pytest.raises(ConfigError, match="nearest valid sizes: 224 or 238"):
        ModelConfig(backbone="uni_v2", num_classes=2, input_size=230)
    with pytest.raises(ConfigError, match="one name per class"):
        ModelConfig(backbone="uni_v1", num_classes=2, class_names=("a",))
    with pytest.raises(ConfigError, match="set input_size to 384"):
        ModelConfig(backbone="musk", num_classes=2, input_size=224)
    config = ModelConfig(backbone="UNI", num_classes=2)
    assert config.backbone == "uni_v1" and config.class_names == ("class_0", "class_1")
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_input_must_be_rgb_batch():
    model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.rand(3, 64, 64))


def test_unknown_config_keys_name_the_closest_valid_key():
    config = ModelConfig(backbone="uni_v1", num_classes=2).to_dict()
    with pytest.raises(ConfigError, match=r"Unknown model setting 'num_clases'. Did you mean 'num_classes'"):
        ModelConfig.from_dict({**config, "num_clases": 2})
    with pytest.raises(ConfigError, match=r"Unknown tuning setting 'rnak'. Did you mean 'rank'"):
        TuningConfig.from_dict({"rnak": 4})


def test_default_head_is_the_fast_one_and_costs_at_most_15_percent_of_the_backbone():
    """FLOPs (a count, not a timing): the default head at 224 px against a ViT-S/16 forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from pfmseg_engine.backbones import build_backbone
    from pfmseg_engine.heads import build_head
    from pfmseg_engine.model import ModelConfig

    assert ModelConfig(backbone="kaiko-vits16", num_classes=2).head == "fast"
    backbone = build_backbone("kaiko-vits16").eval()
    x = torch.rand(1, 3, 224, 224)

    def flops(function) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            function()
        return counter.get_total_flops()

    grids = backbone.features(x)
    share = {}
    for name in ("fast", "multilevel"):
        head = build_head(name, [backbone.embed_dim] * len(grids), [], 3, patch_size=16).eval()
        share[name] = flops(lambda head=head: head(grids, [], (224, 224))) / flops(lambda: backbone.features(x))
    assert share["fast"] <= 0.15 < share["multilevel"] + 0.15 and share["fast"] < share["multilevel"] / 3


@pytest.mark.parametrize("size", [(64, 64), (70, 98), (33, 47)])
def test_fast_head_gives_logits_at_the_input_size_with_and_without_skips(size):
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    for strategy in ("frozen", "cnn_adapter_small"):
        model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=3, head="fast",
                                        tuning=TuningConfig(strategy=strategy), input_size=64))
        logits = model(torch.rand(2, 3, *size))
        assert logits.shape == (2, 3, *size)
        logits.sum().backward()
        assert all(p.grad is not None for p in model.trainable_parameters())
