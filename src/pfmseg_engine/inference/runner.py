"""Running any segmentation model over batches of windows, with the details every caller needs.

Inference accepts any ``nn.Module`` whose call maps float RGB ``(N, 3, H, W)`` in [0, 1] to logits
``(N, C, H, W)`` and that has ``patch_size`` and ``num_classes`` attributes; class names and training
resolution are read from ``model.config`` when it exists. Keeping this in one place lets tests drive
the whole pipeline with an identity-like stand-in model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
import torch

from ..errors import ConfigError
from .modelinfo import ModelInfo


def model_info(model) -> ModelInfo:
    """Read classes, patch size, training window and resolution from a model (config when present)."""
    return ModelInfo.from_model(model)


def resolve_device(device: str | torch.device | None, model=None) -> torch.device:
    """The device to run on: the model's own when none is given (a model already placed stays put),
    else the shared :func:`pfmseg_engine.devices.resolve_device` ("auto", "cuda:1"...: one meaning and
    one clear error everywhere)."""
    if device is None:
        try:
            return next(model.parameters()).device if model is not None else torch.device("cpu")
        except (StopIteration, AttributeError):
            return torch.device("cpu")
    from ..devices import resolve_device as resolve_named

    return resolve_named(device)


class ModelRunner:
    """Batches windows through a model in eval mode, with autocast on CUDA; returns float32 logits."""

    def __init__(self, model, device=None, batch_size: int = 4, autocast: bool = True):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        self.info = model_info(model)
        self.device = resolve_device(device, model)
        self.model = model.to(self.device) if hasattr(model, "to") else model
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.batch_size = batch_size
        self.autocast = autocast and self.device.type == "cuda"
        # bfloat16 keeps float32's range (large ViTs overflow in float16); float16 on older GPUs
        self.autocast_dtype = (torch.bfloat16 if self.autocast and torch.cuda.is_bf16_supported()
                               else torch.float16)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def patch_size(self) -> int:
        return self.info.patch_size

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(N, h, w, 3) uint8 (or float in [0, 1]) windows on the device -> (N, C, h, w) float32 logits there.

        Normalisation (``float / 255``) happens on the device, on the windows as they arrived (channels
        last, contiguous: the fast layout for the conversion); the model sees the same values and
        strides as a ``permute`` of them.
        """
        tensor = windows.float().div_(255.0) if windows.dtype == torch.uint8 else windows.float()
        tensor = tensor.permute(0, 3, 1, 2)
        context = (torch.autocast(device_type="cuda", dtype=self.autocast_dtype) if self.autocast
                   else nullcontext())
        with torch.inference_mode(), context:
            logits = self.model(tensor)
        if isinstance(logits, dict):  # seed-style models return {"out": logits}
            logits = logits["out"]
        if logits.shape[1] != self.num_classes or logits.shape[-2:] != tensor.shape[-2:]:
            raise ConfigError(
                f"Model returned logits of shape {tuple(logits.shape)} for input {tuple(tensor.shape)}; "
                f"expected (N, {self.num_classes}, H, W) at the input size."
            )
        return logits.float()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) uint8 or float [0, 1] windows -> (N, C, h, w) float32 logits (host arrays)."""
        tensor = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        return self.forward(tensor).cpu().numpy()

    def predict_windows(self, windows: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Logits for each window of an iterable of same-shape (h, w, 3) windows, in order."""
        batch: list[np.ndarray] = []
        for window in windows:
            batch.append(window)
            if len(batch) == self.batch_size:
                yield from self(np.stack(batch))
                batch = []
        if batch:
            yield from self(np.stack(batch))
