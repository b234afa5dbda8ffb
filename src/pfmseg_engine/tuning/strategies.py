"""The tuning strategies, as a table of how each one adapts a backbone.

A strategy wraps a :class:`~pfmseg_engine.backbones.Backbone` into an :class:`Encoder` and says, as
data, which parameters train (``trainable`` regexes over the encoder's parameter names). The model
and the checkpoint writer rely on that declaration: what trains is exactly what a checkpoint stores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbones.backbone import Backbone
from .adapters import ResNetV2Adapter, SmallCNNAdapter, TransformerAdapter
from .lora import inject_lora
from .seed_lora import inject_seed_lora

if TYPE_CHECKING:
    from .config import TuningConfig


@dataclass
class EncoderOutput:
    """Token grids of the tapped blocks (coarse, 1/patch) and optional high-resolution skips."""

    grids: list[torch.Tensor]
    skips: list[torch.Tensor]


class Encoder(nn.Module):
    """Backbone plus whatever modules the tuning strategy adds.

    The last grid is the encoder's final representation whenever something reads it as such: with a
    Transformer adapter it is the adapter's output over the whole token sequence (prefix tokens
    included, then dropped), and when the backbone kept its final norm (heads such as ``cup`` that
    decode the PFM's normalised output) it is that norm applied to the last tapped block. Otherwise
    the grids are the tapped blocks' raw outputs, as the multilevel and light heads were trained on.
    """

    def __init__(
        self,
        backbone: Backbone,
        cnn_adapter: ResNetV2Adapter | SmallCNNAdapter | None = None,
        transformer_adapter: TransformerAdapter | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.cnn_adapter = cnn_adapter
        self.transformer_adapter = transformer_adapter

    @property
    def grid_channels(self) -> list[int]:
        return [self.backbone.embed_dim] * len(self.backbone.feature_indices)

    @property
    def skip_channels(self) -> list[int]:
        return list(self.cnn_adapter.out_channels) if self.cnn_adapter is not None else []

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        if self.transformer_adapter is None and not self.backbone.keeps_final_norm:
            grids = self.backbone.features(x)
        else:
            grids, tokens = self.backbone.features_and_tokens(x)
            tokens = self.backbone.vit.norm(tokens)  # identity unless the final norm was kept
            if self.transformer_adapter is not None:
                tokens = self.transformer_adapter(tokens)
            grids = [*grids[:-1], self.backbone.tokens_to_grid(tokens, grids[-1].shape[-2:])]
        skips = self.cnn_adapter(x) if self.cnn_adapter is not None else []
        return EncoderOutput(grids=grids, skips=skips)


def _frozen(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    backbone.requires_grad_(False)
    return Encoder(backbone)


def _full(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    backbone.requires_grad_(True)
    return Encoder(backbone)


# ``lora_impl`` -> the function that injects that implementation's LoRA/DoRA layers
LORA_INJECTORS: dict[str, Callable[[nn.Module, TuningConfig, bool], nn.Module]] = {
    "peft": inject_lora,
    "seed": inject_seed_lora,
}


def _lora(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    LORA_INJECTORS[cfg.lora_impl](backbone.vit, cfg, False)
    return Encoder(backbone)


def _dora(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    LORA_INJECTORS[cfg.lora_impl](backbone.vit, cfg, True)
    return Encoder(backbone)


def _cnn_adapter(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    backbone.requires_grad_(False)
    return Encoder(backbone, cnn_adapter=ResNetV2Adapter(cfg.adapter_width_factor, cfg.adapter_block_units))


def _cnn_adapter_small(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    backbone.requires_grad_(False)
    return Encoder(backbone, cnn_adapter=SmallCNNAdapter(cfg.adapter_channels))


def _transformer_adapter(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    backbone.requires_grad_(False)
    adapter = TransformerAdapter(
        backbone.embed_dim, cfg.adapter_depth, mlp_ratio=cfg.adapter_mlp_ratio, drop_rate=cfg.adapter_drop_rate,
        attn_drop_rate=cfg.adapter_attn_drop_rate, drop_path_rate=cfg.adapter_drop_path_rate,
        init_values=cfg.adapter_init_values, qk_norm=cfg.adapter_qk_norm,
    )
    return Encoder(backbone, transformer_adapter=adapter)


@dataclass(frozen=True)
class Strategy:
    """One tuning strategy: how to build it and which encoder parameters it trains.

    ``adds_skips``: its trainable part only reaches the output through high-resolution skips, so a
    head that ignores skips would leave it untrained (the model config refuses that pairing).
    ``reads_final_tokens``: it consumes the encoder's final, normalised token sequence, so the
    backbone keeps its final norm.
    """

    name: str
    description: str
    build: Callable[[Backbone, TuningConfig], Encoder]
    trainable: tuple[str, ...]
    backbone_trains: bool = False
    adds_skips: bool = False
    reads_final_tokens: bool = False

    def is_trainable(self, encoder_param_name: str) -> bool:
        return any(re.fullmatch(pattern, encoder_param_name) for pattern in self.trainable)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("frozen", "backbone frozen, only the head trains", _frozen, ()),
        Strategy("full", "every backbone weight trains", _full, (r"backbone\..*",), backbone_trains=True),
        # trainable names of both implementations: peft's ``lora_A.default.weight`` ... and the seed
        # layers' ``lora_a``/``lora_b``/``lora_magnitude`` (seed_lora.py)
        Strategy("lora", "low-rank adapters (peft, or the seed's: lora_impl) on attention qkv/proj (+ MLP)", _lora,
                 (r"backbone\..*\.lora_[AB]\..*", r"backbone\..*\.lora_[ab]")),
        Strategy("dora", "weight-decomposed low-rank adapters (peft, or the seed's: lora_impl)", _dora,
                 (r"backbone\..*\.lora_[AB]\..*", r"backbone\..*\.lora_magnitude_vector\..*",
                  r"backbone\..*\.lora_[ab]", r"backbone\..*\.lora_magnitude")),
        Strategy("cnn_adapter", "frozen backbone + the seed's ResNetV2 CNN branch (1/2, 1/4, 1/8 skips)",
                 _cnn_adapter, (r"cnn_adapter\..*",), adds_skips=True),
        Strategy("cnn_adapter_small", "frozen backbone + a small 3-stage CNN branch (1/2, 1/4, 1/8 skips)",
                 _cnn_adapter_small, (r"cnn_adapter\..*",), adds_skips=True),
        Strategy("transformer_adapter", "frozen backbone + trainable transformer blocks over its output tokens",
                 _transformer_adapter, (r"transformer_adapter\..*",), reads_final_tokens=True),
    )
}


def apply_strategy(backbone: Backbone, cfg: TuningConfig) -> Encoder:
    """Wrap ``backbone`` according to ``cfg.strategy``."""
    return STRATEGIES[cfg.strategy].build(backbone, cfg)
