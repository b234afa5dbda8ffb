"""The backbone table: every seed model, exact architectures, lookups."""

from __future__ import annotations

import pytest

from pfmseg_engine.backbones import SPECS, build_backbone, count_parameters, get_spec, list_backbones
from pfmseg_engine.errors import UnknownBackboneError

SEED_NAMES = [
    "uni_v1", "uni_v2", "virchow_v1", "virchow_v2", "conch_v1", "conch_v1_5", "phikon", "phikon_v2",
    "gigapath", "hoptimus_0", "hoptimus_1", "midnight12k", "kaiko-vits8", "kaiko-vits16", "kaiko-vitb8",
    "kaiko-vitb16", "kaiko-vitl14", "lunit_vits8", "hibou_l", "hibou_b", "musk", "PathOrchestra",
    "patho3dmatrix-vision",
]


def test_every_seed_backbone_is_registered():
    assert set(SEED_NAMES) <= set(list_backbones())
    assert len(list_backbones()) == len(set(list_backbones()))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_full_size_parameter_count_matches_published_architecture(spec):
    backbone = build_backbone(spec.name, device="meta")
    count = count_parameters(backbone.vit)
    if spec.params_exact:
        assert count == spec.num_params
    else:
        assert abs(count - spec.num_params) <= 0.01 * spec.num_params
    assert backbone.embed_dim == spec.embed_dim
    assert backbone.num_prefix_tokens == spec.num_prefix_tokens
    assert backbone.vit.patch_embed.patch_size == (spec.patch_size, spec.patch_size)


def test_seed_names_and_aliases_resolve_case_insensitively():
    assert get_spec("UNI").name == "uni_v1"
    assert get_spec("Gigapath").name == "gigapath"
    assert get_spec("pathorchestra").name == "PathOrchestra"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownBackboneError, match=r"Did you mean 'uni_v2'"):
        get_spec("uni_v3")


def test_specs_are_data_with_valid_normalisation():
    for spec in SPECS:
        assert len(spec.mean) == 3 and len(spec.std) == 3
        assert all(0 < s < 1 for s in spec.std)
        assert spec.patch_size in (8, 14, 16)
