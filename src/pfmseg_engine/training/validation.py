"""Validation and evaluation at native resolution.

The seed resized every validation image to a square before scoring, so its numbers described
distorted, downsampled masks. Here every image is predicted at its own size and scored against its
own mask: ``windowslide`` tiles the image with overlapping windows of the training input size
(Gaussian blending, :func:`pfmseg_engine.inference.window.predict_image`); ``resize`` predicts a
resized copy in one window and resizes the *probabilities* back, so metrics are still computed on
the original pixel grid.

The validation loss is the training criterion applied to ``log(probabilities)``: for every
softmax-based loss, softmax(log p) = p, so this equals the loss on the blended logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..metrics import ConfusionMeter


class ImageSource(Protocol):
    """What validation reads: whole images with their masks (``SegmentationDataset`` qualifies)."""

    def num_images(self) -> int: ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]: ...

    def name(self, index: int) -> str: ...


def predict_probabilities(model: Any, image: np.ndarray, *, window: int, mode: str = "windowslide",
                          overlap: float = 0.25, batch_size: int = 4, device: Any = None) -> np.ndarray:
    """(C, H, W) float32 class probabilities of an (H, W, 3) image at its native size."""
    from ..inference.window import predict_image

    if mode == "windowslide":
        return predict_image(model, image, window=window, overlap=overlap, batch_size=batch_size, device=device)
    if mode != "resize":
        raise ConfigError(f"Unknown validation mode '{mode}'; use 'windowslide' or 'resize'.")
    height, width = image.shape[:2]
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if image.dtype == np.uint8:
        tensor /= 255.0
    small = F.interpolate(tensor, size=(window, window), mode="bilinear", align_corners=False, antialias=True)
    small_np = small[0].permute(1, 2, 0).clamp(0, 1).numpy()
    probs = predict_image(model, small_np, window=window, overlap=0.0, batch_size=1, device=device)
    full = F.interpolate(torch.from_numpy(probs)[None], size=(height, width), mode="bilinear", align_corners=False)
    return full[0].numpy()


@dataclass
class ValidationResult:
    """Loss (mean over images with a valid pixel), pooled metrics and per-image matrices."""

    loss: float
    metrics: dict[str, float]
    meter: ConfusionMeter
    names: list[str] = field(default_factory=list)


def iterate_predictions(model: Any, source: ImageSource, *, window: int, mode: str, overlap: float,
                        batch_size: int, device: Any, indices: Sequence[int] | None = None
                        ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]]:
    """Yield (index, image, mask, probabilities) for each image of ``source``."""
    for index in indices if indices is not None else range(source.num_images()):
        image, mask = source.load(index)
        probs = predict_probabilities(model, image, window=window, mode=mode, overlap=overlap,
                                      batch_size=batch_size, device=device)
        yield index, image, mask, probs


def validate(model: Any, source: ImageSource, *, num_classes: int, ignore_index: int, window: int,
             mode: str = "windowslide", overlap: float = 0.25, batch_size: int = 4, device: Any = None,
             criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             on_image: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None
             ) -> ValidationResult:
    """Predict every image at native resolution, accumulate confusion matrices and the loss.

    ``on_image(index, image, mask, prediction)`` sees each result (used for visualisations). The
    model is left in eval mode; the caller switches it back to training.
    """
    meter = ConfusionMeter(num_classes, ignore_index)
    losses, names = [], []
    for index, image, mask, probs in iterate_predictions(model, source, window=window, mode=mode,
                                                         overlap=overlap, batch_size=batch_size, device=device):
        if mask is None:
            raise ConfigError(f"Validation image '{source.name(index)}' has no mask; validation needs masks.")
        prediction = probs.argmax(0)
        meter.update(prediction, mask)
        names.append(source.name(index))
        if criterion is not None and (mask != ignore_index).any():
            log_probs = torch.from_numpy(np.log(np.clip(probs, 1e-8, 1.0)))[None]
            with torch.no_grad():
                losses.append(float(criterion(log_probs, torch.from_numpy(mask)[None].long())))
        if on_image is not None:
            on_image(index, image, mask, prediction)
    loss = float(np.mean(losses)) if losses else float("nan")
    return ValidationResult(loss=loss, metrics=meter.compute(), meter=meter, names=names)
