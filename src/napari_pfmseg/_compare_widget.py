"""Compare widget: which foundation model for these annotations? Rank PFMs (and the UNet baseline) with CIs.

The widget gathers the inputs on the GUI thread (slide and annotation layers, the backbones whose
weights are at hand, a strategy and a time budget); the engine's :class:`pfmseg_engine.compare.Comparison`
runs in a napari ``thread_worker`` generator and its events (runs, training steps, the ranking so far)
arrive here as signals. When the runs are done the worker predicts the visible area with every finished
model, shown side by side in the dock. "Use the winner" loads the best model into the session (the
Train and Predict widgets then use it); "Feature view" adds the first three principal components of a
backbone's token features over the visible area as an RGB layer. Cancel stops after the current batch
and keeps (and ranks) the runs that finished. No modelling happens here: only engine calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._annotate_widget import is_slide_layer
from ._annotations import is_trainable_labels
from ._controller import WorkerController
from ._notify import Failure, guarded, guarded_generator, notify_error, notify_info
from ._qt_helpers import LayerCombo, button, dspin, group, row, spin, wrapped
from ._session import BusyError, session_for
from ._torch_guard import guard_triton

#: Augmentation of a comparison: exact symmetries only, so frozen backbones reuse cached features.
EXACT_ONLY = {name: {"p": 0.0} for name in ("affine", "elastic", "color_jitter", "hed_jitter", "brightness_contrast",
                                            "gamma", "blur", "noise", "cutout")}
PREVIEW_SIDE = 512  # largest preview side (px at the model's resolution); the view's centre is kept


@dataclass(frozen=True)
class CompareSettings:
    pfms: tuple[str, ...]
    strategy: str = "frozen"
    budget_minutes: float = 5.0  # training time of the whole comparison
    seeds: int = 1
    epochs: int = 10  # at most; the time budget usually stops earlier
    samples_per_epoch: int = 32
    batch_size: int = 4
    learning_rate: float = 1e-3
    val_fraction: float = 0.25
    tiny: bool = False
    weights: dict[str, str] = field(default_factory=dict)


@dataclass
class CompareOutcome:
    status: str  # completed, cancelled, failed
    leaderboard: Any = None
    previews: list[tuple[str, np.ndarray]] = field(default_factory=list)
    output_dir: Path | None = None
    message: str = ""


def parse_weights_text(text: str) -> dict[str, str]:
    """``"uni_v1=/m/uni.bin, phikon=hf-hub:"`` -> mapping (engine names checked by the engine)."""
    out = {}
    for part in text.replace(";", ",").split(","):
        if "=" in part:
            name, path = part.split("=", 1)
            out[name.strip()] = path.strip()
    return out


def weights_available(spec: Any, weights: str, tiny: bool) -> bool:
    """Whether a comparison can use ``spec`` now: no weights needed, tiny, a local file or the hub cache."""
    from ._model_widget import weights_status

    if spec.from_scratch or tiny:
        return True
    status = weights_status(spec, weights)
    return status == "weights file found" or "(in local cache)" in status


def colour_labels(labels: np.ndarray, colours: list[list[int]], image: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: class colours (class k = ``colours[k]``) blended half over ``image``."""
    table = np.asarray([list(c)[:3] for c in colours] or [[0, 0, 0]], dtype=np.float32)
    rgb = table[np.clip(labels, 0, len(table) - 1)]
    if image is not None:
        rgb = 0.5 * rgb + 0.5 * np.asarray(image[..., :3], dtype=np.float32)
    return rgb.round().astype(np.uint8)


