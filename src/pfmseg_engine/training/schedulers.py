"""Learning-rate schedules with linear warmup, stepped once per optimizer step.

Each schedule is a pure function of the optimizer step, wrapped in ``LambdaLR``, so resuming only
needs the step count. ``training.scheduler.style`` picks one of two rule sets:

* ``pfmseg`` (default, :class:`Schedule`): the rate changes at every optimizer step. Warmup
  multiplies it by ``(step + 1) / (warmup_steps + 1)``: the first step already trains (the seed's
  warmup started at exactly 0, wasting the whole first epoch), and the rate reaches the base value
  when warmup ends. Decay phases never reach 0 either: cosine and poly evaluate their curve strictly
  before its end point, past their horizon keep the last rate, and ``min_lr`` sets a floor.
* ``seed`` (:class:`SeedSchedule`, set by ``protocol: densebench``): the seed framework's rules
  (``utils/scheduler.py`` ``get_scheduler``), which its trainer steps once after every epoch, so the
  rate of epoch ``e`` is held for all of that epoch's steps. Its cosine warms up as ``e / W`` (epoch
  0 trains at rate 0), then follows ``cos(pi (e - W) / (T_max - W))`` without a clamp: it reaches
  ``min_lr`` at ``T_max`` and, being periodic, climbs back up when training runs longer.
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
    """Multiplier of the base learning rate at optimizer step ``step`` under ``style: pfmseg`` (picklable)."""

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


@dataclass
class SeedSchedule:
    """Multiplier of the base rate at optimizer step ``step`` under the seed framework's rules.

    The seed calls ``scheduler.step()`` once after each epoch (``utils/trainer.py``), so epoch ``e``
    trains at the rate its scheduler gives for ``last_epoch = e`` and every step of that epoch
    gets the same value. The methods transcribe ``utils/scheduler.py`` (argument: the epoch).
    """

    kind: str
    steps_per_epoch: int
    warmup_epochs: float
    T_max: float
    min_factor: float = 0.0
    step_size: int = 30
    gamma: float = 0.1
    milestones: tuple[int, ...] = (60, 80)

    def __call__(self, step: int) -> float:
        return SEED_DECAYS[self.kind](self, step // self.steps_per_epoch)

    def cosine(self, epoch: int) -> float:
        """``CosineAnnealingWithWarmup``: ``epoch / W`` in warmup, then an unclamped (periodic) cosine."""
        if epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        t = (epoch - self.warmup_epochs) / (self.T_max - self.warmup_epochs)
        return self.min_factor + (1 - self.min_factor) * (1 + math.cos(math.pi * t)) / 2

    def step_decay(self, epoch: int) -> float:
        """torch ``StepLR``: the seed gives ``step`` no warmup."""
        return self.gamma ** (epoch // max(1, self.step_size))

    def multistep(self, epoch: int) -> float:
        """``WarmupMultiStepLR`` with a warmup (milestones inside it never count), else torch ``MultiStepLR``."""
        if self.warmup_epochs <= 0:
            return self.gamma ** sum(0 <= m <= epoch for m in self.milestones)
        if epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        return self.gamma ** sum(self.warmup_epochs < m <= epoch for m in self.milestones)

    def constant(self, epoch: int) -> float:
        """Scheduler type ``null``: the seed builds no scheduler, so there is no warmup either."""
        return 1.0


SEED_DECAYS: dict[str, Callable[[SeedSchedule, int], float]] = {
    "cosine": SeedSchedule.cosine,
    "step": SeedSchedule.step_decay,
    "multistep": SeedSchedule.multistep,
    "constant": SeedSchedule.constant,
}
# ``training.scheduler.style``: which rule set turns the section into a schedule (module docstring).
STYLES = ("pfmseg", "seed")


def _kind(section: Any) -> str:
    """The decay kind of ``section.type`` and ``section.style``, or a ConfigError saying what to choose."""
    name = str(section.type).lower()
    if name not in SCHEDULERS:
        raise ConfigError(
            f"Unknown scheduler '{section.type}'.{closest(name, SCHEDULERS)} Choose one of: {', '.join(SCHEDULERS)}."
        )
    style = section.style
    if style not in STYLES:
        raise ConfigError(f"'training.scheduler.style' is '{style}'.{closest(str(style), STYLES)} "
                          f"Choose one of: {', '.join(STYLES)}.")
    kind = SCHEDULERS[name]
    if style == "seed" and kind not in SEED_DECAYS:
        raise ConfigError(
            f"'training.scheduler.type: {section.type}' has no seed-framework form under "
            f"'training.scheduler.style: seed'; choose one of cosine, step, multistep, none, or set style: pfmseg."
        )
    return kind


def make_schedule(section: Any, learning_rate: float, epochs: int, steps_per_epoch: int
                  ) -> Schedule | SeedSchedule:
    """The schedule a ``training.scheduler`` section describes (ConfigError if it describes none)."""
    kind = _kind(section)
    steps_per_epoch = max(1, int(steps_per_epoch))
    horizon = section.T_max if section.T_max else epochs
    min_factor = min(1.0, section.min_lr / learning_rate) if learning_rate > 0 else 0.0
    if section.style == "seed":
        return _seed_schedule(kind, section, horizon, steps_per_epoch, min_factor)
    return Schedule(
        kind=kind,
        total_steps=max(1, int(horizon * steps_per_epoch)),
        warmup_steps=round(section.warmup_epochs * steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        min_factor=min_factor,
        step_size=section.step_size, gamma=section.gamma, milestones=tuple(section.milestones),
        T_0=section.T_0, T_mult=section.T_mult, power=section.power,
    )


def _seed_schedule(kind: str, section: Any, horizon: int, steps_per_epoch: int, min_factor: float) -> SeedSchedule:
    if kind == "cosine" and horizon <= section.warmup_epochs:
        raise ConfigError(
            f"'training.scheduler.T_max' ({horizon}) must exceed 'training.scheduler.warmup_epochs' "
            f"({section.warmup_epochs}) under 'style: seed': the seed's cosine divides by their difference. "
            "Raise T_max or shorten the warmup."
        )
    return SeedSchedule(
        kind=kind, steps_per_epoch=steps_per_epoch, warmup_epochs=section.warmup_epochs, T_max=horizon,
        min_factor=min_factor, step_size=section.step_size, gamma=section.gamma,
        milestones=tuple(section.milestones),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, section: Any, learning_rate: float, epochs: int,
                    steps_per_epoch: int) -> LambdaLR:
    """A ``LambdaLR`` over :func:`make_schedule`; call ``step()`` after every optimizer step."""
    return LambdaLR(optimizer, make_schedule(section, learning_rate, epochs, steps_per_epoch))
