"""Decoders turning token grids (and adapter skips) into per-pixel logits."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError, closest
from .light import LightDecoder
from .multilevel import MultiLevelDecoder

HEADS: dict[str, type[nn.Module]] = {
    "multilevel": MultiLevelDecoder,
    "light": LightDecoder,
}


def build_head(name: str, in_channels: list[int], skip_channels: list[int], num_classes: int) -> nn.Module:
    """Instantiate head ``name``; every head is called as ``head(grids, skips, out_size)``."""
    if name not in HEADS:
        raise ConfigError(f"Unknown head '{name}'.{closest(name, HEADS)} Choose one of: {', '.join(HEADS)}.")
    return HEADS[name](in_channels, skip_channels, num_classes)


__all__ = ["HEADS", "LightDecoder", "MultiLevelDecoder", "build_head"]
