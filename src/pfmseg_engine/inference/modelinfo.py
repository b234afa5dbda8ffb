"""What inference needs to know about a model (:class:`ModelInfo`), read from the model or its config.

Torch-free and below both the planner (:mod:`.plan`) and the model runner (:mod:`.runner`), which
each read it: neither needs the other to describe a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..classes import default_class_names
from ..errors import ConfigError
from ..training_scale import TrainingScale, training_scale_of


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs to know about a model, whatever class it is (no weights, no torch)."""

    num_classes: int
    patch_size: int
    class_names: tuple[str, ...]
    input_size: int | None
    mpp: float | None
    training_scale: TrainingScale | None = None  # µm per model pixel in training (see training_scale)

    @classmethod
    def from_model(cls, model: Any) -> ModelInfo:
        """Classes, patch size, training window and resolution of a model (its ``config`` when present)."""
        for attr in ("num_classes", "patch_size"):
            if not isinstance(getattr(model, attr, None), int):
                raise ConfigError(
                    f"Model {type(model).__name__} has no integer '{attr}' attribute; inference needs "
                    "'num_classes' and 'patch_size' (SegmentationModel has both)."
                )
        config = getattr(model, "config", None)
        names = tuple(getattr(config, "class_names", None) or getattr(model, "class_names", None) or ())
        if len(names) != model.num_classes:
            names = default_class_names(model.num_classes)
        input_size = getattr(config, "input_size", None)
        mpp = getattr(config, "mpp", None)
        return cls(model.num_classes, model.patch_size, names,
                   int(input_size) if input_size else None, float(mpp) if mpp else None, training_scale_of(model))

    @classmethod
    def from_model_config(cls, config: Any) -> ModelInfo:
        """The same from a model's config (a ``ModelConfig`` or the dict a checkpoint stores), without
        building the model: the patch size comes from the backbone registry."""
        from ..backbones.registry import get_spec

        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        backbone, num_classes = get("backbone"), get("num_classes")
        if not backbone or not isinstance(num_classes, int):
            raise ConfigError("A model config needs 'backbone' and an integer 'num_classes' to plan inference.")
        names = tuple(get("class_names") or ())
        if len(names) != num_classes:
            names = default_class_names(num_classes)
        input_size, mpp = get("input_size"), get("mpp")
        return cls(num_classes, int(get_spec(backbone).patch_size), names,
                   int(input_size) if input_size else None, float(mpp) if mpp else None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        return data


__all__ = ["ModelInfo"]
