"""``style: seed`` gives, epoch by epoch, the learning rates of the seed framework's own schedulers.

The reference below transcribes ``utils/scheduler.py`` of lingxitong/PFM_Segmentation (the parts of
``CosineAnnealingWithWarmup``, ``WarmupMultiStepLR`` and ``get_scheduler`` that these tests reach) and
drives it the way its ``utils/trainer.py`` does: ``scheduler.step()`` once after every epoch.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import _LRScheduler

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.training import config_from_dict
from pfmseg_engine.training.config import SchedulerSection
from pfmseg_engine.training.schedulers import build_scheduler


# --- the seed's utils/scheduler.py, transcribed -----------------------------------------------------
class CosineAnnealingWithWarmup(_LRScheduler):
    def __init__(self, optimizer, T_max, eta_min=0, warmup_epochs=0, last_epoch=-1):
        self.T_max = T_max
        self.eta_min = eta_min
        self.warmup_epochs = warmup_epochs
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch < self.warmup_epochs:
            warmup_factor = self.last_epoch / self.warmup_epochs
            return [base_lr * warmup_factor for base_lr in self.base_lrs]
        adjusted_epoch = self.last_epoch - self.warmup_epochs
        adjusted_T_max = self.T_max - self.warmup_epochs
        return [self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * adjusted_epoch / adjusted_T_max)) / 2
                for base_lr in self.base_lrs]


class WarmupMultiStepLR(_LRScheduler):
    def __init__(self, optimizer, milestones, gamma=0.1, warmup_epochs=0, last_epoch=-1):
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch < self.warmup_epochs:
            warmup_factor = self.last_epoch / self.warmup_epochs
            return [base_lr * warmup_factor for base_lr in self.base_lrs]
        adjusted_epoch = self.last_epoch - self.warmup_epochs
        adjusted_milestones = [m - self.warmup_epochs for m in self.milestones if m > self.warmup_epochs]
        decay_factor = self.gamma ** len([m for m in adjusted_milestones if m <= adjusted_epoch])
        return [base_lr * decay_factor for base_lr in self.base_lrs]


def seed_get_scheduler(optimizer, scheduler_config):
    if not scheduler_config or scheduler_config.get("type") is None:
        return None
    scheduler_type = scheduler_config["type"].lower()
    if scheduler_type == "cosine":
        return CosineAnnealingWithWarmup(optimizer, T_max=scheduler_config.get("T_max", 100),
                                         eta_min=scheduler_config.get("min_lr", 0),
                                         warmup_epochs=scheduler_config.get("warmup_epochs", 0))
    if scheduler_type == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=scheduler_config.get("step_size", 30),
                                               gamma=scheduler_config.get("gamma", 0.1))
    if scheduler_type == "multistep":
        milestones = scheduler_config.get("milestones", [60, 80])
        gamma = scheduler_config.get("gamma", 0.1)
        warmup_epochs = scheduler_config.get("warmup_epochs", 0)
        if warmup_epochs > 0:
            return WarmupMultiStepLR(optimizer, milestones=milestones, gamma=gamma, warmup_epochs=warmup_epochs)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    raise ValueError(f"Unsupported scheduler type: {scheduler_type}")


# --- helpers ----------------------------------------------------------------------------------------
def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def seed_epoch_rates(scheduler_config: dict[str, Any], lr: float, epochs: int) -> list[float]:
    """The rate every epoch trains at in the seed (``utils/trainer.py``: one ``step()`` per epoch)."""
    optimizer = sgd(lr)
    scheduler = seed_get_scheduler(optimizer, scheduler_config)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def our_step_rates(section: SchedulerSection, lr: float, epochs: int, steps_per_epoch: int) -> list[list[float]]:
    """Our rate at every optimizer step, grouped by epoch (``build_scheduler`` steps once per optimizer step)."""
    optimizer = sgd(lr)
    scheduler = build_scheduler(optimizer, section, lr, epochs, steps_per_epoch)
    rates = []
    for _ in range(epochs):
        epoch = []
        for _ in range(steps_per_epoch):
            epoch.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        rates.append(epoch)
    return rates


def assert_same_rates(ours: list[list[float]], seed: list[float]) -> None:
    assert len(ours) == len(seed)
    for epoch, (steps, expected) in enumerate(zip(ours, seed, strict=True)):
        assert steps == pytest.approx([expected] * len(steps), rel=1e-12, abs=1e-15), f"epoch {epoch}"


# The seed repository's configs/config.yaml, training keys that decide the schedule, as published.
SEED_TRAINING = {"epochs": 150, "learning_rate": 0.001, "scheduler": {"type": "cosine", "warmup_epochs": 2}}


# --- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps_per_epoch", [1, 7])
def test_densebench_schedule_is_the_seeds_for_all_150_epochs(steps_per_epoch):
    config = config_from_dict({"protocol": "densebench", "dataset": {"num_classes": 2}, "training": SEED_TRAINING},
                              check_dataset=False)
    t = config.training
    assert t.scheduler.style == "seed" and t.epochs == 150  # the seed config's own keys keep the seed's rules
    seed = seed_epoch_rates(SEED_TRAINING["scheduler"], t.learning_rate, t.epochs)
    ours = our_step_rates(t.scheduler, t.learning_rate, t.epochs, steps_per_epoch)
    assert_same_rates(ours, seed)  # every step of an epoch holds that epoch's rate, as the seed's does
    # what the comparison covers: the first epoch untrained, zero at epoch 100, the climb back after it
    assert seed[0] == 0.0 and seed[1] == pytest.approx(5e-4) and seed[2] == pytest.approx(1e-3)
    assert seed[100] == pytest.approx(0.0, abs=1e-18)
    assert all(b > a for a, b in itertools.pairwise(seed[100:]))
    assert sum(seed[100:]) / 50 > 1e-4


@pytest.mark.parametrize("scheduler_config", [
    {"type": "cosine", "warmup_epochs": 3, "T_max": 12, "min_lr": 1e-3},  # several periods past T_max
    {"type": "cosine", "warmup_epochs": 0, "T_max": 7},
    {"type": "step", "warmup_epochs": 2, "step_size": 4, "gamma": 0.5},  # the seed's step has no warmup
    {"type": "multistep", "warmup_epochs": 3, "milestones": [2, 3, 8, 15], "gamma": 0.5},
    {"type": "multistep", "warmup_epochs": 0, "milestones": [0, 8, 15], "gamma": 0.5},
    {"type": None, "warmup_epochs": 2},  # no scheduler at all
])
def test_other_seed_schedules_match_epoch_by_epoch(scheduler_config):
    lr, epochs = 0.1, 40
    section = SchedulerSection(style="seed", **scheduler_config)
    seed = seed_epoch_rates(scheduler_config, lr, epochs)
    assert_same_rates(our_step_rates(section, lr, epochs, steps_per_epoch=3), seed)
    assert len(set(seed)) > 1 or scheduler_config["type"] is None


def test_default_style_is_unchanged_outside_the_preset():
    t = config_from_dict({"dataset": {"num_classes": 2}, "training": SEED_TRAINING}, check_dataset=False).training
    assert t.scheduler.style == "pfmseg"
    rates = [rate for epoch in our_step_rates(t.scheduler, t.learning_rate, t.epochs, steps_per_epoch=2)
             for rate in epoch]
    assert 0 < rates[0] < rates[1] < rates[4] == t.learning_rate  # warms up per step, from the first step
    assert all(b <= a for a, b in itertools.pairwise(rates[4:])) and rates[-1] > 0  # never climbs back, never 0


@pytest.mark.parametrize(("scheduler", "message"), [
    ({"style": "sed"}, "Did you mean 'seed'"),
    ({"style": "seed", "type": "poly"}, "has no seed-framework form"),
    ({"style": "seed", "type": "cosine_restarts"}, "set style: pfmseg"),
    ({"style": "seed", "T_max": 2, "warmup_epochs": 2}, "must exceed 'training.scheduler.warmup_epochs'"),
])
def test_impossible_seed_schedules_are_config_errors(scheduler, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"dataset": {"num_classes": 2}, "training": {"scheduler": scheduler}}, check_dataset=False)
