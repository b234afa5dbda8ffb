"""Segmentation losses that honour ``ignore_index`` everywhere.

Every loss takes logits (N, C, H, W) and targets (N, H, W) whose values are class indices or
``ignore_index``. Ignored pixels contribute neither to the value nor to the gradient. A batch with
no valid pixel at all (a mask full of 255s, common with sparse annotations) gives a loss of exactly
0 with zero, finite gradients instead of the NaN of ``F.cross_entropy`` or the crash of the seed's
Dice/IoU (which one-hot encoded 255). Losses are computed in float32 even under autocast.

Class weights are a buffer, so ``loss.to(device)`` moves them, and they are also moved to the
logits' device at call time, so a loss built on the CPU works on any device.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class SegmentationLoss(nn.Module):
    """Base class: ignore handling and optional per-class weights."""

    class_weights: torch.Tensor | None

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.ignore_index = int(ignore_index)
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weight, persistent=False)

    def weights_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        if self.class_weights.numel() != logits.shape[1]:
            raise ConfigError(
                f"{self.class_weights.numel()} class weights given for a model with {logits.shape[1]} classes."
            )
        return self.class_weights.to(device=logits.device, dtype=torch.float32)

    def split(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float32 logits, valid mask (N,H,W), targets with ignored pixels set to class 0)."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"Logits {tuple(logits.shape)} and targets {tuple(target.shape)} do not match.")
        valid = target != self.ignore_index
        return logits.float(), valid, torch.where(valid, target, torch.zeros_like(target)).long()

    @staticmethod
    def zero(logits: torch.Tensor) -> torch.Tensor:
        """A zero that is still connected to the graph (so backward() works and gives zero gradients)."""
        return logits.float().sum() * 0.0


class CrossEntropyLoss(SegmentationLoss):
    """Pixel-wise cross-entropy averaged over valid pixels (class-weighted mean when weighted)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, valid, _ = self.split(logits, target)
        if not valid.any():
            return self.zero(logits)
        return F.cross_entropy(logits, target.long(), weight=self.weights_for(logits), ignore_index=self.ignore_index)


ABSENT_CLASSES = ("skip", "include")  # what Dice/IoU do with classes absent from a batch (see _OverlapLoss)
OVERLAP_POOLING = ("batch", "image")  # Dice/IoU per class over the whole batch, or per image then averaged


