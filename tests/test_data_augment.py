"""Joint augmentation: image and mask stay aligned, photometric ops leave masks alone, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from pfmseg_engine.data.augment import DEFAULT_TRANSFORMS, TRANSFORMS, JointAugment
from pfmseg_engine.errors import ConfigError

GEOMETRIC = ("hflip", "vflip", "rot90", "transpose", "affine", "elastic")
PHOTOMETRIC = ("color_jitter", "hed_jitter", "brightness_contrast", "gamma", "blur", "noise")


def coded_pair(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel encodes the mask's class, so alignment can be checked after warping."""
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[: size // 2, : size // 3] = 1
    mask[size // 2:, size // 2:] = 2
    image = torch.rand(3, size, size) * 0.1
    image[0] = mask.float() / 2.0
    return image, mask


def only(name: str, **params) -> JointAugment:
    return JointAugment({name: {"p": 1.0, **params}})


def test_at_least_ten_joint_transforms_including_stain_elastic_cutout():
    assert len(TRANSFORMS) >= 10
    assert {"hed_jitter", "elastic", "cutout", "rot90", "transpose", "affine"} <= set(TRANSFORMS)
    assert set(DEFAULT_TRANSFORMS) == set(TRANSFORMS)


@pytest.mark.parametrize("name", ["hflip", "vflip", "rot90", "transpose"])
def test_exact_geometric_transforms_keep_alignment(name):
    image, mask = coded_pair()
    out_image, out_mask = only(name)(image, mask, seed=3)
    assert not torch.equal(out_mask, mask)  # it did something
    assert torch.equal((out_image[0] * 2).round().long(), out_mask)


@pytest.mark.parametrize("name", ["affine", "elastic"])
def test_warping_transforms_keep_alignment_and_pad_with_ignore(name):
    image, mask = coded_pair(48)
    params = {"degrees": 30.0, "translate": 0.2} if name == "affine" else {"alpha": 80.0, "sigma": 4.0}
    out_image, out_mask = only(name, **params)(image, mask, seed=1)
    assert out_mask.dtype == torch.long
    assert set(out_mask.unique().tolist()) <= {0, 1, 2, 255}
    valid = out_mask != 255
    agree = ((out_image[0] * 2).round().long() == out_mask)[valid].float().mean()
    assert agree > 0.9  # bilinear image vs nearest mask differ only along class borders
    if name == "affine":
        assert (out_mask == 255).any()  # corners brought in from outside are not a class


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_photometric_transforms_change_image_only(name):
    image, mask = coded_pair()
    out_image, out_mask = only(name)(image, mask, seed=2)
    assert torch.equal(out_mask, mask)
    assert not torch.allclose(out_image, image)
    assert out_image.min() >= 0 and out_image.max() <= 1


def test_hed_jitter_perturbs_stains_not_geometry():
    image = torch.rand(3, 16, 16) * 0.5 + 0.25
    out, _ = only("hed_jitter", sigma=0.2, bias=0.05)(image, torch.zeros(16, 16, dtype=torch.long), seed=0)
    delta = (out - image).abs()
    assert delta.mean() > 1e-3 and delta.max() < 0.5


def test_cutout_marks_erased_pixels_ignored():
    image, mask = coded_pair()
    out_image, out_mask = only("cutout", scale=(0.1, 0.2))(image, mask, seed=0)
    erased = out_mask == 255
    assert erased.any()
    assert torch.all(out_image[:, erased] == 0)


def test_same_seed_same_result_and_global_rng_untouched():
    image, mask = coded_pair(64)
    aug = JointAugment(crop_size=32)
    state = torch.get_rng_state()
    a = aug(image, mask, seed=11)
    b = aug(image, mask, seed=11)
    c = aug(image, mask, seed=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 32, 32) and a[1].shape == (32, 32)


def test_p_zero_and_null_disable():
    image, mask = coded_pair()
    aug = JointAugment({"hflip": {"p": 0.0}})
    assert aug.names == []
    out = aug(image, mask, seed=0)
    assert torch.equal(out[0], image) and torch.equal(out[1], mask)


def test_unknown_names_and_parameters_suggest_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'hed_jitter'"):
        JointAugment({"hed_jiter": {"p": 0.5}})
    with pytest.raises(ConfigError, match="Did you mean 'sigma'"):
        JointAugment({"noise": {"sigmaa": 0.1}})
    with pytest.raises(ConfigError, match="probability"):
        JointAugment({"vflip": {"p": 2}})
