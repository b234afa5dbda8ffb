"""Losses honour ignore_index, survive all-ignored masks, and apply class weights on any device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.training.config import LossSection
from pfmseg_engine.training.losses import LOSSES, build_loss

NAMES = ["cross_entropy", "dice", "iou", "ohem", "ce_dice"]


def batch(seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 8, 8, generator=g)
    target = torch.randint(0, classes, (2, 8, 8), generator=g)
    return logits, target


def make(name: str, **kw) -> torch.nn.Module:
    return build_loss(LossSection(type=name, ohem_min_kept=16, **kw), ignore_index=255)


def test_all_required_losses_are_registered():
    assert set(NAMES) <= set(LOSSES)


@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_mask_gives_zero_loss_and_finite_zero_gradients(name):
    logits, _ = batch()
    logits.requires_grad_(True)
    target = torch.full((2, 8, 8), 255)
    loss = make(name)(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_ignored_pixels_do_not_affect_loss_or_gradient(name):
    logits, target = batch()
    ignored = torch.zeros_like(target, dtype=torch.bool)
    ignored[:, :3] = True
    target = target.masked_fill(ignored, 255)
    a = logits.clone().requires_grad_(True)
    loss_a = make(name)(a, target)
    loss_a.backward()
    b = logits.clone()
    b[:, :, :3] = torch.randn_like(b[:, :, :3]) * 10  # garbage where ignored
    b.requires_grad_(True)
    loss_b = make(name)(b, target)
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert a.grad[:, :, :3].abs().max() == 0
    assert torch.allclose(a.grad[:, :, 3:], b.grad[:, :, 3:], atol=1e-6)


def test_cross_entropy_matches_torch_on_valid_pixels():
    logits, target = batch()
    target[0, 0] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(make("cross_entropy")(logits, target), expected)


def test_dice_is_zero_for_perfect_prediction_and_positive_otherwise():
    _, target = batch()
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert make("dice")(perfect, target).item() < 1e-4
    assert make("iou")(perfect, target).item() < 1e-4
    assert make("dice")(-perfect, target).item() > 0.9


def test_dice_hand_computed_two_pixels():
    # two valid pixels, classes 0 and 1; prediction puts p on the right class
    p = 0.8
    logit = math.log(p / (1 - p))
    logits = torch.tensor([[[[logit, -logit, 5.0]], [[0.0, 0.0, 0.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    dice = make("dice", dice_smooth=0.0)(logits, target)
    # per class: intersection p, cardinality p + (1-p) + 1 = 2 -> dice = p; loss = 1 - p
    assert dice.item() == pytest.approx(1 - p, abs=1e-5)


def test_ohem_keeps_hard_pixels_only():
    logits = torch.tensor([[[[10.0, 0.0, -10.0]], [[-10.0, 0.0, 10.0]]]])  # easy, hard, very hard
    target = torch.zeros(1, 1, 3, dtype=torch.long)
    loss = build_loss(LossSection(type="ohem", ohem_thresh=0.7, ohem_min_kept=1), 255)(logits, target)
    nll = F.cross_entropy(logits, target, reduction="none")[0, 0]
    assert loss.item() == pytest.approx(nll[1:].mean().item(), rel=1e-5)


def test_ce_dice_is_weighted_sum():
    logits, target = batch()
    combo = make("ce_dice", ce_weight=0.3, dice_weight=2.0)(logits, target)
    expected = 0.3 * make("cross_entropy")(logits, target) + 2.0 * make("dice")(logits, target)
    assert torch.allclose(combo, expected)


@pytest.mark.parametrize("name", NAMES)
def test_class_weights_change_the_loss(name):
    logits, target = batch()
    plain = make(name)(logits, target)
    weighted = make(name, class_weights=[1.0, 5.0, 0.1])(logits, target)
    assert torch.isfinite(weighted) and not torch.allclose(plain, weighted)


def test_class_weights_are_a_buffer_that_follows_the_module():
    moved = make("ce_dice", class_weights=[1.0, 2.0, 3.0]).to("meta")
    assert moved.class_weights.device.type == "meta"
    assert moved.ce.class_weights.device.type == "meta" and moved.dice.class_weights.device.type == "meta"
    logits, target = batch()
    assert torch.isfinite(make("ce_dice", class_weights=[1.0, 2.0, 3.0]).double()(logits, target))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_class_weights_work_on_cuda_even_if_the_loss_stayed_on_cpu(name):
    logits, target = batch()
    cpu_value = make(name, class_weights=[1.0, 2.0, 3.0])(logits, target)
    gpu_value = make(name, class_weights=[1.0, 2.0, 3.0])(logits.cuda(), target.cuda())
    assert gpu_value.device.type == "cuda"
    assert torch.allclose(cpu_value, gpu_value.cpu(), atol=1e-5)


def test_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="Did you mean 'dice'"):
        build_loss(LossSection(type="dise"))


@pytest.mark.parametrize("name", ["dice", "iou", "ce_dice"])
def test_classes_absent_from_targets_and_predictions_add_no_penalty(name):
    # two classes present and predicted perfectly; class 2 never in the targets and never the argmax,
    # but its softmax mass (about 0.7 % per pixel) is far larger than ``smooth``
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, :, 8:] = 1
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10.0
    two = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 10.0
    skip = make(name)(logits, target)
    assert skip.item() == pytest.approx(make(name)(two, target).item(), abs=1e-3)  # as if class 2 did not exist
    included = make(name, absent_classes="include")(logits, target)
    assert included.item() > skip.item() + 0.25  # the seed's formula: about 1/3 of a loss for nothing
    # a class absent from the targets but predicted somewhere (a false positive) is still penalised
    fp = logits.clone()
    fp[0, 2, :4, :4] = 30.0
    assert make(name)(fp, target).item() > skip.item() + 0.1


def test_absent_classes_setting_is_checked():
    with pytest.raises(ConfigError, match="absent_classes"):
        make("dice", absent_classes="drop")


def test_image_pooling_scores_each_image_like_the_seed():
    logits, target = batch(seed=3)
    per_image = [make("dice", absent_classes="include", dice_smooth=1e-5)(logits[i:i + 1], target[i:i + 1])
                 for i in range(2)]
    pooled = make("dice", absent_classes="include", overlap_pooling="image")(logits, target)
    assert pooled.item() == pytest.approx(sum(p.item() for p in per_image) / 2, abs=1e-6)
    assert not math.isclose(pooled.item(), make("dice", absent_classes="include")(logits, target).item())
    # an image without any valid pixel does not count
    target[1] = 255
    alone = make("dice", absent_classes="include", overlap_pooling="image")(logits[:1], target[:1])
    assert make("dice", absent_classes="include", overlap_pooling="image")(logits, target).item() == \
        pytest.approx(alone.item(), abs=1e-6)
