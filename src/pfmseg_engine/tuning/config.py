"""Settings of a tuning strategy, as stored in checkpoints and configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError, closest, reject_unknown_keys

#: Implementations of the ``lora``/``dora`` strategies: peft's standard layers (update scaled by
#: ``alpha / rank``, A ~ +-1/sqrt(in_features), DoRA magnitude per output row) or the seed framework's
#: (``alpha`` itself, A ~ +-1/sqrt(rank), one scalar DoRA magnitude per layer; see ``seed_lora``).
LORA_IMPLS: tuple[str, ...] = ("peft", "seed")


@dataclass(frozen=True)
class TuningConfig:
    """Which strategy adapts the backbone, and its knobs.

    ``rank``/``alpha``/``dropout``/``lora_mlp``/``lora_impl`` apply to LoRA and DoRA (``lora_mlp`` also
    adapts the MLP ``fc1``/``fc2`` besides attention ``qkv``/``proj``; ``lora_impl`` picks peft's layers
    or the seed's, and with them what ``alpha`` means: peft scales the update by ``alpha / rank``, the
    seed by ``alpha``); ``adapter_width_factor`` and
    ``adapter_block_units`` size the seed's ResNetV2 CNN adapter (``cnn_adapter``: widths 64, 256, 512
    times the factor; units of blocks 1 and 2 (the seed's third entry is accepted and unused));
    ``adapter_channels`` sizes the 1/2, 1/4, 1/8 stages of the small one (``cnn_adapter_small``);
    ``adapter_depth`` is the number of Transformer-adapter blocks and
    the other ``adapter_*`` settings are those blocks' MLP ratio, dropouts, LayerScale init and
    query/key norm (the seed's ``transformer_adapter`` keys).
    """

    strategy: str = "frozen"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    lora_mlp: bool = False
    lora_impl: str = "peft"
    adapter_channels: tuple[int, int, int] = (32, 64, 128)
    adapter_width_factor: float = 1.0
    adapter_block_units: tuple[int, ...] = (3, 4, 9)
    adapter_depth: int = 2
    adapter_mlp_ratio: float = 4.0
    adapter_drop_rate: float = 0.0
    adapter_attn_drop_rate: float = 0.0
    adapter_drop_path_rate: float = 0.0
    adapter_init_values: float | None = 1e-5
    adapter_qk_norm: bool = False

    def __post_init__(self) -> None:
        from .strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"Unknown tuning strategy '{self.strategy}'.{closest(self.strategy, STRATEGIES)} "
                f"Choose one of: {', '.join(STRATEGIES)}."
            )
        if self.rank < 1:
            raise ConfigError(f"LoRA/DoRA rank must be >= 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA/DoRA dropout must be in [0, 1), got {self.dropout}.")
        self._check_lora_impl()
        if len(self.adapter_channels) != 3 or min(self.adapter_channels) < 1:
            raise ConfigError(
                f"adapter_channels needs three positive widths (1/2, 1/4, 1/8 stages), got {self.adapter_channels}."
            )
        if not self.adapter_width_factor > 0 or int(64 * self.adapter_width_factor) % 32:
            raise ConfigError(
                f"adapter_width_factor must be positive and give a width int(64 * factor) that is a multiple of 32 "
                f"(GroupNorm of 32 groups), e.g. 0.5, 1, 1.5 or 2; got {self.adapter_width_factor}."
            )
        units = tuple(self.adapter_block_units)
        if len(units) < 2 or any(int(u) != u or u < 1 for u in units):
            raise ConfigError(
                "adapter_block_units needs at least two positive whole unit counts (blocks 1 and 2 of the "
                f"ResNetV2 adapter, e.g. [3, 4, 9]), got {list(units)}."
            )
        object.__setattr__(self, "adapter_block_units", tuple(int(u) for u in units))
        if self.adapter_depth < 1:
            raise ConfigError(f"adapter_depth must be >= 1, got {self.adapter_depth}.")
        rates = {"adapter_drop_rate": self.adapter_drop_rate, "adapter_attn_drop_rate": self.adapter_attn_drop_rate,
                 "adapter_drop_path_rate": self.adapter_drop_path_rate}
        for key, rate in rates.items():
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {rate}.")
        if self.adapter_mlp_ratio <= 0:
            raise ConfigError(f"adapter_mlp_ratio must be positive, got {self.adapter_mlp_ratio}.")
        object.__setattr__(self, "adapter_channels", tuple(int(c) for c in self.adapter_channels))

    def _check_lora_impl(self) -> None:
        if self.lora_impl not in LORA_IMPLS:
            raise ConfigError(
                f"Unknown lora_impl '{self.lora_impl}'.{closest(str(self.lora_impl), LORA_IMPLS)} "
                f"Choose one of: {', '.join(LORA_IMPLS)}."
            )
        if self.lora_impl == "seed" and self.dropout and self.strategy in ("lora", "dora"):
            raise ConfigError(
                f"lora_impl 'seed' has no LoRA dropout (the seed's layers have none), got dropout {self.dropout}; "
                "set dropout: 0, or lora_impl: peft for dropout."
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_channels"] = list(self.adapter_channels)
        data["adapter_block_units"] = list(self.adapter_block_units)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningConfig:
        reject_unknown_keys(data, (f.name for f in fields(cls)), "tuning setting")
        data = dict(data)
        if "adapter_channels" in data:
            data["adapter_channels"] = tuple(data["adapter_channels"])
        if "adapter_block_units" in data:
            data["adapter_block_units"] = tuple(data["adapter_block_units"])
        return cls(**data)
