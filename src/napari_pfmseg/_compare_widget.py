"""Compare widget: which foundation model for these annotations? Rank PFMs (and the UNet baseline) with CIs.

The widget gathers the inputs on the GUI thread (slide and annotation layers, the backbones whose
weights are at hand, the strategies and a time budget for everything the comparison does); the engine's
:class:`pfmseg_engine.compare.Comparison` runs in a napari ``thread_worker`` generator and its events
(runs, each run's phase: caching features, training, scoring; the ranking so far) arrive here as signals.
Comparisons on the same slide and annotation layer share one folder, so their rows accumulate in one
ranking under the engine's resume rules. While the budget lasts, the worker then predicts the visible
area with every finished model, shown side by side in the dock. "Use the winner" loads the best model
into the session (the Train and Predict widgets then use it); "Feature view" adds the first three
principal components of a backbone's token features over the visible area as an RGB layer. Cancel stops
after the current batch and keeps (and ranks) the runs that finished. No modelling happens here: only
engine calls.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGridLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._annotate_widget import is_slide_layer
from ._annotations import is_trainable_labels
from ._controller import WorkerController
from ._notify import Failure, guarded, guarded_generator, notify_error, notify_info
from ._output_folder import OutputFolderRow
from ._qt_helpers import LayerCombo, button, dspin, group, row, spin
from ._run_state import RunState, sentence
from ._session import BusyError, session_for
from ._torch_guard import guard_triton

PREVIEW_SIDE = 512  # largest preview side (px at the model's resolution); the view's centre is kept


@dataclass(frozen=True)
class CompareSettings:
    pfms: tuple[str, ...]
    strategies: tuple[str, ...] = ("frozen",)
    budget_minutes: float = 5.0  # wall time of the whole comparison: cache fill, training and scoring
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


def comparison_folder(root: Path, slide: str, annotations: str) -> Path:
    """One folder per slide and annotation layer under ``root``: comparisons on the same annotations
    accumulate there (rows reused and ranked together), others never mix with them."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{slide}--{annotations}").strip("_.") or "comparison"
    return root / slug[:120]


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
                     should_stop: Callable[[], bool] | None = None) -> list[tuple[str, np.ndarray]]:
    """Each finished row's model on ``region``: (caption, coloured prediction over the image)."""
    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.training.validation import predict_probabilities

    previews: list[tuple[str, np.ndarray]] = []
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
    """The worker: the engine's comparison events, then previews of every finished model on the view, as
    long as the comparison's time budget lasts (it covers the previews too)."""
    from pfmseg_engine.compare import Phase

    result = yield from comparison.iter_run()
    previews: list[tuple[str, np.ndarray]] = []
    rows = [r for r in result.leaderboard.rows if r.ok]
    if box is not None and rows and result.status == "completed" and not comparison.budget.spent():
        yield ("status", "predicting the visible area with each model")
        yield ("phase", Phase("preview", 0, len(rows)))
        previews = predict_previews(rows, _read_region(source, box), colours, device,
                                    should_stop=comparison.budget.spent)
        yield ("phase", Phase("preview", len(previews), len(rows)))
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
    phase = Signal(object)  # engine Phase: progress inside the current run (cache fill, training, scoring)
    step = Signal(object)  # engine StepInfo
    ranking = Signal(object)  # engine Leaderboard (so far)
    previews = Signal(object)  # [(caption, rgb)]
    finished = Signal(object)  # CompareOutcome

    def __init__(self, session: Any):
        super().__init__(session)
        self.leaderboard: Any = None
        self.last: CompareOutcome | None = None
        self.context: dict[str, Any] = {}
        #: the comparison's clock (its time budget reads it); tests put a fake one here
        self.clock: Callable[[], float] = time.perf_counter

    def _start(self, image: Any, annotations: Any, settings: CompareSettings) -> Any:
        from napari.qt.threading import create_worker

        from pfmseg_engine import ConfigError, resolve_device
        from pfmseg_engine.compare import CompareData, CompareSpec, Comparison, exact_augmentation
        from pfmseg_engine.jobs import FineTuneSettings
        from pfmseg_engine.training import CancelToken, TrainConfig

        from ._annotations import classes_of, training_pairs
        from ._slides import require_slide_mpp, visible_box

        if not settings.pfms:
            raise ConfigError("Tick at least one backbone (or the UNet baseline) to compare.")
        if not settings.strategies:
            raise ConfigError("Tick at least one tuning strategy to compare.")
        session = self.session
        session.claim("comparing")
        device = str(resolve_device(session.device))
        slide = session.slide_for(image)
        require_slide_mpp(slide, image)
        source, labels, plan = training_pairs(slide, image, annotations)
        names, colours = classes_of(annotations)
        recipe = session.recipe.with_changes(mpp=round(plan.mpp, 6), tiny=settings.tiny or session.recipe.tiny)
        model_config = recipe.model_config(names, require_weights=False)
        self.runs += 1
        output_dir = comparison_folder(session.output_dir("compare", image), image.name, annotations.name)
        train = FineTuneSettings().with_overrides(
            epochs=settings.epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
            samples_per_epoch=settings.samples_per_epoch, val_fraction=settings.val_fraction)
        sections = train.sections(output_dir / "base", device)
        sections["training"]["augmentation"] = exact_augmentation()
        sections["validation"]["eval_interval"] = 1
        config = TrainConfig.from_model_config(model_config, protocol=None, **sections)
        identity = f"{slide.path}@{plan.mpp}" if slide.path else None
        data = CompareData.from_annotations([source], [labels], class_names=names, crop=recipe.input_size,
                                            validation_share=settings.val_fraction, seed=train.seed,
                                            identities=[identity] if identity else None)
        seeds = tuple(range(max(1, settings.seeds)))
        spec = CompareSpec(pfms=settings.pfms, strategies=settings.strategies, seeds=seeds,
                           weights=settings.weights, tiny=settings.tiny,
                           cache_dir=str(session.output_dir("feature_cache", image)),
                           budget_s=max(1.0, settings.budget_minutes * 60.0), n_bootstrap=500,
                           throughput_steps=2, device=device)
        self.cancel_token = CancelToken()
        comparison = Comparison(config, spec, output_dir, data=data, cancel=self.cancel_token, clock=self.clock)
        box = None
        try:
            box = preview_box(visible_box(session.viewer, image), plan.downsample, tuple(plan.shape))
        except Exception:  # no view to preview (headless): rank only
            box = None
        self.context = {"image": image, "slide": slide, "plan": plan, "source": source, "colours": colours,
                        "names": names, "device": device, "output_dir": output_dir}
        self.leaderboard = None
        worker = create_worker(_run, comparison, source, box, colours, device, _start_thread=False)
        rows = len(comparison.combinations) * len(seeds)
        return self._launch(worker, f"comparing {len(comparison.combinations)} model(s), {rows} run(s), within "
                                    f"{comparison.budget.describe()}")

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
        elif kind == "phase":
            self.phase.emit(value)
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
        left = sum(1 for r in result.leaderboard.rows if r.status == "pending" and r.note)
        message = (f"Comparison {result.status}: {done} model(s) ranked"
                   + (f"; best {winner.pfm} / {winner.strategy} (mIoU {winner.metrics['mIoU']:.3f})" if winner else "")
                   + (f"; {len(result.leaderboard.failed)} failed" if result.leaderboard.failed else "")
                   + (f"; {left} not run within the time budget" if left else "") + ".")
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


