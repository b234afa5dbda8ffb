"""PFM registry (specs as data), checkpoint readers/converters and the common ``Backbone`` feature API.

Names are re-exported lazily so that reading the table (``specs``, ``registry``) never imports torch.
Converters of non-timm layouts register themselves when ``converters`` is imported, which the
weight loader does before it looks one up.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Backbone", "RandomWeightsWarning", "build_backbone", "count_parameters", "create_vit",
                     "default_feature_indices", "load_backbone_weights"), "backbone"),
    **dict.fromkeys(("CONVERTERS", "register_converter"), "converters"),
    **dict.fromkeys(("get_spec", "list_backbones"), "registry"),
    **dict.fromkeys(("ALL_SPECS", "BASELINES", "SPECS", "BackboneSpec"), "specs"),
    **dict.fromkeys(("read_state_dict", "resolve_weights_file"), "weights"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
