"""The state one viewer's widgets share: the current model, its recipe, open slides, the running job.

napari creates each dock widget on its own, so the Model, Train and Predict widgets meet here: the
Model widget sets the recipe or loads a checkpoint, the Train widget trains ``session.model`` and the
Predict widget predicts with it. Only one job (building, training or predicting) uses the model at
a time; :meth:`Session.claim` enforces that, so the GUI never trains and predicts the same weights
concurrently. Lives as long as its viewer (weak reference), touched only on the GUI thread.
"""

from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from psygnal import Signal

from ._sample_data import cache_dir

DEFAULT_CLASSES = ("background", "tissue")


class BusyError(RuntimeError):
    """Another job already uses the model."""


@dataclass(frozen=True)
class ModelRecipe:
    """Everything of a ``ModelConfig`` except the classes, which come from the annotations.

    ``tuning`` holds the engine's ``TuningConfig`` settings as plain data (``TuningConfig.to_dict``
    keys; missing keys take the engine's defaults), so a recipe round-trips any model's settings
    without the plugin repeating the engine's field list, and without importing torch to hold one.
    """

    backbone: str = "uni_v1"
    weights: str | None = None
    tiny: bool = False
    tuning: dict[str, Any] = field(default_factory=lambda: {"strategy": "frozen"})
    head: str = "fast"
    input_size: int = 224
    mpp: float | None = 0.5

    @property
    def strategy(self) -> str:
        return str(self.tuning.get("strategy", "frozen"))

    def tuning_config(self) -> Any:
        """The engine ``TuningConfig`` (validated: unknown settings are a clear error)."""
        from pfmseg_engine import TuningConfig

        return TuningConfig.from_dict(self.tuning)

    def model_config(self, class_names: tuple[str, ...] | list[str], require_weights: bool = True) -> Any:
        """The engine ``ModelConfig`` of this recipe for ``class_names`` (validated by the engine).

        A full-size backbone without weights is refused: its random features would make every
        annotation hour useless, and the message says where weights come from.
        """
        from pfmseg_engine import ModelConfig, WeightsError, get_spec

        spec = get_spec(self.backbone)
        if require_weights and not self.tiny and not self.weights and not spec.from_scratch:
            hub = f" or 'hf-hub:{spec.hf_hub_id}' (needs 'hf auth login' and accepted terms)" \
                if spec.hf_hub_id else ""
            raise WeightsError(
                f"No weights for {spec.title}: give the downloaded checkpoint file{hub} in the Model widget, "
                "or tick 'tiny test model' to try the workflow with a small random-weight model."
            )
        return ModelConfig(backbone=self.backbone, weights=self.weights or None, tiny=self.tiny,
                           num_classes=len(class_names), class_names=tuple(class_names),
                           tuning=self.tuning_config(), head=self.head, input_size=self.input_size, mpp=self.mpp)

    @classmethod
    def from_config(cls, config: Any) -> ModelRecipe:
        return cls(backbone=config.backbone, weights=config.weights, tiny=config.tiny,
                   tuning=config.tuning.to_dict(), head=config.head, input_size=config.input_size, mpp=config.mpp)

    def with_changes(self, **changes: Any) -> ModelRecipe:
        """A copy with recipe fields and/or tuning settings (e.g. ``strategy=``, ``rank=``) changed."""
        own = {f.name for f in fields(self)}
        tuning = {k: v for k, v in changes.items() if k not in own}
        recipe = {k: v for k, v in changes.items() if k in own}
        if tuning:
            recipe["tuning"] = {**recipe.get("tuning", self.tuning), **tuning}
        return replace(self, **recipe)


