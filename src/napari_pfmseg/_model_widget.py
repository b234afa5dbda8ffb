"""Model widget: pick a PFM from the registry, its weights, a tuning strategy and a device; load/save.

Every backbone shown comes from the engine's registry (``spec_row``), so a new model is a new row in
the engine's table and appears here without a code change. Building and loading run in worker
threads (a PFM checkpoint is gigabytes); the model itself lives in the viewer's session, where the
Train and Predict widgets find it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLineEdit, QVBoxLayout, QWidget

from ._notify import Failure, guarded, notify_error, notify_info
from ._qt_helpers import button, dspin, group, open_file, row, save_file, spin, wrapped
from ._session import DEFAULT_CLASSES, BusyError, ModelRecipe, session_for
from ._torch_guard import guard_triton

CHECKPOINT_FILTER = "pfmseg checkpoints (*.pt *.pth *.ckpt);;All files (*)"
WEIGHTS_FILTER = "Weights (*.safetensors *.bin *.pth *.pt);;All files (*)"


def weights_status(spec: Any, weights: str) -> str:
    """Whether weights are at hand (a local file, the local hub cache, or neither), in the engine's words."""
    from pfmseg_engine.backbones.availability import weights_status as engine_weights_status

    return engine_weights_status(spec, weights).describe()


def describe_spec(spec: Any, weights: str) -> str:
    """The registry row of ``spec`` as rich text (what ``pfmseg models`` prints, one backbone)."""
    from pfmseg_engine.commands.models import spec_row

    row_data = spec_row(spec)
    params = row_data["params"] / 1e6
    mean = ", ".join(f"{v:.3g}" for v in row_data["mean"])
    std = ", ".join(f"{v:.3g}" for v in row_data["std"])
    lines = [
        f"<b>{row_data['title']}</b> ({row_data['architecture']})",
        f"dim {row_data['embed_dim'] or '-'} · patch {row_data['patch_size']} · "
        f"{'' if row_data['params_exact'] else '~'}{params:,.1f} M params",
        f"normalisation mean ({mean}) std ({std})",
        f"weights: {weights_status(spec, weights)}",
    ]
    if row_data["notes"]:
        lines.append(f"<i>{row_data['notes']}</i>")
    return "<br>".join(lines)


