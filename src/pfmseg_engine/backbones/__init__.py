"""PFM registry (specs as data), checkpoint readers/converters and the common ``Backbone`` feature API.

Names are re-exported lazily so that reading the table (``specs``, ``registry``) never imports torch.
Converters register themselves in ``_registry`` when their module is imported; ``layouts`` imports
them all and is where the weight loader looks a layout up.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Backbone", "RandomWeightsWarning", "build_backbone", "count_parameters", "create_vit",
                     "default_feature_indices", "load_backbone_weights"), "backbone"),
    **dict.fromkeys(("WeightsStatus", "weights_available", "weights_status"), "availability"),
    **dict.fromkeys(("CONVERTERS", "converter_for", "register_converter"), "layouts"),
    **dict.fromkeys(("get_spec", "list_backbones"), "registry"),
    **dict.fromkeys(("ALL_SPECS", "BASELINES", "SPECS", "BackboneSpec"), "specs"),
    **dict.fromkeys(("read_state_dict", "resolve_weights_file"), "weights"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
