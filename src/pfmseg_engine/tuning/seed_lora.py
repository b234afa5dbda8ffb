"""The seed framework's own LoRA and DoRA layers, for ``finetune_mode.lora_impl: seed``.

Transcribed from PFM-DenseBench (``models/lora.py`` ``LoRALinear``, ``models/dora.py``
``DoraLinear``). They train differently from peft's standard layers, so ``protocol: densebench``
selects them and every other config keeps peft:

* the low-rank update is scaled by ``alpha`` itself, not by ``alpha / rank``;
* A is an ``(in_features, rank)`` tensor drawn with ``kaiming_uniform_(a=sqrt(5))``, whose fan-in is
  the rank: uniform(+-1/sqrt(rank)) (peft stores A as ``(rank, in_features)``: +-1/sqrt(in_features));
* DoRA keeps ONE scalar magnitude per layer and renormalises the whole matrix by its Frobenius norm,
  ``W' = m * (W + dW) / ||W + dW||_F * ||W||_F`` (peft: one magnitude per output row, row norms).

Each layer wraps the backbone's frozen ``nn.Linear`` as ``base_layer`` (peft's name for it, so the
frozen weights keep one place whichever implementation runs) and adds only the seed's parameters,
named ``lora_a``, ``lora_b`` and ``lora_magnitude``: every trainable name carries ``lora_``, exactly
as with peft, which is what the strategy table and the checkpoint writer select on.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .lora import ATTENTION_MLP_TARGETS, ATTENTION_TARGETS

if TYPE_CHECKING:
    from .config import TuningConfig


class SeedLoRALinear(nn.Module):
    """``base_layer(x) + ((x @ A) @ B) * alpha``: the seed's ``LoRALinear`` around a frozen linear layer.

    The frozen weight is the wrapped layer's own (the seed copies the pretrained weight into a fresh
    layer; wrapping it keeps the backbone's parameter, and its name, as loaded).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scale = alpha  # the seed's ``self.scale = lora_alpha``: no division by the rank
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.lora_a = nn.Parameter(torch.zeros(base_layer.in_features, rank, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(rank, base_layer.out_features, device=device, dtype=dtype))
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_lora_parameters(self) -> None:
        """The seed's ``reset_parameters`` for the adapter: A by kaiming (fan-in = rank), B zero."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + ((x @ self.lora_a) @ self.lora_b) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


class SeedDoRALinear(SeedLoRALinear):
    """The seed's ``DoraLinear``: one scalar magnitude times the whole-matrix direction of ``W + dW``.

    The operations follow the seed's forward one by one (same order, same norms), so the layer
    computes the seed's numbers, under autocast too.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float):
        super().__init__(base_layer, rank, alpha)
        weight = base_layer.weight
        # the seed's scalar ``m``
        self.lora_magnitude = nn.Parameter(torch.ones(1, device=weight.device, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        lora_update = (self.lora_a @ self.lora_b) * self.scale  # (in_features, out_features)
        weight_norm = weight.norm(p="fro")
        updated_weight = weight + lora_update.t()
        direction = updated_weight / updated_weight.norm(p="fro")
        return F.linear(x, self.lora_magnitude * direction * weight_norm, self.base_layer.bias)


def inject_seed_lora(vit: nn.Module, cfg: TuningConfig, use_dora: bool) -> nn.Module:
    """Wrap the targeted linear layers of ``vit`` in place with the seed's LoRA (or DoRA) layers.

    The targets are peft's (attention ``qkv``/``proj`` of every block, plus the MLP with
    ``lora_mlp``), and as with peft only the adapters train afterwards. The seed's layers have no
    dropout; :class:`TuningConfig` refuses a dropout with them.
    """
    pattern = ATTENTION_MLP_TARGETS if cfg.lora_mlp else ATTENTION_TARGETS
    targets = [name for name, _ in vit.named_modules() if re.fullmatch(pattern, name)]
    if not targets:  # guard against the silent no-op the seed shows on non-timm backbones
        raise RuntimeError("No module matched the LoRA targets (blocks.N.attn.qkv/proj); nothing to adapt.")
    layer = SeedDoRALinear if use_dora else SeedLoRALinear
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = vit.get_submodule(parent_name)
        module = getattr(parent, child)
        if type(module) is not nn.Linear:
            raise RuntimeError(f"LoRA target '{name}' is a {type(module).__name__}, not a plain nn.Linear.")
        setattr(parent, child, layer(module, cfg.rank, cfg.alpha))
    for name, param in vit.named_parameters():
        param.requires_grad_("lora_" in name)
    return vit
