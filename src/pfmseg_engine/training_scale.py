"""Does a prediction run at the scale its model was trained at? (torch-free)

A model learns tissue at the size it saw it. Native-resolution training crops show the training images
as they are, so the model's scale is the images' µm/px (``model.mpp``). Area-scale crops (the seed
framework's RandomResizedCrop, ``protocol: densebench``) resize a share of each image *down* to the
crop: a 1024 px tile cropped to 224 is seen about 3.8x smaller, so such a model has seen 0.25 µm/px
tiles at about 0.95 µm per model pixel, and run over a slide at 0.25 µm/px it sees every structure
3.8x larger than it learnt it.

:class:`TrainingScale` records that scale (checkpoints store it under ``metadata["training_scale"]``;
training computes it from the crop geometry, see :func:`pfmseg_engine.data.augment.crop_shrink`).
:func:`check_training_scale` compares it with a prediction's resolution and returns a structured
:class:`ScaleMismatch` or None; front ends only word it (the CLI names ``--target_mpp``, the napari
plugin its resolution field, :func:`warn_training_scale` the Python setting) so the decision is made
in one place.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from .errors import TrainingScaleWarning

#: A prediction resolution within this relative factor of the training scale (either way) is fine:
#: 0.25 means anything from 1/1.25 to 1.25 times the training µm/px.
TOLERANCE = 0.25

CROP_WORDS = {
    "native": "native-resolution training crops",
    "zoom": "training crops with zoom jitter",
    "area": "area-scale training crops",
}


@dataclass(frozen=True)
class TrainingScale:
    """The scale a model was trained at.

    ``shrink``: source pixels per model pixel (per side) of a typical training crop, the median over
    the crops training draws (1: native resolution; 3.8: the source was seen 3.8x smaller).
    ``shrink_range``: the smallest and largest shrink a crop can have. ``data_mpp``: µm/px of the
    training images, None when unknown (then only the shrink is known). ``crop``: "native", "zoom" or
    "area" (see :data:`CROP_WORDS`).
    """

    shrink: float
    data_mpp: float | None = None
    shrink_range: tuple[float, float] | None = None
    crop: str = "native"

    @property
    def mpp(self) -> float | None:
        """µm of tissue per model pixel during training; None when the training images' µm/px is unknown."""
        return None if self.data_mpp is None else self.data_mpp * self.shrink

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoint metadata (``mpp`` is stored too, for people reading the file)."""
        return {"mpp": self.mpp, "data_mpp": self.data_mpp, "shrink": self.shrink,
                "shrink_range": list(self.shrink_range) if self.shrink_range else None, "crop": self.crop}

    @classmethod
    def from_dict(cls, data: Any) -> TrainingScale | None:
        """The record ``to_dict`` wrote; None for anything else (checkpoints from before it was recorded)."""
        if not isinstance(data, Mapping) or not _positive(data.get("shrink")):
            return None
        span = data.get("shrink_range")
        mpp = data.get("data_mpp")
        return cls(shrink=float(data["shrink"]), data_mpp=float(mpp) if _positive(mpp) else None,
                   shrink_range=(float(span[0]), float(span[1])) if span and len(span) == 2 else None,
                   crop=str(data.get("crop") or "native"))

    def describe(self) -> str:
        """One phrase for people, e.g. '0.946 µm per model pixel (0.25 µm/px images shrunk 3.78x by area-scale
        training crops)'."""
        how = CROP_WORDS.get(self.crop, f"{self.crop} training crops")
        native = math.isclose(self.shrink, 1.0, rel_tol=1e-3)
        shrunk = "seen at native size" if native else f"shrunk {self.shrink:.3g}x by {how}"
        if self.mpp is None:
            return f"training images of unknown µm/px, {shrunk}"
        return f"{self.mpp:.3g} µm per model pixel ({self.data_mpp:.3g} µm/px images {shrunk})"


@dataclass(frozen=True)
class ScaleMismatch:
    """A prediction resolution that differs from the model's training scale by more than the tolerance."""

    training: TrainingScale
    prediction_mpp: float

    @property
    def training_mpp(self) -> float:
        """The resolution that matches training (µm/px); always known for a mismatch."""
        return float(self.training.mpp)  # type: ignore[arg-type]

    @property
    def suggested_mpp(self) -> float:
        """:attr:`training_mpp` to three significant digits: what a person types."""
        return float(f"{self.training_mpp:.3g}")

    @property
    def factor(self) -> float:
        """How many times larger (> 1) or smaller (< 1) tissue looks to the model than in training."""
        return self.training_mpp / self.prediction_mpp

    def summary(self) -> str:
        """What is wrong, without saying which setting fixes it (front ends add that in their words)."""
        looks = (f"{self.factor:.3g}x larger" if self.factor > 1 else f"{1 / self.factor:.3g}x smaller")
        return (f"The model was trained at {self.training.describe()}, but this prediction runs at "
                f"{self.prediction_mpp:.3g} µm/px, so tissue looks {looks} to it than in training and results "
                "may be poor.")


def check_training_scale(training: TrainingScale | None, prediction_mpp: float | None,
                         tolerance: float = TOLERANCE) -> ScaleMismatch | None:
    """A :class:`ScaleMismatch` when ``prediction_mpp`` and the training scale differ by more than ``tolerance``.

    The comparison is symmetric (the larger over the smaller, minus one), so predicting at half or at
    twice the training scale are equally far off. None when either side is unknown: a model that
    records no scale (older checkpoints), training images of unknown µm/px, or a prediction resolution
    that is not known.
    """
    if training is None or training.mpp is None or not prediction_mpp or prediction_mpp <= 0:
        return None
    ratio = max(training.mpp, prediction_mpp) / min(training.mpp, prediction_mpp)
    return ScaleMismatch(training, float(prediction_mpp)) if ratio > 1.0 + tolerance else None


def warn_training_scale(training: TrainingScale | None, prediction_mpp: float | None,
                        stacklevel: int = 2) -> ScaleMismatch | None:
    """:func:`check_training_scale`, issued as a :class:`~pfmseg_engine.errors.TrainingScaleWarning`
    worded for Python users (the warning carries the mismatch as ``.mismatch``)."""
    mismatch = check_training_scale(training, prediction_mpp)
    if mismatch is not None:
        message = (f"{mismatch.summary()} Predict with SlideInferenceConfig(target_mpp={mismatch.suggested_mpp:g}) "
                   "to match training.")
        warnings.warn(TrainingScaleWarning(message, mismatch), stacklevel=stacklevel + 1)
    return mismatch


def training_scale_of(model: Any) -> TrainingScale | None:
    """The training scale a model carries (set when it is trained or loaded from a checkpoint), or None."""
    scale = getattr(model, "training_scale", None)
    return scale if isinstance(scale, TrainingScale) else None


def attach_training_scale(model: Any, scale: TrainingScale | None) -> None:
    """Let ``model`` carry ``scale``, so inference can check it and saving the model keeps it."""
    model.training_scale = scale


def _positive(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


__all__ = ["TOLERANCE", "ScaleMismatch", "TrainingScale", "attach_training_scale", "check_training_scale",
           "training_scale_of", "warn_training_scale"]