def _read_region(source: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = box
    return np.ascontiguousarray(np.asarray(source[y0:y1, x0:x1])[..., :3])


def preview_box(box: tuple[float, float, float, float], downsample: float,
                shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A level-0 visible box as a box of the working-resolution image, at most PREVIEW_SIDE px, centred."""
    y0, y1, x0, x1 = (v / downsample for v in box)
    out = []
    for low, high, extent in ((y0, y1, shape[0]), (x0, x1, shape[1])):
        centre, half = (low + high) / 2, min(high - low, PREVIEW_SIDE) / 2
        a = int(max(0, min(extent - 1, round(centre - half))))
        b = int(max(a + 1, min(extent, round(centre + half))))
        out += [a, b]
    return out[0], out[1], out[2], out[3]


def predict_previews(rows: list[Any], region: np.ndarray, colours: list[list[int]], device: str,
                     should_stop: Any = None) -> list[tuple[str, np.ndarray]]:
    """Each finished row's model on ``region``: (caption, coloured prediction over the image)."""
    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.training.validation import predict_probabilities

    previews = []
    for row_ in rows:
        if should_stop is not None and should_stop():
            break
        model = load_checkpoint(row_.checkpoint, device=device)
        probs = predict_probabilities(model, region, window=model.config.input_size, overlap=0.25, batch_size=8,
                                      device=device)
        caption = f"{row_.rank}. {row_.pfm} / {row_.strategy}  mIoU {row_.metrics.get('mIoU', float('nan')):.3f}"
        previews.append((caption, colour_labels(probs.argmax(0), colours, region)))
    return previews


@guarded_generator
def _run(comparison: Any, source: Any, box: tuple[int, int, int, int] | None, colours: list[list[int]],
         device: str):
    """The worker: the engine's comparison events, then previews of every finished model on the view."""
    result = yield from comparison.iter_run()
    previews: list[tuple[str, np.ndarray]] = []
    rows = [r for r in result.leaderboard.rows if r.ok]
    if box is not None and rows and result.status == "completed":  # a cancel stops at once, ranking kept
        yield ("status", "predicting the visible area with each model")
        previews = predict_previews(rows, _read_region(source, box), colours, device)
        yield ("previews", previews)
    return result, previews


def compare_controller(session: Any) -> CompareController:
    """The session's comparison controller (one per viewer)."""
    if "compare" not in session.controllers:
        session.controllers["compare"] = CompareController(session)
    return session.controllers["compare"]


class CompareController(WorkerController):
    """Starts and cancels comparisons of one session; the widget listens to its signals."""

    claim_name, job_title = "comparing", "Comparing models"
    run = Signal(object)  # engine RunStart
    step = Signal(object)  # engine StepInfo
    ranking = Signal(object)  # engine Leaderboard (so far)
    previews = Signal(object)  # [(caption, rgb)]
    finished = Signal(object)  # CompareOutcome

    def __init__(self, session: Any):
        super().__init__(session)
        self.leaderboard: Any = None
        self.last: CompareOutcome | None = None
        self.context: dict[str, Any] = {}

    def _start(self, image: Any, annotations: Any, settings: CompareSettings) -> Any:
        from napari.qt.threading import create_worker

        from pfmseg_engine import ConfigError, resolve_device
        from pfmseg_engine.compare import CompareData, CompareSpec, Comparison
        from pfmseg_engine.training import CancelToken, TrainConfig

        from ._annotations import classes_of, training_pairs
        from ._slides import visible_box
        from ._training import TrainSettings, training_sections

        if not settings.pfms:
            raise ConfigError("Tick at least one backbone (or the UNet baseline) to compare.")
        session = self.session
        session.claim("comparing")
        device = str(resolve_device(session.device))
        slide = session.slide_for(image)
        slide.require_mpp()
        source, labels, plan = training_pairs(slide, image, annotations)
        names, colours = classes_of(annotations)
        recipe = session.recipe.with_changes(mpp=round(plan.mpp, 6), tiny=settings.tiny or session.recipe.tiny)
        model_config = recipe.model_config(names, require_weights=False)
        self.runs += 1
        output_dir = session.output_dir("compare") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{self.runs:03d}"
        train = TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size,
                              learning_rate=settings.learning_rate, samples_per_epoch=settings.samples_per_epoch,
                              val_fraction=settings.val_fraction)
        sections = training_sections(train, output_dir / "base", device)
        sections["training"]["augmentation"] = {"zoom": None, "transforms": EXACT_ONLY}
        sections["validation"]["eval_interval"] = 1
        config = TrainConfig.from_model_config(model_config, **sections)
        identity = f"{slide.path}@{plan.mpp}" if slide.path else None
        data = CompareData.from_annotations([source], [labels], class_names=names, crop=recipe.input_size,
                                            validation_share=settings.val_fraction, seed=train.seed,
                                            identities=[identity] if identity else None)
        seeds = tuple(range(max(1, settings.seeds)))
        rows = len(settings.pfms) * len(seeds)
        spec = CompareSpec(pfms=settings.pfms, strategies=(settings.strategy,), seeds=seeds,
                           weights=settings.weights, tiny=settings.tiny,
                           cache_dir=str(session.output_dir("feature_cache")),
                           time_budget_s=max(1.0, settings.budget_minutes * 60.0 / rows), n_bootstrap=500,
                           throughput_steps=2, device=device)
        self.cancel_token = CancelToken()
        comparison = Comparison(config, spec, output_dir, data=data, cancel=self.cancel_token)
        box = None
        try:
            box = preview_box(visible_box(session.viewer, image), plan.downsample, tuple(plan.shape))
        except Exception:  # no view to preview (headless): rank only
            box = None
        self.context = {"image": image, "slide": slide, "plan": plan, "source": source, "colours": colours,
                        "names": names, "device": device, "output_dir": output_dir}
        self.leaderboard = None
        worker = create_worker(_run, comparison, source, box, colours, device, _start_thread=False)
        return self._launch(worker, f"comparing {len(spec.combinations(settings.strategy))} model(s)")

    # --- worker events (GUI thread) ------------------------------------------------------------------
    def _on_event(self, event: tuple[str, Any]) -> None:
        kind, value = event
        if kind == "status":
            self.status.emit(value)
        elif kind == "run":
            self.run.emit(value)
            self.status.emit(f"run {value.index}/{value.total}: {value.combination} (seed {value.seed})")
        elif kind == "step":
            self.step.emit(value)
        elif kind == "cache":
            self.status.emit(f"caching backbone features: {value[0]}/{value[1]} windows")
        elif kind == "leaderboard":
            self.leaderboard = value
            self.ranking.emit(value)
        elif kind == "previews":
            self.previews.emit(value)

    def _on_result(self, value: Any) -> None:
        result, previews = value
        self.leaderboard = result.leaderboard
        winner = result.leaderboard.winner
        done = sum(1 for r in result.leaderboard.rows if r.ok)
        message = (f"Comparison {result.status}: {done} model(s) ranked"
                   + (f"; best {winner.pfm} / {winner.strategy} (mIoU {winner.metrics['mIoU']:.3f})" if winner else "")
                   + (f"; {len(result.leaderboard.failed)} failed" if result.leaderboard.failed else "") + ".")
        self._outcome = CompareOutcome(result.status, result.leaderboard, previews, result.output_dir, message)
        notify_info(message)

    def _on_error(self, exc: BaseException) -> None:
        self._outcome = CompareOutcome("failed", self.leaderboard, message=notify_error(exc, "Comparing models"))

    def _on_finished(self) -> None:
        outcome = self._outcome or CompareOutcome("failed", self.leaderboard, message="Comparison stopped.")
        self._outcome = None
        self.worker = None
        self.last = outcome
        self.session.release("comparing")
        self.status.emit(outcome.message or outcome.status)
        self.finished.emit(outcome)

    # --- after a comparison ------------------------------------------------------------------------------
    def use(self, row_: Any) -> Any:
        """Load ``row_``'s best checkpoint into the session (worker thread); returns the worker."""
        from napari.qt.threading import create_worker

        from pfmseg_engine import load_checkpoint

        if row_ is None or not row_.checkpoint:
            from pfmseg_engine import ConfigError

            notify_error(ConfigError("No ranked model yet: run a comparison first."), "Using the winner")
            return None
        try:
            self.session.claim("loading")
        except BusyError as exc:
            notify_error(exc, "Using the winner")
            return None
        worker = create_worker(guarded(load_checkpoint), row_.checkpoint, device="cpu", _start_thread=False)

        def loaded(model: Any) -> None:
            if isinstance(model, Failure):
                notify_error(model.exc, "Using the winner")
                return
            metrics = {k: float(v) for k, v in row_.metrics.items() if v is not None}
            self.session.set_model(model, f"compare: {row_.pfm} / {row_.strategy} ({row_.checkpoint})",
                                   metrics=metrics)
            notify_info(f"Loaded {row_.pfm} / {row_.strategy} into the session; Train continues from it, Predict "
                        "uses it.")

        worker.returned.connect(loaded)
        worker.finished.connect(lambda: self.session.release("loading"))
        worker.start()
        return worker

    def feature_view(self, image: Any, pfm: str, row_: Any = None, weights: str | None = None,
                     tiny: bool = False) -> Any:
        """Add the PCA of ``pfm``'s token features over the visible area as an RGB layer (worker thread).

        Uses ``row_``'s trained checkpoint when given, else ``pfm`` built with ``weights``.
        """
        from napari.qt.threading import create_worker

        from ._annotations import working_plan
        from ._layers import placement
        from ._slides import visible_box

        try:
            session = self.session
            slide = session.slide_for(image)
            recipe = session.recipe
            plan = working_plan(slide, (session.model.config.mpp if session.model is not None else None)
                                or recipe.mpp or slide.require_mpp())
            box = preview_box(visible_box(session.viewer, image), plan.downsample, tuple(plan.shape))
            source = plan.source(slide)
            session.claim("feature view")
        except Exception as exc:
            notify_error(exc, "Feature view")
            return None
        device = str(self.context.get("device") or "cpu")

        def compute() -> np.ndarray:
            from pfmseg_engine import ModelConfig, build_model, load_checkpoint
            from pfmseg_engine.compare import feature_pca

            if row_ is not None and row_.checkpoint:
                model = load_checkpoint(row_.checkpoint, device=device)
            else:
                model = build_model(ModelConfig(backbone=pfm, weights=weights or None, tiny=tiny, num_classes=1,
                                                input_size=recipe.input_size), device=device)
            return feature_pca(model, _read_region(source, box), device=device)

        def done(rgb: Any) -> None:
            if isinstance(rgb, Failure):
                notify_error(rgb.exc, "Feature view")
                return
            unit = float(image.scale[-1])
            offset = np.asarray(image.translate[-2:], float) / unit + (box[0] * plan.downsample,
                                                                       box[2] * plan.downsample)
            name = f"{row_.pfm if row_ is not None else pfm} features (PCA)"
            session.viewer.add_image(rgb, rgb=True, name=name, units=tuple(image.units[-2:]),
                                     metadata={"pfmseg": {"kind": "feature_pca", "pfm": pfm}},
                                     **placement(unit, plan.downsample, tuple(offset)))

        worker = create_worker(guarded(compute), _start_thread=False)
        worker.returned.connect(done)
        worker.finished.connect(lambda: session.release("feature view"))
        worker.start()
        return worker


def _pixmap(rgb: np.ndarray, side: int = 160) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3])
    height, width = rgb.shape[:2]
    qimage = QImage(rgb.data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimage).scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio,
                                            Qt.TransformationMode.SmoothTransformation)