class ModelWidget(QWidget):
    """Choose, build, load and save the segmentation model of this viewer."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        guard_triton()
        import huggingface_hub  # noqa: F401  heavy imports now, not while a model builds in a worker
        import timm  # noqa: F401

        from pfmseg_engine import STRATEGIES, TuningConfig, list_backbones
        from pfmseg_engine.heads import HEADS

        defaults = TuningConfig()  # every default comes from the engine's one declaration

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.strategies = STRATEGIES
        self.worker: Any = None

        self.backbone = QComboBox()
        self.backbone.addItems(list_backbones())
        self.info = wrapped()
        self.weights = QLineEdit()
        self.weights.setPlaceholderText("weights file, or hf-hub:<repo> (empty: the published repo)")
        self.tiny = QCheckBox("tiny test model (small, random weights)")
        self.strategy = QComboBox()
        self.strategy.addItems(list(STRATEGIES))
        self.strategy_info = wrapped()
        self.rank = spin(defaults.rank, 1, 512, tip="LoRA/DoRA rank")
        self.alpha = dspin(defaults.alpha, 0.1, 1024.0, 1.0, 1, tip="LoRA/DoRA alpha")
        self.dropout = dspin(defaults.dropout, 0.0, 0.9, 0.05, 2, tip="LoRA/DoRA dropout")
        self.lora_mlp = QCheckBox("also adapt MLP layers")
        self.lora_mlp.setChecked(defaults.lora_mlp)
        self.default_channels = list(defaults.adapter_channels)
        self.channels = QLineEdit(", ".join(str(c) for c in defaults.adapter_channels))
        self.channels.setToolTip("widths of the small CNN adapter's 1/2, 1/4 and 1/8 stages")
        self.adapter_depth = spin(defaults.adapter_depth, 1, 12, tip="Transformer adapter blocks")
        self.head = QComboBox()
        self.head.addItems(list(HEADS))
        self.input_size = spin(224, 8, 4096, 16, tip="training window (pixels), a multiple of the patch size")
        self.mpp = dspin(0.5, 0.05, 64.0, 0.25, 3, tip="resolution the model works at (um/px)")
        self.device = QComboBox()
        from pfmseg_engine import DEVICES

        self.device.addItems(list(DEVICES))
        self.status = wrapped("No model yet.")

        form = QFormLayout()
        form.addRow("backbone", self.backbone)
        form.addRow(self.info)
        form.addRow("weights", row(self.weights, button("…", self._browse_weights, "choose a weights file")))
        form.addRow(self.tiny)
        tuning = QFormLayout()
        tuning.addRow("strategy", self.strategy)
        tuning.addRow(self.strategy_info)
        self.lora_rows: list[tuple[str, QWidget]] = [("rank", self.rank), ("alpha", self.alpha),
                                                     ("dropout", self.dropout), ("", self.lora_mlp)]
        for label, widget in self.lora_rows:
            tuning.addRow(label, widget)
        tuning.addRow("adapter widths", self.channels)
        tuning.addRow("adapter depth", self.adapter_depth)
        self.tuning_form = tuning
        other = QFormLayout()
        other.addRow("head", self.head)
        other.addRow("input size (px)", self.input_size)
        other.addRow("resolution (µm/px)", self.mpp)
        other.addRow("device", self.device)
        layout = QVBoxLayout(self)
        layout.addWidget(group("Backbone", form))
        layout.addWidget(group("Tuning", tuning))
        layout.addWidget(group("Model", other))
        layout.addWidget(row(button("Build model", self.build, "build the model now (else training builds it)"),
                             button("Load checkpoint…", self._load_dialog),
                             button("Save model…", self._save_dialog)))
        layout.addWidget(self.status)
        layout.addStretch(1)

        for signal in (self.backbone.currentIndexChanged, self.strategy.currentIndexChanged,
                       self.head.currentIndexChanged, self.device.currentIndexChanged,
                       self.rank.valueChanged, self.alpha.valueChanged, self.dropout.valueChanged,
                       self.adapter_depth.valueChanged, self.input_size.valueChanged, self.mpp.valueChanged,
                       self.tiny.toggled, self.lora_mlp.toggled, self.weights.editingFinished,
                       self.channels.editingFinished):
            signal.connect(self._on_edit)
        self.session.recipe_changed.connect(self._show_recipe)
        self.session.model_changed.connect(self._show_model)
        self._show_recipe(self.session.recipe)
        self._show_model(self.session.state)

    # --- recipe <-> form -----------------------------------------------------------------------------
    def recipe(self) -> ModelRecipe:
        """The settings in the form, as a recipe (not validated yet).

        A from-scratch baseline (``unet``) takes no weights, strategy or head: the recipe holds
        strategy 'full', the default head and no weights, whatever the disabled fields show.
        """
        from pfmseg_engine import get_spec

        scratch = get_spec(self.backbone.currentText()).from_scratch
        channels = tuple(int(c) for c in self.channels.text().replace(",", " ").split() if c.strip())
        tuning = {  # settings the form does not show (e.g. from a loaded checkpoint) are kept
            **self.session.recipe.tuning,
            "strategy": "full" if scratch else self.strategy.currentText(), "rank": self.rank.value(),
            "alpha": self.alpha.value(),
            "dropout": self.dropout.value(), "lora_mlp": self.lora_mlp.isChecked(),
            "adapter_channels": list(channels) if len(channels) == 3 else self.default_channels,
            "adapter_depth": self.adapter_depth.value(),
        }
        return ModelRecipe(
            backbone=self.backbone.currentText(), weights=None if scratch else self.weights.text().strip() or None,
            tiny=self.tiny.isChecked(), tuning=tuning, head=ModelRecipe.head if scratch else self.head.currentText(),
            input_size=self.input_size.value(), mpp=self.mpp.value(),
        )

    def _show_recipe(self, recipe: ModelRecipe) -> None:
        widgets = (self.backbone, self.strategy, self.head, self.rank, self.alpha, self.dropout, self.adapter_depth,
                   self.input_size, self.mpp, self.tiny, self.lora_mlp, self.weights, self.channels)
        blocked = [w.blockSignals(True) for w in widgets]
        self.backbone.setCurrentText(recipe.backbone)
        self.weights.setText(recipe.weights or "")
        self.tiny.setChecked(recipe.tiny)
        tuning = recipe.tuning_config()
        self.strategy.setCurrentText(tuning.strategy)
        self.rank.setValue(tuning.rank)
        self.alpha.setValue(tuning.alpha)
        self.dropout.setValue(tuning.dropout)
        self.lora_mlp.setChecked(tuning.lora_mlp)
        self.channels.setText(", ".join(str(c) for c in tuning.adapter_channels))
        self.adapter_depth.setValue(tuning.adapter_depth)
        self.head.setCurrentText(recipe.head)
        self.input_size.setValue(recipe.input_size)
        self.mpp.setValue(recipe.mpp or 0.5)
        for widget, was in zip(widgets, blocked, strict=True):
            widget.blockSignals(was)
        self._update_info()

    def _on_edit(self, *_: Any) -> None:
        self.session.device = self.device.currentText()
        recipe = self.recipe()
        self._update_info()
        if recipe != self.session.recipe:
            self.session.recipe = recipe  # no signal: the form already shows it

    def _update_info(self) -> None:
        from pfmseg_engine import get_spec

        spec = get_spec(self.backbone.currentText())
        self.input_size.setSingleStep(spec.patch_size)
        self.info.setText(describe_spec(spec, self.weights.text().strip()))
        scratch = spec.from_scratch  # unet: every weight trains; strategy, head and weights do not apply
        for widget in (self.strategy, self.head, self.weights):
            widget.setEnabled(not scratch)
        if scratch and self.strategy.currentText() != "full":
            was = self.strategy.blockSignals(True)
            self.strategy.setCurrentText("full")
            self.strategy.blockSignals(was)
        strategy = self.strategy.currentText()
        self.strategy_info.setText(
            f"{spec.name} is trained from scratch: every weight trains (strategy 'full'); tuning strategies, "
            "heads and backbone weights do not apply." if scratch else self.strategies[strategy].description)
        lora = strategy in ("lora", "dora")
        for _label, lora_widget in self.lora_rows:
            self.tuning_form.setRowVisible(lora_widget, lora)
        self.tuning_form.setRowVisible(self.channels, strategy == "cnn_adapter_small")
        self.tuning_form.setRowVisible(self.adapter_depth, strategy == "transformer_adapter")

    def _show_model(self, state: Any) -> None:
        model = state.model
        if model is None:
            self.status.setText("No model yet: <b>Build model</b>, load a checkpoint, or train (builds one).")
            return
        c = model.config
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in state.metrics.items() if k in ("mIoU", "Mean_Dice"))
        head = "own decoder" if getattr(getattr(model, "spec", None), "from_scratch", False) else f"{c.head} head"
        self.status.setText(
            f"<b>Current model</b>: {c.backbone}{' (tiny)' if c.tiny else ''}, {c.tuning.strategy}, {head}, "
            f"{c.num_classes} classes ({', '.join(c.class_names)}), {c.input_size} px at {c.mpp} µm/px; "
            f"{state.epochs_trained} epochs trained{'; ' + metrics if metrics else ''}. Source: {state.source}")

    def _class_names(self) -> tuple[str, ...]:
        from ._annotations import classes_of, is_annotation_layer

        layers = [layer for layer in self.viewer.layers if is_annotation_layer(layer)]
        active = self.viewer.layers.selection.active
        layer = active if active in layers else (layers[-1] if layers else None)
        return tuple(classes_of(layer)[0]) if layer is not None else DEFAULT_CLASSES

    # --- actions ---------------------------------------------------------------------------------------
    def _start(self, job: str, function: Any, *args: Any, on_done: Any) -> Any:
        from napari.qt.threading import create_worker

        try:
            self.session.claim(job)
        except BusyError as exc:
            notify_error(exc, job.capitalize())
            return None
        worker = create_worker(guarded(function), *args, _start_thread=False)

        def returned(value: Any) -> None:
            if isinstance(value, Failure):
                notify_error(value.exc, job.capitalize())
            else:
                on_done(value)

        worker.returned.connect(returned)
        worker.finished.connect(lambda: self._finished(job))
        self.worker = worker
        self.status.setText(f"{job}…")
        worker.start()
        return worker

    def _finished(self, job: str) -> None:
        self.worker = None
        self.session.release(job)
        self._show_model(self.session.state)

    def build(self) -> Any:
        """Build the model of the form for the classes of the current annotation layer (worker thread)."""
        from pfmseg_engine import build_model

        self._on_edit()
        try:
            config = self.recipe().model_config(self._class_names())
        except Exception as exc:
            notify_error(exc, "Building the model")
            return None
        return self._start("building", build_model, config,
                           on_done=lambda model: self.session.set_model(model, "built from the Model widget"))

    def load(self, path: str | Path) -> Any:
        """Load a pfmseg checkpoint (worker thread); the weights field overrides its backbone weights."""
        from pfmseg_engine import load_checkpoint, read_checkpoint

        weights = self.weights.text().strip() or None

        def run() -> tuple[Any, dict[str, Any]]:
            metrics = read_checkpoint(path).get("metrics") or {}
            return load_checkpoint(path, weights=weights, device="cpu"), metrics

        def done(value: tuple[Any, dict[str, Any]]) -> None:
            model, metrics = value
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.session.set_model(model, f"checkpoint {path}", metrics=numbers)
            notify_info(f"Loaded {Path(path).name}: {model.config.backbone}, {model.config.num_classes} classes.")

        return self._start("loading", run, on_done=done)

    def save(self, path: str | Path) -> Any:
        """Save the current model as a self-describing pfmseg checkpoint (worker thread)."""
        from pfmseg_engine import ConfigError, save_checkpoint

        state = self.session.state
        if state.model is None:
            notify_error(ConfigError("There is no model to save yet; build, load or train one first."), "Saving")
            return None
        metadata = {"source": "napari-pfmseg", "epochs_trained": state.epochs_trained}
        return self._start("saving", save_checkpoint, path, state.model, state.metrics, None, metadata,
                           on_done=lambda p: notify_info(f"Model saved to {p}"))

    def _browse_weights(self) -> None:
        path = open_file(self, "Backbone weights", WEIGHTS_FILTER)
        if path:
            self.weights.setText(path)
            self._on_edit()

    def _load_dialog(self) -> None:
        path = open_file(self, "Load pfmseg checkpoint", CHECKPOINT_FILTER)
        if path:
            self.load(path)

    def _save_dialog(self) -> None:
        path = save_file(self, "Save model", CHECKPOINT_FILTER, "model.pt")
        if path:
            self.save(path)
