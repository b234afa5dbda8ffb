"""Tuning strategies: frozen, full, LoRA, DoRA, CNN adapter, Transformer adapter."""

from .config import TuningConfig
from .strategies import STRATEGIES, Encoder, EncoderOutput, Strategy, apply_strategy

__all__ = ["STRATEGIES", "Encoder", "EncoderOutput", "Strategy", "TuningConfig", "apply_strategy"]