def _pixmap(rgb: np.ndarray, side: int = 120) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3])
    height, width = rgb.shape[:2]
    qimage = QImage(rgb.tobytes(), width, height, 3 * width, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(qimage).scaled(side, side, Qt.AspectRatioMode.KeepAspectRatio,
                                            Qt.TransformationMode.SmoothTransformation)


def _checklist(names: list[str], tip: str) -> QListWidget:
    """A list of checkable names that grows with the dock."""
    widget = QListWidget()
    widget.setToolTip(tip)
    widget.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
    widget.setMinimumHeight(60)
    for name in names:
        item = QListWidgetItem(name)
        item.setData(Qt.ItemDataRole.UserRole, name)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Unchecked)
        widget.addItem(item)
    return widget


def _items(widget: QListWidget) -> list[QListWidgetItem]:
    return [item for item in (widget.item(i) for i in range(widget.count())) if item is not None]


def _checked(widget: QListWidget) -> tuple[str, ...]:
    return tuple(item.data(Qt.ItemDataRole.UserRole) for item in _items(widget)
                 if item.checkState() == Qt.CheckState.Checked)


def _set_checked(widget: QListWidget, names: list[str] | tuple[str, ...]) -> None:
    for item in _items(widget):
        wanted = item.data(Qt.ItemDataRole.UserRole) in names
        item.setCheckState(Qt.CheckState.Checked if wanted and item.flags() & Qt.ItemFlag.ItemIsEnabled
                           else Qt.CheckState.Unchecked)


