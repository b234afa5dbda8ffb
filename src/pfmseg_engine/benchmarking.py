"""Model-only throughput, the yardstick every pipeline benchmark divides by.

Pipelines (training steps, whole-slide inference) are judged as a ratio to what the bare model
achieves on the same inputs, device and thread count, because absolute timings on shared machines
are noisy while ratios measured in one run are not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .devices import resolve_device
from .model import SegmentationModel

__all__ = ["Throughput", "measure_throughput", "resolve_device"]  # resolve_device: re-exported


@dataclass(frozen=True)
class Throughput:
    images_per_second: float
    seconds_per_batch: float
    batch_size: int
    input_size: int
    device: str
    train: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    model: SegmentationModel,
    input_size: int,
    batch_size: int = 4,
    steps: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    train: bool = False,
) -> Throughput:
    """Time ``steps`` forward passes (or forward+backward+step with ``train``) on random input."""
    device = torch.device(device)
    model = model.to(device)
    x = torch.rand(batch_size, 3, input_size, input_size, device=device)
    target = torch.randint(0, model.num_classes, (batch_size, input_size, input_size), device=device)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1e-4) if train else None
    model.train(train)

    def step() -> None:
        if optimizer is None:
            with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
                model(x)
            return
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    per_batch = (time.perf_counter() - start) / steps
    return Throughput(batch_size / per_batch, per_batch, batch_size, input_size, str(device), train)
