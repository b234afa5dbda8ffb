"""Fine-tuning from an image layer and an annotation layer, in a napari ``thread_worker`` generator.

The GUI thread only gathers inputs (layers, settings) and turns worker events into signals; the
worker builds the model when needed, builds the engine's sparse-label dataset and trainer, and
yields the events of the engine's ``Trainer.iter_fit``. Pause, resume and cancel go through the
engine's cancel token, which the trainer checks between batches. When the run ends the worker loads
its best checkpoint (else the last completed epoch, else the weights it started from), so the model
left behind is always a consistent one.
Training again continues from the current model with all annotations painted so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal import Signal

from ._controller import WorkerController
from ._notify import guarded_generator, notify_error, notify_info


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 5
    batch_size: int = 4
    learning_rate: float = 1e-3
    samples_per_epoch: int = 64
    val_fraction: float = 0.2
    seed: int = 42
    predict_when_done: bool = False


@dataclass
class TrainOutcome:
    """How a run ended: ``status`` is completed, cancelled or failed."""

    status: str
    epochs: int = 0
    best_metric: float | None = None
    restored: str = ""
    output_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


def training_sections(settings: TrainSettings, output_dir: Path, device: str) -> dict[str, dict[str, Any]]:
    """The Train widget's settings as engine config sections (merged over the model's own config).

    Data loading stays in the training thread (``num_workers=0``): worker processes forked from a
    Qt application are unsafe, and the patches come from an in-memory slide reader anyway. The
    per-epoch matplotlib curve is off: it holds the GIL long enough to freeze the viewer, and the
    widget draws the curve live instead.
    """
    output_dir = Path(output_dir)
    return {
        "system": {"num_workers": 0, "pin_memory": False, "seed": settings.seed, "device": device},
        "training": {"epochs": settings.epochs, "batch_size": settings.batch_size,
                     "learning_rate": settings.learning_rate, "samples_per_epoch": settings.samples_per_epoch,
                     "scheduler": {"type": "cosine", "warmup_epochs": min(1.0, settings.epochs / 4)}},
        "validation": {"eval_interval": 1, "batch_size": settings.batch_size},
        "logging": {"log_dir": str(output_dir.parent), "experiment_name": output_dir.name, "plot_history": False},
        "visualization": {"save_predictions": False, "num_vis_samples": 0},
    }


@guarded_generator
def _run(model: Any, build: Any, sections: dict[str, Any], source: Any, labels: Any, settings: TrainSettings,
         device: str, cancel: Any):
    """The worker: (build model,) build the trainer, yield its events, restore the best weights."""
    from pfmseg_engine.checkpoint import load_into, read_checkpoint
    from pfmseg_engine.training import TrainConfig, build_annotation_trainer

    if model is None:
        yield ("status", "building the model")
        model = build()
    yield ("status", "indexing annotations")
    config = TrainConfig.from_model_config(model.config, **sections)
    start_state = model.trainable_state_dict()
    trainer = build_annotation_trainer(config, [source], [labels], model=model,
                                       validation_share=settings.val_fraction, device=device, cancel=cancel)
    yield ("model", model)
    held = trainer.val_source.num_images() if trainer.val_source is not None else 0
    yield ("status", f"training ({held} validation region{'s' * (held != 1)})")
    result = yield from trainer.iter_fit()
    restored = "final weights"
    if result.best_checkpoint.is_file():
        load_into(model, read_checkpoint(result.best_checkpoint), source="best checkpoint")
        restored = f"best epoch {result.best_epoch}"
    elif result.status == "cancelled":
        if result.last_checkpoint.is_file():
            load_into(model, read_checkpoint(result.last_checkpoint), source="last checkpoint")
            restored = f"last completed epoch {result.epochs_completed}"
        else:
            model.load_trainable_state_dict(start_state)
            restored = "weights from before this run"
    model.eval()
    return model, result, restored


def training_controller(session: Any) -> TrainingController:
    """The session's training controller (one per viewer, shared by every Train widget)."""
    if "training" not in session.controllers:
        session.controllers["training"] = TrainingController(session)
    return session.controllers["training"]