class CompareWidget(QWidget):
    """Rank backbones x strategies (and the UNet baseline) on the current annotations; use the winner."""

    COLUMNS = ("rank", "backbone", "strategy", "mIoU [95 % CI]", "mean Dice", "vs best", "trainable", "train s",
               "cache s", "note")

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
        self.models = _checklist(list(list_backbones()),
                                 "backbones to compare; a backbone is available when its weights are (a local file "
                                 "or the Hugging Face cache), or with 'tiny test models'")
        self.strategies = _checklist(list(STRATEGIES), "tuning strategies: every ticked backbone is trained with each")
        _set_checked(self.strategies, ["frozen"])
        self.weights = QLineEdit()
        self.weights.setPlaceholderText("more weights: uni_v1=/models/uni.bin, phikon=hf-hub:")
        self.tiny = QCheckBox("tiny test models (random weights: ranking meaningless)")
        self.budget = dspin(5.0, 0.05, 24 * 60.0, 1.0, 2,
                            tip="wall time of the whole comparison (minutes): caching backbone features, training "
                                "and scoring every run")
        self.seeds = spin(1, 1, 10, tip="training runs per model (seeds); more seeds, tighter rankings")
        self.epochs = spin(10, 1, 10_000, tip="at most this many epochs per run (the time budget may stop earlier)")
        self.samples = spin(32, 1, 100_000, 16, tip="patches per epoch")
        self.val_fraction = dspin(0.25, 0.05, 0.9, 0.05, 2, tip="share of annotated squares held out for scoring")
        self.output = OutputFolderRow(self.session, self.image.layer)
        self.image.layer_changed.connect(self.output.refresh)
        self.run_state = RunState("%v / %m runs")
        self.progress, self.status = self.run_state.progress, self.run_state.status
        self.phase_progress = QProgressBar()
        self.phase_progress.setFormat("%v / %m")
        self.phase_progress.setRange(0, 1)
        self.phase_progress.setValue(0)
        self.phase_label = QLabel("")
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        header, rows = self.table.horizontalHeader(), self.table.verticalHeader()
        if header is not None:
            header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
            header.setStretchLastSection(True)
        if rows is not None:
            rows.setVisible(False)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setWordWrap(True)
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.table.setMinimumHeight(120)
        self.preview_holder = QWidget()
        self.preview_grid = QGridLayout(self.preview_holder)
        self.preview_labels: list[QLabel] = []

        self.compare_button = button("Compare", self.compare, "train and rank every ticked backbone x strategy; "
                                     "rows of earlier comparisons on these annotations stay ranked")
        self.cancel_button = button("Cancel", self.controller.cancel, "stop; finished models stay ranked")
        self.use_button = button("Use the winner", self.use_winner,
                                 "load the best model (or the selected row) into the session")
        self.feature_button = button("Feature view", self.feature_view,
                                     "PCA of the selected row's (else the first ticked) backbone's features over "
                                     "the visible area, as an RGB layer")

        data = QFormLayout()
        data.addRow("slide", self.image)
        data.addRow("annotations", self.annotations)
        lists = QSplitter(Qt.Orientation.Horizontal)
        lists.addWidget(self.models)
        lists.addWidget(self.strategies)
        lists.setStretchFactor(0, 2)
        lists.setStretchFactor(1, 1)
        models = QVBoxLayout()
        models.addWidget(QLabel("backbones  |  strategies"))
        models.addWidget(lists, 1)
        extra = QFormLayout()
        extra.addRow("weights", self.weights)
        extra.addRow(self.tiny)
        models.addLayout(extra)
        schedule = QFormLayout()
        schedule.addRow("time budget (min)", self.budget)
        schedule.addRow("seeds", self.seeds)
        schedule.addRow("max epochs", self.epochs)
        schedule.addRow("patches / epoch", self.samples)
        schedule.addRow("scoring share", self.val_fraction)
        results = QWidget()
        results_layout = QVBoxLayout(results)
        results_layout.setContentsMargins(0, 0, 0, 0)
        results_layout.addWidget(self.run_state)
        results_layout.addWidget(row(self.phase_label, self.phase_progress))
        results_layout.addWidget(self.table, 1)
        results_layout.addWidget(row(self.use_button, self.feature_button))
        previews = QScrollArea()
        previews.setWidgetResizable(True)
        previews.setWidget(self.preview_holder)
        previews.setMinimumHeight(60)
        # the model lists, the leaderboard and the previews share the dock's height (the user moves the splits)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(group("Models", models))
        split.addWidget(results)
        split.addWidget(previews)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 3)
        split.setStretchFactor(2, 1)
        split.setChildrenCollapsible(False)
        self.split = split
        layout = QVBoxLayout(self)
        layout.addWidget(group("Data", data))
        layout.addWidget(split, 1)
        layout.addWidget(group("Schedule", schedule))
        layout.addWidget(self.output)
        layout.addWidget(row(self.compare_button, self.cancel_button))

        c = self.controller
        c.status.connect(self._on_status)
        c.started.connect(self._on_started)
        c.failed_to_start.connect(self._on_failed_to_start)
        c.run.connect(self._on_run)
        c.phase.connect(self._on_phase)
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
        for signal, slot in ((c.status, self._on_status), (c.started, self._on_started),
                             (c.failed_to_start, self._on_failed_to_start), (c.run, self._on_run),
                             (c.phase, self._on_phase), (c.ranking, self._show_ranking),
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
        from pfmseg_engine.backbones.availability import weights_available

        weights, tiny = self.weights_map(), self.tiny.isChecked()
        for item in _items(self.models):
            spec = get_spec(item.data(Qt.ItemDataRole.UserRole))
            available = weights_available(spec, weights.get(spec.name, ""), tiny=tiny)
            flags = item.flags() | Qt.ItemFlag.ItemIsUserCheckable
            item.setFlags(flags | Qt.ItemFlag.ItemIsEnabled if available else flags & ~Qt.ItemFlag.ItemIsEnabled)
            if not available:
                item.setCheckState(Qt.CheckState.Unchecked)
            note = "baseline, no weights" if spec.from_scratch else ("tiny" if tiny else
                                                                     "weights found" if available else "no weights")
            item.setText(f"{spec.name}  ({note})")

    def set_checked(self, names: list[str] | tuple[str, ...]) -> None:
        _set_checked(self.models, names)

    def checked(self) -> tuple[str, ...]:
        return _checked(self.models)

    def set_strategies(self, names: list[str] | tuple[str, ...]) -> None:
        _set_checked(self.strategies, names)

    def checked_strategies(self) -> tuple[str, ...]:
        return _checked(self.strategies)

    def settings(self) -> CompareSettings:
        return CompareSettings(pfms=self.checked(), strategies=self.checked_strategies(),
                               budget_minutes=self.budget.value(), seeds=self.seeds.value(),
                               epochs=self.epochs.value(), samples_per_epoch=self.samples.value(),
                               val_fraction=self.val_fraction.value(), tiny=self.tiny.isChecked(),
                               weights=self.weights_map())

    # --- actions -----------------------------------------------------------------------------------------
    def compare(self) -> Any:
        image, annotations = self.image.layer(), self.annotations.layer()
        if image is None or annotations is None:
            from pfmseg_engine import ConfigError

            self.run_state.fail(notify_error(
                ConfigError("Choose a slide and an annotation layer (Annotate widget) first."), "Comparing models"))
            return None
        return self.controller.start(image, annotations, self.settings())

    def ranked_rows(self) -> list[Any]:
        """The leaderboard rows in table order (ranked first, then the rest)."""
        board = self.controller.leaderboard
        if board is None:
            return []
        return [r for r in board.rows if r.ok] + [r for r in board.rows if not r.ok]

    def selected_row(self) -> Any:
        board = self.controller.leaderboard
        if board is None:
            return None
        rows = self.ranked_rows()
        selected = sorted({index.row() for index in self.table.selectedIndexes()})
        if selected and selected[0] < len(rows) and rows[selected[0]].ok:
            return rows[selected[0]]
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
    def _on_started(self) -> None:
        self.run_state.begin(f"Comparing on: {self.controller.subject}")
        self.phase_label.setText("")
        self.phase_progress.setRange(0, 1)
        self.phase_progress.setValue(0)
        self._show_previews([])
        self._update_buttons()

    def _on_failed_to_start(self, message: str) -> None:
        self.run_state.fail(message)
        self._update_buttons()

    def _on_status(self, text: str) -> None:
        self.run_state.say(text)
        self._update_buttons()

    def _on_run(self, start: Any) -> None:
        self.run_state.advance(start.index - 1, start.total)

    def _on_phase(self, phase: Any) -> None:
        self.phase_label.setText(sentence(phase.label).rstrip(".…"))
        self.phase_progress.setRange(0, max(1, phase.total))
        self.phase_progress.setValue(min(phase.done, max(1, phase.total)))

    def _show_ranking(self, board: Any) -> None:
        self.controller.leaderboard = board
        rows = self.ranked_rows()
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            interval = r.intervals.get("mIoU")
            if r.ok and interval:
                score = f"{r.metrics['mIoU']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
            else:
                score = {"failed": "failed", "pending": "not run"}.get(r.status, r.status)
            note = r.note or r.error
            values = (str(r.rank or "-"), r.pfm, r.strategy, score,
                      f"{r.metrics['Mean_Dice']:.3f}" if r.ok else "-", r.vs_best or "-",
                      f"{(r.trainable_params or 0) / 1e6:.2f} M" if r.ok else "-",
                      f"{r.train_seconds:.0f}" if r.ok and r.train_seconds is not None else "-",
                      f"{r.cache_seconds:.0f}" if r.ok and r.cache_seconds else "-", note)
            for j, value in enumerate(values):
                item = QTableWidgetItem(value)
                if note:
                    item.setToolTip(note)
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
            column, line = i % 3, 2 * (i // 3)
            self.preview_grid.addWidget(picture, line, column)
            self.preview_grid.addWidget(text, line + 1, column)
            self.preview_labels += [picture, text]

    def _on_finished(self, outcome: CompareOutcome) -> None:
        if outcome.leaderboard is not None:
            self._show_ranking(outcome.leaderboard)
        if outcome.status == "completed":
            self.phase_label.setText("")
        self.run_state.finish(outcome.status, outcome.message or f"Comparison {outcome.status}.")
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        running = self.controller.running
        ranked = self.controller.leaderboard is not None and self.controller.leaderboard.winner is not None
        self.compare_button.setEnabled(not self.session.job)
        self.cancel_button.setEnabled(running)
        self.use_button.setEnabled(ranked and not self.session.job)
        self.feature_button.setEnabled(not self.session.job)
