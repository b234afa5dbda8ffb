"""Train widget: fine-tune the session's model on an annotation layer, with progress and a live curve.

All work runs in the :class:`~._training.TrainingController`'s worker; this widget only collects
settings and shows what the controller reports (progress bar, loss per batch, validation loss and
mIoU per epoch). Training again continues from the current model on all annotations so far.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QFormLayout, QVBoxLayout, QWidget

from ._annotate_widget import is_slide_layer
from ._annotations import is_trainable_labels
from ._curve import CurvePlot
from ._output_folder import OutputFolderRow
from ._qt_helpers import LayerCombo, button, dspin, group, row, spin
from ._run_state import RunState, sentence
from ._session import session_for
from ._torch_guard import guard_triton
from ._training import TrainSettings, training_controller


def _preimport() -> None:
    """Import what training needs now, while the widget opens, instead of inside the worker.

    A first import in the worker holds Python's import lock and the GIL in long stretches, which
    freezes the viewer for hundreds of milliseconds (peft comes in with every checkpoint save).
    """
    import contextlib
    import importlib

    for name in ("pfmseg_engine.training", "pfmseg_engine.data", "peft", "huggingface_hub"):
        with contextlib.suppress(ImportError):  # optional (peft only matters for LoRA/DoRA)
            importlib.import_module(name)


class TrainWidget(QWidget):
    """Start, pause and cancel fine-tuning; watch loss and validation score."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        guard_triton()
        _preimport()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.controller = training_controller(self.session)

        from pfmseg_engine.jobs import FineTuneSettings

        defaults = FineTuneSettings()  # the form starts at the engine's defaults
        self.image = LayerCombo(napari_viewer, is_slide_layer)
        self.annotations = LayerCombo(napari_viewer, is_trainable_labels)
        self.epochs = spin(defaults.epochs, 1, 10_000, tip="passes over the sampled patches")
        self.batch = spin(defaults.batch_size, 1, 512, tip="patches per batch")
        self.lr = dspin(defaults.learning_rate, 1e-6, 1.0, 1e-4, 6, tip="learning rate")
        self.samples = spin(defaults.samples_per_epoch, 1, 1_000_000, 16,
                            tip="patches drawn around annotated pixels per epoch")
        self.val_fraction = dspin(defaults.val_fraction, 0.0, 0.9, 0.05, 2,
                                  tip="share of annotated squares held out for validation (0: none)")
        self.predict_after = QCheckBox("predict the visible area when done")
        self.run_state = RunState("%v / %m batches")
        self.progress, self.status = self.run_state.progress, self.run_state.status
        self.output = OutputFolderRow(self.session, self.image.layer)
        self.image.layer_changed.connect(self.output.refresh)
        self.curve = CurvePlot()
        self.curve.add_series("step", "train loss (batch)", "#9ecae1")
        self.curve.add_series("train", "train loss (epoch)", "#1f77b4", markers=True)
        self.curve.add_series("val", "validation loss", "#ff7f0e", markers=True)
        self.curve.add_series("miou", "validation mIoU", "#2ca02c", right_axis=True, markers=True)

        self.train_button = button("Train", self.train, "train (continues from the current model)")
        self.pause_button = button("Pause", self.toggle_pause)
        self.cancel_button = button("Cancel", self.controller.cancel, "stop; the best model so far is kept")
        form = QFormLayout()
        form.addRow("slide", self.image)
        form.addRow("annotations", self.annotations)
        form.addRow("epochs", self.epochs)
        form.addRow("batch size", self.batch)
        form.addRow("learning rate", self.lr)
        form.addRow("patches / epoch", self.samples)
        form.addRow("validation share", self.val_fraction)
        form.addRow(self.predict_after)
        layout = QVBoxLayout(self)
        layout.addWidget(group("Data and schedule", form))
        layout.addWidget(self.output)
        layout.addWidget(row(self.train_button, self.pause_button, self.cancel_button))
        layout.addWidget(self.run_state)
        layout.addWidget(self.curve, 1)

        c = self.controller
        c.status.connect(self._on_status)
        c.step.connect(self._on_step)
        c.epoch.connect(self._on_epoch)
        c.started.connect(self._on_started)
        c.failed_to_start.connect(self._on_failed_to_start)
        c.finished.connect(self._on_finished)
        self.session.job_changed.connect(self._update_buttons)
        self.destroyed.connect(lambda *_: self._disconnect())
        self._update_buttons()

    def _disconnect(self) -> None:
        c = self.controller
        for signal, slot in ((c.status, self._on_status), (c.step, self._on_step), (c.epoch, self._on_epoch),
                             (c.started, self._on_started), (c.finished, self._on_finished),
                             (c.failed_to_start, self._on_failed_to_start),
                             (self.session.job_changed, self._update_buttons)):
            signal.disconnect(slot)

    def settings(self) -> TrainSettings:
        """The form as the engine's ``FineTuneSettings`` plus what the plugin does when training ends."""
        from pfmseg_engine.jobs import FineTuneSettings

        fine_tune = FineTuneSettings().with_overrides(
            epochs=self.epochs.value(), batch_size=self.batch.value(), learning_rate=self.lr.value(),
            samples_per_epoch=self.samples.value(), val_fraction=self.val_fraction.value())
        return TrainSettings(fine_tune, predict_when_done=self.predict_after.isChecked())

    def train(self) -> Any:
        """Start training with the form's settings; returns the worker (None if an error was shown)."""
        image, annotations = self.image.layer(), self.annotations.layer()
        if image is None or annotations is None:
            from pfmseg_engine import ConfigError

            from ._notify import notify_error

            notify_error(ConfigError("Choose a slide and an annotation layer (Annotate widget) first."), "Training")
            return None
        return self.controller.start(image, annotations, self.settings())

    def toggle_pause(self) -> None:
        if self.controller.paused:
            self.controller.resume()
        else:
            self.controller.pause()
        self._update_buttons()

    # --- controller events -------------------------------------------------------------------------
    def _on_started(self) -> None:
        self.curve.clear()
        self.run_state.begin(f"Training on: {self.controller.subject}")
        self._update_buttons()

    def _on_failed_to_start(self, message: str) -> None:
        self.run_state.fail(message)
        self._update_buttons()

    def _on_status(self, text: str) -> None:
        if text not in ("completed", "cancelled", "failed"):  # the end is shown by _on_finished
            self.run_state.say(text)
        self._update_buttons()

    def _on_step(self, info: Any) -> None:
        self.run_state.advance(info.epoch * info.batches + info.batch + 1, info.epochs * info.batches)
        self.curve.append("step", info.epoch + (info.batch + 1) / info.batches, info.loss)

    def _on_epoch(self, info: Any) -> None:
        self.curve.append("train", info.epoch, info.train_loss)
        self.curve.append("val", info.epoch, info.val_loss)
        self.curve.append("miou", info.epoch, info.metrics.get("mIoU"))
        score = f", validation mIoU {info.metrics['mIoU']:.3f}" if "mIoU" in info.metrics else ""
        self.run_state.say(f"Epoch {info.epoch}/{info.epochs}: train loss {info.train_loss:.4f}{score}"
                           f"{' (best so far)' if info.is_best else ''}.")

    def _on_finished(self, outcome: Any) -> None:
        self.run_state.finish(outcome.status, outcome.message or sentence(f"training {outcome.status}"))
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        running = self.controller.running
        self.train_button.setEnabled(not self.session.job)
        self.pause_button.setEnabled(running)
        self.cancel_button.setEnabled(running)
        self.pause_button.setText("Resume" if self.controller.paused else "Pause")