class TrainingController(WorkerController):
    """Starts, pauses and cancels training runs of one session; widgets listen to its signals."""

    claim_name, job_title = "training", "Training"
    step = Signal(object)  # engine StepInfo
    epoch = Signal(object)  # engine EpochInfo
    finished = Signal(object)  # TrainOutcome

    def _start(self, image: Any, annotations: Any, settings: TrainSettings) -> Any:
        from napari.qt.threading import create_worker

        from pfmseg_engine import resolve_device
        from pfmseg_engine.training import CancelToken
        from pfmseg_engine.training.outputs import new_run_dir

        from ._annotations import classes_of, training_pairs

        session = self.session
        session.claim("training")
        session.current_image = image
        device = str(resolve_device(session.device))
        slide = session.slide_for(image)
        slide.require_mpp()
        source, labels, plan = training_pairs(slide, image, annotations)
        names, colours = classes_of(annotations)
        session.class_colours.update({n: list(c) for n, c in zip(names, colours, strict=True)})
        top = int(labels.max())
        if top > len(names):
            from pfmseg_engine import DataError

            raise DataError(f"Annotations use label {top} but only {len(names)} classes are defined; add classes in "
                            "the Annotate widget or erase those labels.")
        model = session.model
        recipe = session.recipe.with_changes(mpp=round(plan.mpp, 6))
        if model is not None:
            current = type(recipe).from_config(model.config).with_changes(mpp=recipe.mpp)
            if current != recipe:
                notify_info("The Model widget's settings differ from the current model; building a new model.")
                model = None
            elif tuple(model.config.class_names) != tuple(names):
                notify_info(f"The model's classes {list(model.config.class_names)} differ from the annotations' "
                            f"{names}; building a new model for these classes.")
                model = None
        config = recipe.model_config(names)  # validated now, on the GUI thread: errors show at once

        def build() -> Any:
            from pfmseg_engine import build_model

            return build_model(config)

        self.runs += 1
        output_dir = new_run_dir(session.output_dir("training"))  # the engine's unnamed-run folders
        sections = training_sections(settings, output_dir, device)
        self.cancel_token = CancelToken()
        self.settings = settings
        self.output_dir = output_dir
        worker = create_worker(_run, model, build, sections, source, labels, settings, device,
                               self.cancel_token, _start_thread=False)
        return self._launch(worker, "starting")

    # --- control (GUI thread) ------------------------------------------------------------------------
    def pause(self) -> None:
        """Hold the trainer before its next batch (the engine's token; no CPU used while paused)."""
        if self.cancel_token is not None and self.running:
            self.cancel_token.pause()
            self.status.emit("paused")

    def resume(self) -> None:
        if self.cancel_token is not None and self.running:
            self.cancel_token.resume()
            self.status.emit("training")

    @property
    def paused(self) -> bool:
        return self.cancel_token is not None and self.running and self.cancel_token.paused

    # --- worker events (GUI thread) ------------------------------------------------------------------
    def _on_event(self, event: tuple[str, Any]) -> None:
        kind, value = event
        if kind == "step":
            self.step.emit(value)
        elif kind == "epoch":
            self.epoch.emit(value)
        elif kind == "status":
            self.status.emit(value)
        elif kind == "model" and self.session.model is not value:
            self.session.set_model(value, "new (training)")

    def _on_result(self, value: tuple[Any, Any, str]) -> None:
        model, result, restored = value
        state = self.session.state
        epochs = (state.epochs_trained if state.model is model else 0) + result.epochs_completed
        metrics = {k: v for k, v in (result.history[-1] if result.history else {}).items()
                   if isinstance(v, (int, float)) and "_Class_" not in k}
        outcome = TrainOutcome(result.status, result.epochs_completed, result.best_metric, restored,
                               result.output_dir, list(result.history))
        self._outcome = outcome
        self.session.set_model(model, f"trained ({result.output_dir})", epochs, metrics)
        outcome.message = (f"Training {result.status} after {result.epochs_completed} epoch(s); kept the "
                           f"{restored}.")
        notify_info(outcome.message)

    def _on_error(self, exc: BaseException) -> None:
        self._outcome = TrainOutcome("failed", message=notify_error(exc, "Training"))

    def _on_finished(self) -> None:
        outcome = self._outcome or TrainOutcome("failed", message="Training stopped.")
        self._outcome = None
        self.worker = None
        self.session.release("training")
        self.status.emit(outcome.status)
        self.finished.emit(outcome)
        if outcome.status in ("completed", "cancelled") and self.settings.predict_when_done:
            from ._prediction import prediction_controller

            prediction_controller(self.session)  # listens even when no Predict widget is open
            self.session.predict_requested.emit("view")