class CompareWidget(QWidget):
    """Rank backbones (and the UNet baseline) on the current annotations; use the winner."""

    COLUMNS = ("rank", "backbone", "strategy", "mIoU [95 % CI]", "mean Dice", "vs best", "trainable")

    def __init__(self, napari_viewer: Any):
        super().__init__()
        guard_triton()
        from ._train_widget import _preimport

        _preimport()
        from pfmseg_engine import STRATEGIES, list_backbones

        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.controller = compare_controller(self.session)

        self.image = LayerCombo(napari_viewer, is_slide_layer)
        self.annotations = LayerCombo(napari_viewer, is_trainable_labels)
        self.models = QListWidget()
        self.models.setToolTip("backbones to compare; a backbone is available when its weights are (a local file or "
                               "the Hugging Face cache), or with 'tiny test models'")
        for name in list_backbones():
            item = QListWidgetItem(name)
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setCheckState(Qt.CheckState.Unchecked)
            self.models.addItem(item)
        self.weights = QLineEdit()
        self.weights.setPlaceholderText("more weights: uni_v1=/models/uni.bin, phikon=hf-hub:")
        self.tiny = QCheckBox("tiny test models (random weights: ranking meaningless)")
        self.strategy = QComboBox()
        self.strategy.addItems(list(STRATEGIES))
        self.budget = dspin(5.0, 0.05, 24 * 60.0, 1.0, 2, tip="training time of the whole comparison (minutes)")
        self.seeds = spin(1, 1, 10, tip="training runs per model (seeds); more seeds, tighter rankings")
        self.epochs = spin(10, 1, 10_000, tip="at most this many epochs per run (the time budget may stop earlier)")
        self.samples = spin(32, 1, 100_000, 16, tip="patches per epoch")
        self.val_fraction = dspin(0.25, 0.05, 0.9, 0.05, 2, tip="share of annotated squares held out for scoring")
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m runs")
        self.status = wrapped("Idle.")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.preview_holder = QWidget()
        self.preview_grid = QGridLayout(self.preview_holder)
        self.preview_labels: list[QLabel] = []

        self.compare_button = button("Compare", self.compare, "train and rank every ticked backbone")
        self.cancel_button = button("Cancel", self.controller.cancel, "stop; finished models stay ranked")
        self.use_button = button("Use the winner", self.use_winner,
                                 "load the best model (or the selected row) into the session")
        self.feature_button = button("Feature view", self.feature_view,
                                     "PCA of the selected row's (else the first ticked) backbone's features over "
                                     "the visible area, as an RGB layer")

        data = QFormLayout()
        data.addRow("slide", self.image)
        data.addRow("annotations", self.annotations)
        models = QFormLayout()
        models.addRow(self.models)
        models.addRow("weights", self.weights)
        models.addRow(self.tiny)
        models.addRow("strategy", self.strategy)
        schedule = QFormLayout()
        schedule.addRow("time budget (min)", self.budget)
        schedule.addRow("seeds", self.seeds)
        schedule.addRow("max epochs", self.epochs)
        schedule.addRow("patches / epoch", self.samples)
        schedule.addRow("scoring share", self.val_fraction)
        layout = QVBoxLayout(self)
        layout.addWidget(group("Data", data))
        layout.addWidget(group("Models", models))
        layout.addWidget(group("Schedule", schedule))
        layout.addWidget(row(self.compare_button, self.cancel_button))
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)
        layout.addWidget(row(self.use_button, self.feature_button))
        layout.addWidget(self.preview_holder)

        c = self.controller
        c.status.connect(self._on_status)
        c.run.connect(self._on_run)
        c.ranking.connect(self._show_ranking)
        c.previews.connect(self._show_previews)
        c.finished.connect(self._on_finished)
        self.session.job_changed.connect(self._update_buttons)
        self.session.recipe_changed.connect(self._refresh_models)
        self.tiny.toggled.connect(self._refresh_models)
        self.weights.editingFinished.connect(self._refresh_models)
        self.destroyed.connect(lambda *_: self._disconnect())
        self._refresh_models()
        self._update_buttons()

    def _disconnect(self) -> None:
        c = self.controller
        for signal, slot in ((c.status, self._on_status), (c.run, self._on_run), (c.ranking, self._show_ranking),
                             (c.previews, self._show_previews), (c.finished, self._on_finished),
                             (self.session.job_changed, self._update_buttons),
                             (self.session.recipe_changed, self._refresh_models)):
            signal.disconnect(slot)

    # --- inputs ------------------------------------------------------------------------------------------
    def weights_map(self) -> dict[str, str]:
        """Weights per backbone: the Model widget's for its backbone, plus the weights field."""
        recipe = self.session.recipe
        out = {recipe.backbone: recipe.weights} if recipe.weights else {}
        out.update(parse_weights_text(self.weights.text()))
        return out

    def _refresh_models(self, *_: Any) -> None:
        from pfmseg_engine import get_spec

        weights, tiny = self.weights_map(), self.tiny.isChecked()
        for i in range(self.models.count()):
            item = self.models.item(i)
            spec = get_spec(item.data(Qt.ItemDataRole.UserRole))
            available = weights_available(spec, weights.get(spec.name, ""), tiny)
            flags = item.flags() | Qt.ItemFlag.ItemIsUserCheckable
            item.setFlags(flags | Qt.ItemFlag.ItemIsEnabled if available else flags & ~Qt.ItemFlag.ItemIsEnabled)
            if not available:
                item.setCheckState(Qt.CheckState.Unchecked)
            note = "baseline, no weights" if spec.from_scratch else ("tiny" if tiny else
                                                                     "weights found" if available else "no weights")
            item.setText(f"{spec.name}  ({note})")

    def set_checked(self, names: list[str] | tuple[str, ...]) -> None:
        for i in range(self.models.count()):
            item = self.models.item(i)
            wanted = item.data(Qt.ItemDataRole.UserRole) in names
            item.setCheckState(Qt.CheckState.Checked if wanted and item.flags() & Qt.ItemFlag.ItemIsEnabled
                               else Qt.CheckState.Unchecked)

    def checked(self) -> tuple[str, ...]:
        return tuple(self.models.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.models.count())
                     if self.models.item(i).checkState() == Qt.CheckState.Checked)

    def settings(self) -> CompareSettings:
        return CompareSettings(pfms=self.checked(), strategy=self.strategy.currentText(),
                               budget_minutes=self.budget.value(), seeds=self.seeds.value(),
                               epochs=self.epochs.value(), samples_per_epoch=self.samples.value(),
                               val_fraction=self.val_fraction.value(), tiny=self.tiny.isChecked(),
                               weights=self.weights_map())

    # --- actions -----------------------------------------------------------------------------------------
    def compare(self) -> Any:
        image, annotations = self.image.layer(), self.annotations.layer()
        if image is None or annotations is None:
            from pfmseg_engine import ConfigError

            notify_error(ConfigError("Choose a slide and an annotation layer (Annotate widget) first."),
                         "Comparing models")
            return None
        return self.controller.start(image, annotations, self.settings())

    def selected_row(self) -> Any:
        board = self.controller.leaderboard
        if board is None:
            return None
        ranked = [r for r in board.rows if r.ok]
        rows = sorted({index.row() for index in self.table.selectedIndexes()})
        if rows and rows[0] < len(ranked):
            return ranked[rows[0]]
        return board.winner

    def use_winner(self) -> Any:
        return self.controller.use(self.selected_row())

    def feature_view(self) -> Any:
        image = self.image.layer() or self.controller.context.get("image")
        if image is None:
            from pfmseg_engine import ConfigError

            notify_error(ConfigError("Choose a slide first."), "Feature view")
            return None
        chosen = self.selected_row()
        if chosen is not None and chosen.pfm != "unet":
            return self.controller.feature_view(image, chosen.pfm, row_=chosen)
        pfms = [p for p in self.checked() if p != "unet"]
        if not pfms:
            from pfmseg_engine import ConfigError

            notify_error(ConfigError("Tick a foundation-model backbone (the UNet has no token features)."),
                         "Feature view")
            return None
        return self.controller.feature_view(image, pfms[0], weights=self.weights_map().get(pfms[0]),
                                            tiny=self.tiny.isChecked())

    # --- controller events -------------------------------------------------------------------------------
    def _on_status(self, text: str) -> None:
        self.status.setText(text[:1].upper() + text[1:])
        self._update_buttons()

    def _on_run(self, start: Any) -> None:
        self.progress.setRange(0, start.total)
        self.progress.setValue(start.index - 1)

    def _show_ranking(self, board: Any) -> None:
        rows = [r for r in board.rows if r.ok] + [r for r in board.rows if r.status == "failed"]
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            interval = r.intervals.get("mIoU")
            score = (f"{r.metrics['mIoU']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if r.ok and interval
                     else "failed")
            values = (str(r.rank or "-"), r.pfm, r.strategy, score,
                      f"{r.metrics['Mean_Dice']:.3f}" if r.ok else "-", r.vs_best or "-",
                      f"{(r.trainable_params or 0) / 1e6:.2f} M" if r.ok else "-")
            for j, value in enumerate(values):
                item = QTableWidgetItem(value)
                if r.error:
                    item.setToolTip(r.error)
                self.table.setItem(i, j, item)

    def _show_previews(self, previews: list[tuple[str, np.ndarray]]) -> None:
        for label in self.preview_labels:
            self.preview_grid.removeWidget(label)
            label.deleteLater()
        self.preview_labels = []
        for i, (caption, rgb) in enumerate(previews):
            picture = QLabel()
            picture.setPixmap(_pixmap(rgb))
            picture.setToolTip(caption)
            text = QLabel(caption)
            text.setWordWrap(True)
            column, line = i % 2, 2 * (i // 2)
            self.preview_grid.addWidget(picture, line, column)
            self.preview_grid.addWidget(text, line + 1, column)
            self.preview_labels += [picture, text]

    def _on_finished(self, outcome: CompareOutcome) -> None:
        if outcome.leaderboard is not None:
            self._show_ranking(outcome.leaderboard)
            done = sum(1 for r in outcome.leaderboard.rows if r.ok or r.status == "failed")
            self.progress.setValue(min(self.progress.maximum(), done * max(1, self.seeds.value())))
        self.status.setText(outcome.message or f"Comparison {outcome.status}.")
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        running = self.controller.running
        ranked = self.controller.leaderboard is not None and self.controller.leaderboard.winner is not None
        self.compare_button.setEnabled(not self.session.job)
        self.cancel_button.setEnabled(running)
        self.use_button.setEnabled(ranked and not self.session.job)
        self.feature_button.setEnabled(not self.session.job)
