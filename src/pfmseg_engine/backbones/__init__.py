"""PFM registry (specs as data), checkpoint readers/converters and the common ``Backbone`` feature API."""

from .backbone import (
    Backbone,
    RandomWeightsWarning,
    build_backbone,
    count_parameters,
    create_vit,
    default_feature_indices,
    load_backbone_weights,
)
from .converters import CONVERTERS, register_converter
from .registry import get_spec, list_backbones
from .specs import SPECS, BackboneSpec
from .weights import read_state_dict, resolve_weights_file

__all__ = [
    "CONVERTERS",
    "SPECS",
    "Backbone",
    "BackboneSpec",
    "RandomWeightsWarning",
    "build_backbone",
    "count_parameters",
    "create_vit",
    "default_feature_indices",
    "get_spec",
    "list_backbones",
    "load_backbone_weights",
    "read_state_dict",
    "register_converter",
    "resolve_weights_file",
]