class _OverlapLoss(SegmentationLoss, abc.ABC):
    """Soft Dice / IoU from softmax probabilities, per class.

    Ignored pixels are removed from both the probabilities and the one-hot targets. ``pooling="batch"``
    (the default) sums intersections and cardinalities over the whole batch, one score per class;
    ``"image"`` scores every image separately and averages over images and classes, as the seed's
    Dice/IoU did (images without a valid pixel are left out). What follows says "batch" for the pool.

    **Classes absent from a batch.** A class that no valid target pixel has and that the model does
    not predict (argmax) anywhere in the batch is *not* free under the textbook formula: its soft
    probabilities still sum to something much larger than ``smooth`` (0.01 over a 224x224 crop is
    500), so its score ``smooth / (sum p + smooth)`` is about 0 and it adds a loss of about 1 with
    almost no gradient, which only dilutes the classes that are there. ``absent_classes="skip"``
    (the default) leaves such classes out of the mean; ``"include"`` keeps them, as the seed
    framework's Dice/IoU did. A class absent from the targets but predicted somewhere always counts
    (a false positive). Class weights are renormalised over the classes that count.
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None, smooth: float = 1e-5,
                 absent_classes: str = "skip", pooling: str = "batch"):
        super().__init__(ignore_index, class_weights)
        self.smooth = float(smooth)
        if absent_classes not in ABSENT_CLASSES:
            raise ConfigError(f"absent_classes must be one of {', '.join(ABSENT_CLASSES)}, got {absent_classes!r}.")
        if pooling not in OVERLAP_POOLING:
            raise ConfigError(f"pooling must be one of {', '.join(OVERLAP_POOLING)}, got {pooling!r}.")
        self.absent_classes, self.pooling = absent_classes, pooling

    @abc.abstractmethod
    def overlap(self, intersection: torch.Tensor, cardinality: torch.Tensor) -> torch.Tensor:
        """Per-class overlap score in [0, 1] (1 = perfect) from soft intersection and cardinality."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, valid, safe = self.split(logits, target)
        if not valid.any():
            return self.zero(logits)
        num_classes = logits.shape[1]
        mask = valid.unsqueeze(1).float()
        probs = logits.softmax(dim=1) * mask
        onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * mask
        dims = (0, 2, 3) if self.pooling == "batch" else (2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        per_class = 1.0 - self.overlap(intersection, cardinality)  # (C) or (N, C)
        weights = self.weights_for(logits)
        weights = torch.ones_like(per_class) if weights is None else weights.expand_as(per_class)
        if self.pooling == "image":  # images without a valid pixel have no score
            weights = weights * valid.flatten(1).any(1, keepdim=True)
        if self.absent_classes == "skip":
            with torch.no_grad():  # targets or argmax predictions of each class among the valid pixels
                predicted = F.one_hot(logits.argmax(1), num_classes).permute(0, 3, 1, 2).float() * mask
                present = (onehot.sum(dims) + predicted.sum(dims)) > 0
            weights = weights * present
        return (per_class * weights).sum() / weights.sum().clamp_min(1e-12)


class DiceLoss(_OverlapLoss):
    """1 - soft Dice: 1 - (2|P∩T| + s) / (|P| + |T| + s), averaged over classes."""

    def overlap(self, intersection: torch.Tensor, cardinality: torch.Tensor) -> torch.Tensor:
        return (2.0 * intersection + self.smooth) / (cardinality + self.smooth)


class IoULoss(_OverlapLoss):
    """1 - soft Jaccard: 1 - (|P∩T| + s) / (|P∪T| + s), averaged over classes."""

    def overlap(self, intersection: torch.Tensor, cardinality: torch.Tensor) -> torch.Tensor:
        return (intersection + self.smooth) / (cardinality - intersection + self.smooth)


class OHEMLoss(SegmentationLoss):
    """Online hard example mining on cross-entropy.

    Hard pixels are valid pixels whose predicted probability of the true class is below ``thresh``;
    if fewer than ``min_kept`` are hard, the ``min_kept`` highest-loss valid pixels are kept instead
    (all valid pixels when there are fewer). The loss is the (class-weighted) mean over kept pixels.
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 thresh: float = 0.7, min_kept: int = 100000):
        super().__init__(ignore_index, class_weights)
        if not 0.0 < thresh <= 1.0:
            raise ConfigError(f"ohem_thresh must be in (0, 1], got {thresh}.")
        self.thresh, self.min_kept = float(thresh), int(min_kept)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, valid, safe = self.split(logits, target)
        if not valid.any():
            return self.zero(logits)
        log_probs = logits.log_softmax(dim=1)
        nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
        weights = self.weights_for(logits)
        pixel_weight = weights[safe] if weights is not None else torch.ones_like(nll)
        nll, pixel_weight = nll[valid], pixel_weight[valid]
        with torch.no_grad():
            hard = nll.detach() > -torch.log(torch.tensor(self.thresh, device=nll.device))
            if int(hard.sum()) < min(self.min_kept, nll.numel()):
                keep = torch.topk(nll.detach(), min(self.min_kept, nll.numel())).indices
                hard = torch.zeros_like(hard)
                hard[keep] = True
        return (nll[hard] * pixel_weight[hard]).sum() / pixel_weight[hard].sum().clamp_min(1e-12)


class CEDiceLoss(SegmentationLoss):
    """``ce_weight`` * cross-entropy + ``dice_weight`` * Dice (the usual combination for small structures)."""

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5,
                 absent_classes: str = "skip", pooling: str = "batch"):
        super().__init__(ignore_index, class_weights)
        self.ce = CrossEntropyLoss(ignore_index, class_weights)
        self.dice = DiceLoss(ignore_index, class_weights, smooth, absent_classes, pooling)
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce_weight * self.ce(logits, target) + self.dice_weight * self.dice(logits, target)


def _ohem(section: Any, ignore_index: int) -> nn.Module:
    if section.ohem_base_loss.lower() not in ("ce", "cross_entropy"):
        raise ConfigError(f"training.loss.ohem_base_loss '{section.ohem_base_loss}' is not supported; use 'ce'.")
    return OHEMLoss(ignore_index, section.class_weights, section.ohem_thresh, section.ohem_min_kept)


# name -> factory(loss section, ignore_index); aliases are extra names for the same factory.
LOSSES: dict[str, Callable[[Any, int], nn.Module]] = {
    "cross_entropy": lambda s, ig: CrossEntropyLoss(ig, s.class_weights),
    "ce": lambda s, ig: CrossEntropyLoss(ig, s.class_weights),
    "dice": lambda s, ig: DiceLoss(ig, s.class_weights, s.dice_smooth, s.absent_classes, s.overlap_pooling),
    "iou": lambda s, ig: IoULoss(ig, s.class_weights, s.iou_smooth, s.absent_classes, s.overlap_pooling),
    "ohem": _ohem,
    "ce_dice": lambda s, ig: CEDiceLoss(ig, s.class_weights, s.ce_weight, s.dice_weight, s.dice_smooth,
                                        s.absent_classes, s.overlap_pooling),
}


def build_loss(section: Any, ignore_index: int = 255) -> nn.Module:
    """The loss named by ``section.type`` (a :class:`~pfmseg_engine.training.config.LossSection`)."""
    from ..errors import closest

    name = section.type.lower()
    if name not in LOSSES:
        raise ConfigError(f"Unknown loss '{section.type}'.{closest(name, LOSSES)} Choose one of: {', '.join(LOSSES)}.")
    return LOSSES[name](section, ignore_index)
