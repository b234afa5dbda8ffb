"""The checkpoint-layout registry: layout name -> converter, filled by the modules that define converters.

This module imports none of them (timm's ``_registry.py`` idea), so converter modules can register
themselves without importing one another; :mod:`.layouts` imports every converter module once and is
where a layout is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, "VisionTransformer"], StateDict]

#: Layout name (the backbone table's ``checkpoint_layout`` column) -> converter into timm's key names.
CONVERTERS: dict[str, Converter] = {}


def register_converter(layout: str) -> Callable[[Converter], Converter]:
    """Decorator adding a converter for a new checkpoint layout."""

    def decorate(fn: Converter) -> Converter:
        CONVERTERS[layout] = fn
        return fn

    return decorate
