"""Fine-tuning from an image layer and an annotation layer: the engine's ``FineTune`` job in a napari worker.

The GUI thread only gathers inputs (layers, the form's :class:`~pfmseg_engine.jobs.FineTuneSettings`) and
turns the job's events into signals; the job, in a napari ``thread_worker`` generator, builds the model
when needed, the engine's sparse-label dataset and trainer, trains, and loads its best checkpoint (else
the last completed epoch, else the weights it started from), so the model left behind is always a
consistent one. Pause, resume and cancel go through the job's cancel token, which the trainer checks
between batches. Training again continues from the current model with all annotations painted so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal import Signal

from ._controller import WorkerController
from ._notify import guarded_generator, notify_error, notify_info


def _default_fine_tune() -> Any:
    from pfmseg_engine.jobs import FineTuneSettings

    return FineTuneSettings()


@dataclass(frozen=True)
class TrainSettings:
    """The Train form: the engine's fine-tuning settings plus what the plugin does afterwards."""

    fine_tune: Any = field(default_factory=_default_fine_tune)  # pfmseg_engine.jobs.FineTuneSettings
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


@guarded_generator
def _run(job: Any):
    """The worker: the job's events as (kind, value) pairs; returns its outcome."""
    from pfmseg_engine.jobs import Epoch, ModelReady, Status, Step

    events = job.iter_run()
    try:
        while True:
            try:
                event = next(events)
            except StopIteration as stop:
                return stop.value
            if isinstance(event, Status):
                yield ("status", event.text)
            elif isinstance(event, ModelReady):
                yield ("model", event.model)
            elif isinstance(event, Step):
                yield ("step", event.info)
            elif isinstance(event, Epoch):
                yield ("epoch", event.info)
    finally:
        events.close()


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
        from pfmseg_engine.training.outputs import new_run_dir

        from ._annotations import classes_of, training_pairs
        from ._slides import require_slide_mpp

        session = self.session
        session.claim("training")
        session.current_image = image
        device = str(resolve_device(session.device))
        slide = session.slide_for(image)
        require_slide_mpp(slide, image)
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

        from pfmseg_engine.jobs import FineTune

        self.runs += 1
        output_dir = new_run_dir(session.output_dir("training", image))  # the engine's unnamed-run folders
        fine_tune = settings.fine_tune.with_overrides(device=device)
        job = FineTune.on_annotations(model, [source], [labels], fine_tune, output_dir=output_dir,
                                      build=None if model is not None else build)
        self.cancel_token = job.token
        self.settings = settings
        self.output_dir = output_dir
        worker = create_worker(_run, job, _start_thread=False)
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

    def _on_result(self, value: Any) -> None:
        model, result, restored = value.model, value.result, value.restored
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
