"""Optimizers by name and learning-rate schedules with warmup that never reach zero."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.training.config import OptimizerSection, SchedulerSection, TrainingSection
from pfmseg_engine.training.optim import build_optimizer
from pfmseg_engine.training.schedulers import SCHEDULERS, build_scheduler

STEPS_PER_EPOCH = 5
EPOCHS = 20


def lrs(section: SchedulerSection, lr: float = 0.1, epochs: int = EPOCHS) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_scheduler(optimizer, section, lr, epochs, STEPS_PER_EPOCH)
    out = []
    for _ in range(epochs * STEPS_PER_EPOCH):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "step", "multistep", "cosine_restarts", "poly", "constant"])
def test_warmup_never_gives_zero_and_reaches_base_rate(kind):
    section = SchedulerSection(type=kind, warmup_epochs=2, step_size=5, milestones=[8, 14], T_0=4)
    rates = lrs(section)
    first_epoch = rates[:STEPS_PER_EPOCH]
    assert all(r > 0 for r in first_epoch)
    assert all(b > a for a, b in itertools.pairwise(rates[:11]))  # rising through warmup
    assert rates[10] == pytest.approx(0.1)  # base rate when warmup ends
    assert min(rates) > 0


def test_cosine_decays_smoothly_to_min_lr_without_reaching_zero():
    rates = lrs(SchedulerSection(type="cosine", warmup_epochs=0))
    assert rates[0] == pytest.approx(0.1)
    assert all(b <= a for a, b in itertools.pairwise(rates))
    assert 0 < rates[-1] < 1e-3
    floored = lrs(SchedulerSection(type="cosine", warmup_epochs=0, min_lr=0.01))
    assert min(floored) >= 0.01 - 1e-12
    # past T_max the last rate is kept, never 0
    short = lrs(SchedulerSection(type="cosine", warmup_epochs=0, T_max=5))
    assert min(short) > 0 and short[-1] == short[5 * STEPS_PER_EPOCH - 1]


def test_step_and_multistep_decay_by_gamma():
    step = lrs(SchedulerSection(type="step", warmup_epochs=0, step_size=5, gamma=0.5))
    assert step[0] == pytest.approx(0.1) and step[5 * STEPS_PER_EPOCH] == pytest.approx(0.05)
    assert step[10 * STEPS_PER_EPOCH] == pytest.approx(0.025)
    multi = lrs(SchedulerSection(type="multistep", warmup_epochs=0, milestones=[3, 12], gamma=0.1))
    assert multi[3 * STEPS_PER_EPOCH - 1] == pytest.approx(0.1)
    assert multi[3 * STEPS_PER_EPOCH] == pytest.approx(0.01)
    assert multi[12 * STEPS_PER_EPOCH] == pytest.approx(0.001)


def test_cosine_with_restarts_jumps_back_up():
    rates = lrs(SchedulerSection(type="cosine_restarts", warmup_epochs=0, T_0=4, T_mult=2))
    restart_1, restart_2 = 4 * STEPS_PER_EPOCH, (4 + 8) * STEPS_PER_EPOCH
    assert rates[restart_1] == pytest.approx(0.1) and rates[restart_1 - 1] < 0.01
    assert rates[restart_2] == pytest.approx(0.1) and rates[restart_2 - 1] < 0.01
    assert min(rates) > 0


def test_unknown_scheduler():
    assert "cosine_with_restarts" in SCHEDULERS
    with pytest.raises(ConfigError, match="Did you mean 'cosine'"):
        lrs(SchedulerSection(type="cosin"))


def model_params() -> list[torch.nn.Parameter]:
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    return [torch.nn.Parameter(torch.ones(3)), frozen]


@pytest.mark.parametrize(("name", "cls"), [("SGD", torch.optim.SGD), ("Adam", torch.optim.Adam),
                                           ("AdamW", torch.optim.AdamW), ("nadam", torch.optim.NAdam)])
def test_optimizers_by_name_honour_weight_decay_and_skip_frozen(name, cls):
    training = TrainingSection(learning_rate=0.01, weight_decay=0.05, optimizer=OptimizerSection(type=name))
    optimizer = build_optimizer(model_params(), training)
    assert isinstance(optimizer, cls)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.05
    assert len(group["params"]) == 1  # the frozen parameter is not optimised


def test_sgd_momentum_nesterov_and_decay_override():
    training = TrainingSection(weight_decay=0.05, optimizer=OptimizerSection(
        type="SGD", momentum=0.8, nesterov=True, weight_decay=0.0))
    group = build_optimizer(model_params(), training).param_groups[0]
    assert group["momentum"] == 0.8 and group["nesterov"] is True and group["weight_decay"] == 0.0


def test_weight_decay_shrinks_weights_with_zero_gradient():
    param = torch.nn.Parameter(torch.ones(4))
    training = TrainingSection(learning_rate=0.1, weight_decay=0.5, optimizer=OptimizerSection(type="SGD", momentum=0))
    optimizer = build_optimizer([param], training)
    param.grad = torch.zeros(4)
    optimizer.step()
    assert torch.allclose(param.detach(), torch.full((4,), 1 - 0.1 * 0.5))


def test_unknown_optimizer_and_nothing_to_train():
    with pytest.raises(ConfigError, match="Did you mean 'adamw'"):
        build_optimizer(model_params(), TrainingSection(optimizer=OptimizerSection(type="adamww")))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], TrainingSection())


def test_fractional_warmup_epochs():
    rates = lrs(replace(SchedulerSection(), type="constant", warmup_epochs=0.4))  # 2 warmup steps
    assert rates[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert not math.isnan(sum(rates))
