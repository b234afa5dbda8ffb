"""The live head: a normal frozen-strategy model whose head runs on stored token grids.

A live head is a :class:`~pfmseg_engine.model.SegmentationModel` with the ``frozen`` strategy, so it
saves as an ordinary checkpoint that ``infer``, ``evaluate`` and ``compare`` load like any other. To
keep a whole slide's store within a few GB it taps one block by default (the last: the backbone's
most semantic tokens), so the store holds one grid per window instead of four (the store holds exactly
the blocks the head reads, see :func:`~pfmseg_engine.live.store.consumed_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..model import ModelConfig, SegmentationModel

UNCERTAINTIES = ("entropy", "margin")
#: What a live loop may show as uncertainty: a head's own (:data:`UNCERTAINTIES`), or two heads' disagreement.
LIVE_UNCERTAINTIES = (*UNCERTAINTIES, "disagreement")


def live_model_config(backbone: str, class_names: Sequence[str], *, weights: str | None = None,
                      tiny: bool = False, blocks: Sequence[int] = (-1,), head: str = "fast", window: int = 512,
                      mpp: float | None = None) -> ModelConfig:
    """The config of a live head on ``backbone``: frozen strategy, ``blocks`` tapped (default: the last),
    ``head`` decoding them, trained on ``window`` px windows at ``mpp``."""
    from ..model import ModelConfig
    from ..tuning import TuningConfig

    names = tuple(class_names)
    if len(names) < 2:
        raise ConfigError(f"A live head needs at least two classes to tell apart, got {list(names)}.")
    return ModelConfig(backbone=backbone, num_classes=len(names), class_names=names, weights=weights, tiny=tiny,
                       feature_indices=tuple(int(b) for b in blocks), tuning=TuningConfig(strategy="frozen"),
                       head=head, input_size=int(window), mpp=mpp)


def build_live_model(config: ModelConfig, device: str | torch.device | None = None) -> SegmentationModel:
    """Build a live head from ``config`` (refused when its strategy trains the backbone)."""
    from ..model import build_model
    from .store import store_refusal

    model = build_model(config, device=device)
    refusal = store_refusal(model)
    if refusal:
        raise ConfigError(f"A live head reads stored features, but {refusal}; use the frozen strategy.")
    return model


def head_logits(model: SegmentationModel, grids: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``model``'s logits (N, classes, H, W) from stored grids: what ``model(x)`` gives for the window."""
    return model.head(list(grids), [], out_size=size)


class _Classified(Exception):
    """Carries the classifier's output out of a head's forward (a signal, not an error)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__("classifier output")
        self.logits = logits


def native_logits(head: torch.nn.Module, grids: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``head``'s logits for windows of ``size`` at the resolution its classifier works at.

    The ``fast`` head classifies at 1/4 of the window and ``light`` at its last upsampling step; both then
    only resize the logits bilinearly to ``size``. For a live preview that resize (and the per-pixel
    summaries at full resolution after it) costs more than it shows, so the forward stops at the
    classifier (``head.classify``; its output is the logits). Heads without one (``cup``) run whole.
    """
    classify = getattr(head, "classify", None)
    if not isinstance(classify, torch.nn.Module):
        return head(list(grids), [], out_size=size)

    def stop(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        raise _Classified(output)

    handle = classify.register_forward_hook(stop)
    try:
        return head(list(grids), [], out_size=size)
    except _Classified as classified:
        return classified.logits
    finally:
        handle.remove()


def uncertainty_map(probabilities: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Per-pixel uncertainty in [0, 1] of (N, C, H, W) probabilities: normalised entropy, or 1 - margin
    (the gap between the two most likely classes)."""
    if kind not in UNCERTAINTIES:
        raise ConfigError(f"Uncertainty '{kind}' is not one of {', '.join(UNCERTAINTIES)}.")
    classes = probabilities.shape[1]
    if classes < 2:
        return torch.zeros_like(probabilities[:, 0])
    if kind == "entropy":
        p = probabilities.clamp_min(1e-12)
        return (-(p * p.log()).sum(1) / math.log(classes)).clamp(0, 1)
    top = probabilities.topk(2, dim=1).values
    return 1.0 - (top[:, 0] - top[:, 1])


def labels_and_uncertainty(logits: torch.Tensor, kind: str = "entropy") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) uint8 labels (k = class k-1) and float32 uncertainty of (N, C, H, W) logits.

    The same values as ``argmax + 1`` and :func:`uncertainty_map` of the softmax, computed class plane by
    class plane: with a handful of classes, reductions over the channel axis of an NCHW tensor stride
    through memory and cost several times more than the decoder itself at a 2048 px field.
    """
    if kind not in UNCERTAINTIES:
        raise ConfigError(f"Uncertainty '{kind}' is not one of {', '.join(UNCERTAINTIES)}.")
    planes = [p.float().contiguous() for p in logits.unbind(1)]  # a channels-last plane is strided
    top = planes[0].clone()
    labels = torch.ones_like(top, dtype=torch.uint8)
    for k, plane in enumerate(planes[1:], start=2):
        better = plane > top
        torch.maximum(top, plane, out=top)
        labels.masked_fill_(better, k)
    if len(planes) < 2:
        return labels, torch.zeros_like(top)
    shifted = [plane - top for plane in planes]
    exps = [x.exp() for x in shifted]
    total = exps[0].clone()
    for e in exps[1:]:
        total += e
    if kind == "entropy":
        weighted = exps[0] * shifted[0]
        for e, x in zip(exps[1:], shifted[1:], strict=True):
            weighted.addcmul_(e, x)
        value = total.log().sub_(weighted.div_(total)).div_(math.log(len(planes)))
        return labels, value.clamp_(0, 1)
    # margin: p1 - p2 = (1 - exp(second - top)) / total, where the top class has shifted logit 0
    second = torch.full_like(top, -torch.inf)
    for k, x in enumerate(shifted, start=1):
        torch.maximum(second, x.masked_fill(labels == k, -torch.inf), out=second)
    return labels, (1.0 - (1.0 - second.exp()) / total).clamp_(0, 1)


def disagreement(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-pixel disagreement in [0, 1] of two heads' (N, C, H, W) logits: the total variation distance
    between their class probabilities (0: the same distribution; 1: no class both find possible)."""
    return ((logits.float().softmax(1) - other.float().softmax(1)).abs().sum(1) / 2).clamp(0, 1)


def descriptor(grids: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, C) unit-length mean of the last grid's tokens: where a window lies in feature space."""
    pooled = grids[-1].float().mean(dim=(-2, -1))
    return torch.nn.functional.normalize(pooled, dim=1)


__all__ = ["LIVE_UNCERTAINTIES", "UNCERTAINTIES", "build_live_model", "descriptor", "disagreement", "head_logits",
           "labels_and_uncertainty", "live_model_config", "native_logits", "uncertainty_map"]
