"""Decoders turning token grids (and adapter skips) into per-pixel logits."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError, closest
from .cup import CupDecoder
from .light import LightDecoder
from .multilevel import FastDecoder, MultiLevelDecoder

#: The head a model config names when it names none (and the one a from-scratch baseline records).
DEFAULT_HEAD = "fast"

HEADS: dict[str, type[nn.Module]] = {
    "fast": FastDecoder,
    "multilevel": MultiLevelDecoder,
    "light": LightDecoder,
    "cup": CupDecoder,
}


def build_head(name: str, in_channels: list[int], skip_channels: list[int], num_classes: int,
               patch_size: int = 16, **options: Any) -> nn.Module:
    """Instantiate head ``name``; every head is called as ``head(grids, skips, out_size)``.

    ``patch_size`` is the backbone's: heads that upsample in fixed steps derive their number of steps
    (light) or their last step (cup) from it. Each head class says, as class attributes, whether it
    reads CNN-adapter skips (``uses_skips``) and whether it decodes the encoder's final normalised
    output (``reads_final_tokens``, which makes the backbone keep its final norm). ``options`` are the
    head's own settings (``light``: ``final_norm``; see :func:`head_reads_final_tokens`).
    """
    if name not in HEADS:
        raise ConfigError(f"Unknown head '{name}'.{closest(name, HEADS)} Choose one of: {', '.join(HEADS)}.")
    return HEADS[name](in_channels, skip_channels, num_classes, patch_size=patch_size, **options)


def head_reads_final_tokens(name: str, **options: Any) -> bool:
    """Whether head ``name`` built with ``options`` decodes the encoder's final normalised output.

    Known before the head is built (the backbone, built first, must keep its final norm for it): a
    head's ``final_norm`` option, where it has one (``light``), decides; otherwise the class says
    (``cup`` always, as the seed framework; ``fast`` and ``multilevel`` never).
    """
    default = getattr(HEADS.get(name), "reads_final_tokens", False)
    return bool(options.get("final_norm", default))


__all__ = ["DEFAULT_HEAD", "HEADS", "CupDecoder", "FastDecoder", "LightDecoder", "MultiLevelDecoder", "build_head",
           "head_reads_final_tokens"]
