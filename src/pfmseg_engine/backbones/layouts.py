"""Where a checkpoint layout is looked up: imports every converter module, so each has registered itself.

Converter modules import only :mod:`._registry` (and shared helpers in :mod:`.converters`); this is the
one module that imports them all, so looking a layout up here always sees the full table.
"""

from __future__ import annotations

from ..errors import WeightsError
from . import converters, hf_converters, musk  # noqa: F401  (each registers its layouts on import)
from ._registry import CONVERTERS, Converter, StateDict, register_converter

__all__ = ["CONVERTERS", "Converter", "StateDict", "converter_for", "register_converter"]


def converter_for(layout: str) -> Converter:
    """The converter of checkpoint layout ``layout`` into timm's key names."""
    try:
        return CONVERTERS[layout]
    except KeyError:
        raise WeightsError(f"No converter for checkpoint layout '{layout}'; known layouts: "
                           f"{', '.join(sorted(CONVERTERS))}. Register one with register_converter.") from None
