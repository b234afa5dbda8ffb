"""The one table between the seed's YAML keys and :class:`~pfmseg_engine.model.ModelConfig` fields.

A training config describes its model with the seed framework's key names (``model.pfm_name``,
``model.finetune_mode.type``, ``model.cnn_adapter.width_factor`` ...); a model and its checkpoints
are described by :class:`~pfmseg_engine.model.ModelConfig` and its
:class:`~pfmseg_engine.tuning.TuningConfig`. :data:`SEED_KEYS` maps one onto the other, and
everything else is derived from it, in both directions:

* the ``model`` section of the training config (:data:`ModelSection` and its sub-sections) is
  generated from the table: each key's type and default are those of the field it maps to, so a
  tuning default is declared once, in ``TuningConfig``;
* :func:`model_fields` reads a training config into ModelConfig fields
  (``TrainConfig.model_config``) and :func:`seed_values` writes a ModelConfig back into seed keys
  (``TrainConfig.from_model_config``);
* :func:`seed_key_names` rewrites field names in error messages into the keys a user typed.

``CHECKED_KEYS`` are seed keys of the ``model`` section that describe the model without being
stored in it (``emb_dim`` is derived from the backbone, ``num_classes`` from the dataset); the
training config checks them against the model.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from ..model import ModelConfig
from ..tuning import TuningConfig

# seed key (dotted, from the config's top level) -> ModelConfig field ("tuning.x": a TuningConfig field)
SEED_KEYS: dict[str, str] = {
    "model.pfm_name": "backbone",
    "model.finetune_mode.type": "tuning.strategy",
    "model.finetune_mode.rank": "tuning.rank",
    "model.finetune_mode.alpha": "tuning.alpha",
    "model.finetune_mode.dropout": "tuning.dropout",
    "model.finetune_mode.lora_mlp": "tuning.lora_mlp",
    "model.finetune_mode.lora_impl": "tuning.lora_impl",
    "model.pfm_weights_path": "weights",
    "model.cnn_adapter.width_factor": "tuning.adapter_width_factor",
    "model.cnn_adapter.block_units": "tuning.adapter_block_units",
    "model.cnn_adapter.channels": "tuning.adapter_channels",
    "model.transformer_adapter.depth": "tuning.adapter_depth",
    "model.transformer_adapter.mlp_ratio": "tuning.adapter_mlp_ratio",
    "model.transformer_adapter.drop_rate": "tuning.adapter_drop_rate",
    "model.transformer_adapter.attn_drop_rate": "tuning.adapter_attn_drop_rate",
    "model.transformer_adapter.drop_path_rate": "tuning.adapter_drop_path_rate",
    "model.transformer_adapter.init_values": "tuning.adapter_init_values",
    "model.transformer_adapter.qk_norm": "tuning.adapter_qk_norm",
    "model.head": "head",
    "model.light_head.final_norm": "light_head_final_norm",
    "model.tiny": "tiny",
    "model.feature_indices": "feature_indices",
    "model.strict_weights": "strict_weights",
    "model.mpp": "mpp",
    # values the training config holds in other sections (and derives: see TrainConfig.model_config)
    "dataset.num_classes": "num_classes",
    "dataset.class_names": "class_names",
    "training.augmentation.RandomResizedCropSize": "input_size",
}

# Defaults of fields that ModelConfig requires (it has no default for them).
REQUIRED_DEFAULTS: dict[str, Any] = {"backbone": "uni_v1"}

# seed keys of the model section that are checked against the model, not stored: (type, default)
CHECKED_KEYS: dict[str, tuple[Any, Any]] = {
    "model.emb_dim": (int | None, None),  # derived from pfm_name; a contradicting value is an error
    "model.num_classes": (int | None, None),  # must equal dataset.num_classes
    "model.n_channels": (int, 3),  # seed UNet key: input channels, RGB only
    "model.bilinear": (bool, True),  # seed UNet key: bilinear up-sampling (the variant pfmseg builds)
    "model.model_type": (str | None, None),  # seed key: "unet" is another way of saying pfm_name: unet
}


def _owner(target: str) -> tuple[type, str]:
    """(dataclass, field name) of a ModelConfig field path such as ``"tuning.rank"``."""
    if target.startswith("tuning."):
        return TuningConfig, target.removeprefix("tuning.")
    return ModelConfig, target


def field_type_and_default(target: str) -> tuple[Any, Any]:
    """Type hint and default of the ModelConfig/TuningConfig field ``target`` (declared there, once)."""
    cls, name = _owner(target)
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = REQUIRED_DEFAULTS[target]
    return typing.get_type_hints(cls)[name], default


def _class_name(path: str) -> str:
    leaf = path.rsplit(".", 1)[-1]
    special = {"cnn_adapter": "CNNAdapter"}
    return special.get(leaf) or "".join(part.capitalize() for part in leaf.split("_"))


def _build_section(path: str, leaves: dict[str, tuple[Any, Any]]) -> type:
    """A frozen dataclass for section ``path`` from ``{dotted key: (type, default)}`` (sub-sections nest)."""
    fields: list[tuple[str, Any, Any]] = []
    children: dict[str, dict[str, tuple[Any, Any]]] = {}
    for key, (tp, default) in leaves.items():
        rest = key.removeprefix(path + ".")
        if "." in rest:
            children.setdefault(rest.split(".", 1)[0], {})[key] = (tp, default)
        else:
            fields.append((rest, tp, dataclasses.field(default=default)))
    for name, sub in children.items():
        section = _build_section(f"{path}.{name}", sub)
        fields.append((name, section, dataclasses.field(default_factory=section)))
    order: dict[str, int] = {}
    for key in leaves:  # fields keep the order of their first key in the table
        order.setdefault(key.removeprefix(path + ".").split(".", 1)[0], len(order))
    fields.sort(key=lambda f: order[f[0]])
    cls = dataclasses.make_dataclass(f"{_class_name(path)}Section", fields, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"The ``{path}`` section; generated from :data:`SEED_KEYS` (defaults: ModelConfig/TuningConfig)."
    globals()[cls.__name__] = cls  # importable and picklable by name
    return cls


def _model_leaves() -> dict[str, tuple[Any, Any]]:
    leaves = {key: field_type_and_default(target) for key, target in SEED_KEYS.items() if key.startswith("model.")}
    head = {k: leaves.pop(k) for k in list(leaves) if k in ("model.pfm_name",)}
    return {**head, "model.emb_dim": CHECKED_KEYS["model.emb_dim"], **leaves,
            **{k: v for k, v in CHECKED_KEYS.items() if k != "model.emb_dim"}}


#: The training config's ``model`` section (sub-sections ``finetune_mode``, ``cnn_adapter``,
#: ``transformer_adapter``), generated from :data:`SEED_KEYS` and :data:`CHECKED_KEYS`.
ModelSection: type = _build_section("model", _model_leaves())


def get_path(obj: Any, path: str) -> Any:
    """``get_path(cfg, "model.finetune_mode.rank")``: attributes (or mapping keys) along a dotted path."""
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def model_fields(config: Any, derived: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields (``tuning`` nested) that a training config's seed keys describe.

    ``derived`` gives the values the training config works out itself (num_classes, class_names,
    input_size); every other field is read from the seed key the table names.
    """
    data: dict[str, Any] = {"tuning": {}}
    for key, target in SEED_KEYS.items():
        value = derived[target] if target in derived else get_path(config, key)
        cls, name = _owner(target)
        (data["tuning"] if cls is TuningConfig else data)[name] = value
    return data


def seed_values(model_config: Any) -> dict[str, Any]:
    """The seed keys (nested, as parsed YAML) that describe ``model_config``: the inverse of :func:`model_fields`."""
    data: dict[str, Any] = {}
    for key, target in SEED_KEYS.items():
        value = get_path(model_config, target)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return data


_FIELD_TO_KEY = {_owner(target)[1]: key for key, target in SEED_KEYS.items()}


def seed_key_names(message: str) -> str:
    """``message`` with ModelConfig/TuningConfig field names (those with an underscore, which cannot be
    ordinary words) replaced by the seed keys a user typed, e.g. ``adapter_depth`` ->
    ``model.transformer_adapter.depth``."""
    names = sorted((n for n in _FIELD_TO_KEY if "_" in n), key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")(?![\w])")
    return pattern.sub(lambda m: _FIELD_TO_KEY[m.group(1)], message)
