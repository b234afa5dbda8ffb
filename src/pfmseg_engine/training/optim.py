"""Optimizers by name (registry), built over the model's trainable parameters only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import ConfigError, closest

# name (lower case) -> factory(params, lr, weight_decay, optimizer section)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, wd, s: torch.optim.SGD(
        params, lr=lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0, weight_decay=wd),
    "adam": lambda params, lr, wd, s: torch.optim.Adam(params, lr=lr, betas=tuple(s.betas), eps=s.eps,
                                                       weight_decay=wd),
    "adamw": lambda params, lr, wd, s: torch.optim.AdamW(params, lr=lr, betas=tuple(s.betas), eps=s.eps,
                                                         weight_decay=wd),
    "nadam": lambda params, lr, wd, s: torch.optim.NAdam(params, lr=lr, betas=tuple(s.betas), eps=s.eps,
                                                         weight_decay=wd),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], training: Any) -> torch.optim.Optimizer:
    """Optimizer named by ``training.optimizer.type`` with ``training.learning_rate`` and weight decay.

    ``training.optimizer.weight_decay`` (when set) overrides ``training.weight_decay``; decay applies
    to every trainable parameter, as in the seed.
    """
    section = training.optimizer
    name = section.type.lower()
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"Unknown optimizer '{section.type}'.{closest(name, OPTIMIZERS)} Choose one of: SGD, Adam, AdamW, NAdam."
        )
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("The model has no trainable parameters; check model.finetune_mode.type.")
    decay = training.weight_decay if section.weight_decay is None else section.weight_decay
    return OPTIMIZERS[name](params, training.learning_rate, decay, section)