@dataclass
class ModelState:
    """The model the widgets use and what is known about it."""

    model: Any = None
    source: str = ""
    epochs_trained: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class Session:
    """Per-viewer shared state. Signals are emitted on the GUI thread only."""

    model_changed = Signal(object)  # ModelState
    recipe_changed = Signal(object)  # ModelRecipe
    job_changed = Signal(str)  # "" when idle
    predict_requested = Signal(str)  # prediction mode, e.g. "view" (train widget -> predict)
    output_changed = Signal(object)  # the output folder the user chose (Path), or None for the default

    _counter = itertools.count(1)

    def __init__(self, viewer: Any):
        self._viewer = weakref.ref(viewer)
        self.state = ModelState()
        self.recipe = ModelRecipe()
        self.device = "auto"
        self.job = ""
        self._slides: dict[tuple[str, float | None], Any] = {}
        self.work_dir = cache_dir() / "sessions" / f"{os.getpid()}-{next(self._counter)}"
        self.controllers: dict[str, Any] = {}
        self.current_image: Any = None  # the slide layer the last job used
        self.class_colours: dict[str, list[int]] = {}  # class name -> RGB chosen while annotating
        viewer.layers.events.inserted.connect(self._on_layer_added)

    def _on_layer_added(self, event: Any) -> None:
        """A slide opened without µm/px: say, once, where to enter it (its layers stay in pixels until then)."""
        layer = event.value
        meta = layer.metadata.get("pfmseg", {})
        if meta.get("kind") == "slide" and not meta.get("mpp"):
            from ._notify import notify_warning
            from ._slides import MPP_FIELD

            notify_warning(f"Slide '{layer.name}' has no microns per pixel in its file: enter it in {MPP_FIELD} "
                           "(remembered for this file). Until then it is shown in pixels and cannot be "
                           "annotated, trained on or predicted.")

    @property
    def viewer(self) -> Any:
        viewer = self._viewer()
        if viewer is None:
            raise RuntimeError("The viewer of this pfmseg session was closed.")
        return viewer

    @property
    def model(self) -> Any:
        return self.state.model

    # --- model -------------------------------------------------------------------------------------
    def set_model(self, model: Any, source: str, epochs_trained: int = 0,
                  metrics: dict[str, float] | None = None) -> None:
        self.state = ModelState(model, source, epochs_trained, dict(metrics or {}))
        if model is not None:
            self.recipe = ModelRecipe.from_config(model.config)
            self.recipe_changed.emit(self.recipe)
        self.model_changed.emit(self.state)

    def set_recipe(self, recipe: ModelRecipe) -> None:
        self.recipe = recipe
        self.recipe_changed.emit(recipe)

    # --- jobs --------------------------------------------------------------------------------------
    def claim(self, job: str) -> None:
        """Mark ``job`` as using the model; raise :class:`BusyError` if another job does."""
        if self.job:
            raise BusyError(f"The model is busy ({self.job}); wait for it to finish or cancel it first.")
        self.job = job
        self.job_changed.emit(job)

    def release(self, job: str) -> None:
        if self.job == job:
            self.job = ""
            self.job_changed.emit("")

    # --- slides ------------------------------------------------------------------------------------
    def slide_for(self, layer: Any, mpp: float | None = None) -> Any:
        """The engine :class:`Slide` behind an image layer (opened once per path and mpp)."""
        from ._slides import slide_from_layer

        meta = layer.metadata.get("pfmseg", {})
        mpp = mpp or meta.get("mpp")
        key = (meta.get("path") or f"layer:{id(layer.data)}", mpp)
        if key not in self._slides:
            self._slides[key] = slide_from_layer(layer, mpp)
        return self._slides[key]

    def output_root(self, image: Any = None) -> Path:
        """Where outputs go: the folder the user chose (remembered), else ``pfmseg-output`` beside the
        slide of ``image`` when that folder is writable, else this session's folder in the cache."""
        from . import _preferences

        chosen = _preferences.output_folder()
        if chosen is not None:
            return chosen
        path = image.metadata.get("pfmseg", {}).get("path") if image is not None else None
        if path:
            folder = Path(path).expanduser().parent
            if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
                return folder / "pfmseg-output"
        return self.work_dir

    def output_dir(self, kind: str, image: Any = None) -> Path:
        """``kind``'s folder under :meth:`output_root` (created)."""
        path = self.output_root(image if image is not None else self.current_image) / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def choose_output_folder(self, folder: str | Path | None) -> None:
        """Remember ``folder`` as the output folder (None: back to the default) and tell every dock."""
        from . import _preferences

        _preferences.set_output_folder(folder)
        self.output_changed.emit(_preferences.output_folder())


    def shutdown(self) -> None:
        """Stop running jobs (the viewer closed): training stops after its batch, prediction after its chunk."""
        for controller in self.controllers.values():
            cancel = getattr(controller, "cancel", None)
            if callable(cancel):
                cancel()


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer: Any) -> Session:
    """The session of ``viewer`` (created on first use)."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = Session(viewer)
        weakref.finalize(viewer, session.shutdown)
    return session
