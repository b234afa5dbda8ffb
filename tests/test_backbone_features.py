"""The common feature API over small variants of every backbone family."""

from __future__ import annotations

import warnings

import pytest
import torch

from pfmseg_engine.backbones import SPECS, RandomWeightsWarning, build_backbone
from pfmseg_engine.backbones.backbone import default_feature_indices
from pfmseg_engine.errors import ConfigError

ONE_PER_FAMILY = list({spec.family: spec for spec in SPECS}.values())


@pytest.mark.parametrize("spec", ONE_PER_FAMILY, ids=lambda s: s.name)
@pytest.mark.parametrize("size", [(64, 64), (50, 71)])
def test_features_are_token_grids_for_any_size(spec, size):
    backbone = build_backbone(spec.name, tiny=True).eval()
    h, w = size
    with torch.no_grad():
        grids = backbone.features(torch.randn(2, 3, h, w))
    p = spec.patch_size
    assert len(grids) == 4
    for grid in grids:
        assert grid.shape == (2, backbone.embed_dim, -(-h // p), -(-w // p))
        assert torch.isfinite(grid).all()


def test_prefix_tokens_are_dropped_and_grid_matches_block_output():
    backbone = build_backbone("virchow_v2", tiny=True).eval()  # 1 cls + 4 register tokens
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        grid = backbone.features(x, indices=[backbone.depth - 1])[0]
        tokens = backbone.vit.forward_features(x)  # includes final norm
        last_block = backbone.vit.forward_intermediates(x, indices=[backbone.depth - 1], output_fmt="NLC",
                                                        intermediates_only=True, norm=False)[0]
    assert tokens.shape[1] == 5 + 16
    assert torch.allclose(grid.flatten(2).transpose(1, 2), last_block, atol=1e-6)


def test_default_feature_indices_are_evenly_spaced_and_end_at_last_block():
    assert default_feature_indices(24) == (5, 11, 17, 23)
    assert default_feature_indices(12) == (2, 5, 8, 11)
    assert default_feature_indices(40) == (9, 19, 29, 39)
    assert default_feature_indices(2) == (0, 1)


def test_custom_and_invalid_feature_indices():
    backbone = build_backbone("kaiko-vits16", tiny=True, feature_indices=[1, -1])
    assert backbone.feature_indices == (1, 3)
    assert len(backbone.features(torch.randn(1, 3, 32, 32))) == 2
    with pytest.raises(ConfigError, match="outside the 4 blocks"):
        build_backbone("kaiko-vits16", tiny=True, feature_indices=[7])


def test_random_initialisation_warns_loudly_and_is_reproducible():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = build_backbone("uni_v1", tiny=True)
    assert any(issubclass(w.category, RandomWeightsWarning) and "meaningless" in str(w.message) for w in caught)
    b = build_backbone("uni_v1", tiny=True)
    assert torch.equal(a.vit.patch_embed.proj.weight, b.vit.patch_embed.proj.weight)
    c = build_backbone("PathOrchestra", tiny=True)
    assert not torch.equal(a.vit.patch_embed.proj.weight, c.vit.patch_embed.proj.weight)
