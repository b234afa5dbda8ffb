"""Learning-rate schedules with linear warmup, stepped once per optimizer step.

Each schedule is a pure function of the optimizer step, wrapped in ``LambdaLR``, so resuming only
needs the step count. Warmup multiplies the rate by ``(step + 1) / (warmup_steps + 1)``: the first
step already trains (the seed's warmup started at exactly 0, wasting the whole first epoch), and the
rate reaches the base value when warmup ends. Decay phases never reach 0 either: cosine and poly
evaluate their curve strictly before its end point, and ``min_lr`` sets a floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError, closest


@dataclass
class Schedule:
    """Multiplier of the base learning rate at optimizer step ``step`` (a picklable callable)."""

    kind: str
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    min_factor: float = 0.0
    step_size: int = 30
    gamma: float = 0.1
    milestones: tuple[int, ...] = (60, 80)
    T_0: int = 10
    T_mult: int = 1
    power: float = 0.9

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return DECAYS[self.kind](self, step - self.warmup_steps)

    # --- decay phases (argument: steps since warmup ended) ---
    def _progress(self, step: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        return min(step, span - 1) / span  # past the horizon the last (positive) rate is kept

    def cosine(self, step: int) -> float:
        t = self._progress(step)
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * t)) / 2

    def poly(self, step: int) -> float:
        t = self._progress(step)
        return self.min_factor + (1 - self.min_factor) * (1 - t) ** self.power

    def step_decay(self, step: int) -> float:
        return max(self.min_factor, self.gamma ** (step // max(1, self.step_size * self.steps_per_epoch)))

    def multistep(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        return max(self.min_factor, self.gamma ** sum(epoch >= m for m in self.milestones))

    def cosine_restarts(self, step: int) -> float:
        period = max(1, self.T_0 * self.steps_per_epoch)
        while step >= period:  # SGDR: cycle i lasts T_0 * T_mult**i epochs
            step -= period
            period *= max(1, self.T_mult)
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * step / period)) / 2

    def constant(self, step: int) -> float:
        return 1.0


DECAYS: dict[str, Callable[[Schedule, int], float]] = {
    "cosine": Schedule.cosine,
    "step": Schedule.step_decay,
    "multistep": Schedule.multistep,
    "cosine_restarts": Schedule.cosine_restarts,
    "poly": Schedule.poly,
    "constant": Schedule.constant,
}
# Config names (lower case) -> decay kind; ``none`` keeps the rate constant after warmup.
SCHEDULERS: dict[str, str] = {
    "cosine": "cosine",
    "step": "step",
    "multistep": "multistep",
    "cosine_restarts": "cosine_restarts",
    "cosine_with_restarts": "cosine_restarts",
    "poly": "poly",
    "constant": "constant",
    "none": "constant",
}


def make_schedule(section: Any, learning_rate: float, epochs: int, steps_per_epoch: int) -> Schedule:
    """The :class:`Schedule` a ``training.scheduler`` section describes."""
    name = str(section.type).lower()
    if name not in SCHEDULERS:
        raise ConfigError(
            f"Unknown scheduler '{section.type}'.{closest(name, SCHEDULERS)} Choose one of: {', '.join(SCHEDULERS)}."
        )
    steps_per_epoch = max(1, int(steps_per_epoch))
    horizon = section.T_max if section.T_max else epochs
    return Schedule(
        kind=SCHEDULERS[name],
        total_steps=max(1, int(horizon * steps_per_epoch)),
        warmup_steps=round(section.warmup_epochs * steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        min_factor=min(1.0, section.min_lr / learning_rate) if learning_rate > 0 else 0.0,
        step_size=section.step_size, gamma=section.gamma, milestones=tuple(section.milestones),
        T_0=section.T_0, T_mult=section.T_mult, power=section.power,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, section: Any, learning_rate: float, epochs: int,
                    steps_per_epoch: int) -> LambdaLR:
    """A ``LambdaLR`` over :func:`make_schedule`; call ``step()`` after every optimizer step."""
    return LambdaLR(optimizer, make_schedule(section, learning_rate, epochs, steps_per_epoch))
