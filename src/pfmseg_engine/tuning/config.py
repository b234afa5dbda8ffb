"""Settings of a tuning strategy, as stored in checkpoints and configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError, closest, reject_unknown_keys


@dataclass(frozen=True)
class TuningConfig:
    """Which strategy adapts the backbone, and its knobs.

    ``rank``/``alpha``/``dropout``/``lora_mlp`` apply to LoRA and DoRA (``lora_mlp`` also adapts the
    MLP ``fc1``/``fc2`` besides attention ``qkv``/``proj``); ``adapter_channels`` sizes the CNN
    adapter's 1/2, 1/4, 1/8 stages; ``adapter_depth`` is the number of Transformer-adapter blocks and
    the other ``adapter_*`` settings are those blocks' MLP ratio, dropouts, LayerScale init and
    query/key norm (the seed's ``transformer_adapter`` keys).
    """

    strategy: str = "frozen"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    lora_mlp: bool = False
    adapter_channels: tuple[int, int, int] = (32, 64, 128)
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
        if len(self.adapter_channels) != 3 or min(self.adapter_channels) < 1:
            raise ConfigError(
                f"adapter_channels needs three positive widths (1/2, 1/4, 1/8 stages), got {self.adapter_channels}."
            )
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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_channels"] = list(self.adapter_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningConfig:
        reject_unknown_keys(data, (f.name for f in fields(cls)), "tuning setting")
        data = dict(data)
        if "adapter_channels" in data:
            data["adapter_channels"] = tuple(data["adapter_channels"])
        return cls(**data)
