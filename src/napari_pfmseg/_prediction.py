"""Prediction of the visible area, a drawn region or the whole slide, streamed into a labels layer.

Each run is one engine :class:`~pfmseg_engine.jobs.SlidePrediction` job with the form's
:class:`~pfmseg_engine.jobs.PredictionSettings` (the same settings object, defaults and fingerprint as the
CLI and Python). It is planned on the GUI thread (``job.plan()``: torch-free, geometry only; tissue
detection happens when the worker first needs it), and the layer's shape, placement, pyramid and name
come from that plan, never from engine internals. ``job.iter_run()`` runs in a napari ``thread_worker``
generator and yields every finished chunk, then measures the output; the layer shows the
engine's own (partial) store, whose coarser levels the engine keeps up to date, and the GUI thread only
refreshes it, so results appear while the slide is processed, zoomed in or out. Regions are the
plan's ``region=``; for a whole slide, the area in view is computed first (``priority_box=``). When a
run completes, the layer switches to the engine's finished OME-Zarr output, which is what exports and
the reader use. Cancelling stops after the current chunk and leaves the finished chunks shown and the
engine's ``.partial`` output resumable. A run at a resolution more than 25 % away from the scale the model
was trained at gets a warning notification naming the Predict widget's resolution value that matches
training (the engine decides, :func:`~pfmseg_engine.training_scale.check_training_scale`; the plugin words it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from psygnal import Signal

from ._layers import META, label_colormap, placement, prediction_metadata
from ._notify import Failure, guarded_generator, notify_error, notify_info, notify_warning

MODES = ("view", "region", "slide")
#: The Predict widget's label of its resolution setting (``PredictSettings.target_mpp``); warnings name it.
RESOLUTION_LABEL = "resolution (µm/px)"
#: Layers are redrawn at most this often while chunks stream in (each redraw re-reads the view).
REFRESH_MS = 200


def _default_prediction() -> Any:
    from pfmseg_engine.jobs import PredictionSettings

    return PredictionSettings()


@dataclass(frozen=True)
class PredictSettings:
    """The Predict form: what to predict (the plugin's own choices) and the engine's prediction settings.

    ``prediction`` is the engine's :class:`~pfmseg_engine.jobs.PredictionSettings` (resolution, window,
    overlap, batch, chunk, tissue, device): its defaults are the engine's, never restated here.
    """

    mode: str = "view"
    view_first: bool = True
    output_dir: str | None = None  # None: the session's output folder
    prediction: Any = field(default_factory=_default_prediction)


@dataclass
class Target:
    """One engine job: its plan (slide, region, geometry, output paths) and where its layer goes."""

    job: Any  # pfmseg_engine.jobs.SlidePrediction
    plan: Any  # pfmseg_engine.inference.plan.SlidePlan
    class_colors: dict[str, list[int]] = field(default_factory=dict)
    image: Any = None
    layer: Any = None
    store_shown: bool = False
    outcome: Any = None  # pfmseg_engine.jobs.PredictionOutcome


@dataclass
class PredictOutcome:
    status: str  # completed, cancelled, failed
    path: Path | None = None
    layer: Any = None
    chunks: int = 0
    message: str = ""
    measurements: Path | None = None  # the measurements CSV beside the finished output
    measurement_rows: tuple[dict[str, Any], ...] = ()


@guarded_generator
def _run(targets: list[Target]):
    """The worker: run each target's job in turn, yielding (target index, chunk result)."""
    from pfmseg_engine.jobs import ChunkDone

    outcomes = []
    for index, target in enumerate(targets):
        events = target.job.iter_run()
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as stop:
                    outcomes.append(stop.value)
                    break
                if isinstance(event, ChunkDone):
                    yield index, event.chunk
        finally:
            events.close()
        if outcomes[-1].status == "cancelled":
            return "cancelled", outcomes
    return "completed", outcomes


class PredictionController:
    """Starts and cancels prediction runs of one session; the Predict widget listens to its signals."""

    progress = Signal(int, int)  # chunks done, total (of the main run)
    status = Signal(str)
    started = Signal()
    failed_to_start = Signal(str)  # the message of an error that stopped a run before it started
    finished = Signal(object)  # PredictOutcome

    def __init__(self, session: Any):
        self.session = session
        self.worker: Any = None
        self.targets: list[Target] = []
        self.last: PredictOutcome | None = None
        self.settings = PredictSettings()
        self.image: Any = None
        self.shapes: Any = None
        self._stale: set[int] = set()
        self.settings_source: Any = None  # the Predict widget's form, when one is open
        self._refresh_timer: Any = None
        self.scale_warning: str | None = None  # the last run's training-scale warning, as shown
        self.subject = ""  # the slide layer the current (or last) run predicts, by name
        session.predict_requested.connect(self._on_requested)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _on_requested(self, mode: str) -> None:
        """The Train widget asks for a prediction when training ends (uses the last settings)."""
        viewer = self.session.viewer
        candidates = (self.session.current_image, self.image, _first_slide_layer(viewer))
        image = next((layer for layer in candidates if layer is not None and layer in viewer.layers), None)
        settings = self.settings
        if self.settings_source is not None:
            try:
                settings = self.settings_source()
            except RuntimeError:  # the Predict widget was closed
                self.settings_source = None
        if image is not None and not self.running:
            self.start(image, replace(settings, mode=mode), self.shapes)

    def start(self, image: Any, settings: PredictSettings, shapes: Any = None) -> Any:
        """Start predicting; returns the napari worker, or None when an error was shown instead."""
        try:
            if not self.running:
                self.subject = str(getattr(image, "name", ""))
            return self._start(image, settings, shapes)
        except Exception as exc:
            if not self.running:  # never release the claim of a run that is still going
                self.session.release("predicting")
            message = notify_error(exc, "Prediction")
            if not self.running:
                self.last = PredictOutcome("failed", message=message)
            self.failed_to_start.emit(message)
            return None

    def _start(self, image: Any, settings: PredictSettings, shapes: Any) -> Any:
        from napari.qt.threading import create_worker

        from pfmseg_engine import ConfigError

        from ._slides import require_slide_mpp

        session = self.session
        if session.model is None:
            raise ConfigError("No model yet: build or load one in the Model widget, or train one first.")
        if settings.mode not in MODES:
            raise ConfigError(f"Unknown prediction mode '{settings.mode}'; choose one of {', '.join(MODES)}.")
        session.claim("predicting")
        self.image, self.shapes, self.settings = image, shapes, settings
        session.current_image = image
        slide = session.slide_for(image)
        require_slide_mpp(slide, image)
        out_dir = Path(settings.output_dir).expanduser() if settings.output_dir \
            else session.output_dir("predictions", image)
        out_dir.mkdir(parents=True, exist_ok=True)
        targets = self._targets(image, slide, settings, shapes, session.model, out_dir)
        self._warn_about_scale(targets)
        for target in targets:
            self._add_layer(target)
        self.targets = targets
        worker = create_worker(_run, targets, _start_thread=False)
        worker.yielded.connect(self._on_chunk)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.last = None
        self.started.emit()
        self.status.emit("predicting")
        worker.start()
        return worker

    # --- planning (GUI thread, cheap) ----------------------------------------------------------------
    def _targets(self, image: Any, slide: Any, settings: PredictSettings, shapes: Any, model: Any,
                 out_dir: Path) -> list[Target]:
        """The run's job, planned (the engine's torch-free plan: geometry, names and paths; no model is moved)."""
        from pfmseg_engine import ConfigError
        from pfmseg_engine.errors import TrainingScaleWarning
        from pfmseg_engine.inference.plan import ModelInfo
        from pfmseg_engine.jobs import SlidePrediction

        from ._slides import box_area, shapes_box, visible_box

        height, width = slide.levels[0].shape[:2]
        whole = float(height * width)
        region = priority = None
        if settings.mode == "region":
            if shapes is None:
                raise ConfigError("Region prediction needs a shapes layer: draw a rectangle, then choose that layer.")
            region = shapes_box(shapes, image)
        elif settings.mode == "view":
            region = visible_box(self.session.viewer, image)
        elif settings.view_first:
            priority = visible_box(self.session.viewer, image)
        if region is not None and box_area(region) <= 0:
            raise ConfigError("The region to predict is empty or outside the slide; pan to the slide or redraw.")
        if region is not None and box_area(region) >= 0.999 * whole:
            region = None
        info = ModelInfo.from_model(model)
        chosen = {n: list(self.session.class_colours[n]) for n in info.class_names if self.session.class_colours.get(n)}
        job = SlidePrediction(model, slide, out_dir, settings.prediction,
                              region=_xywh(region) if region is not None else None,
                              priority_box=_xywh(priority) if priority is not None and box_area(priority) > 0 else None,
                              new_name=True, class_colors=chosen)  # never overwrite or reuse a finished output
        with warnings.catch_warnings():  # worded for Python users; _warn_about_scale words it for the widget
            warnings.simplefilter("ignore", TrainingScaleWarning)
            plan = job.plan()
        return [Target(job, plan, class_colors=chosen, image=image)]

    def _warn_about_scale(self, targets: list[Target]) -> None:
        """Notify when a target is predicted far from the scale the model was trained at (once per run)."""
        mismatch = next((m for m in (target.job.scale_mismatch() for target in targets) if m is not None), None)
        self.scale_warning = scale_warning_text(mismatch) if mismatch is not None else None
        if self.scale_warning:
            notify_warning(self.scale_warning)

    def _add_layer(self, target: Target) -> None:
        """The run's layer, made before it starts (adding a layer is slow: never while chunks stream).

        It holds empty placeholders of the output's shape (every pyramid level, from the plan) until the
        first chunk arrives, then the engine's partial store (:meth:`_show_store`), whose every level the
        engine keeps up to date.
        """
        import dask.array as da

        from ._layers import class_features, default_colours

        image, plan = target.image, target.plan
        levels = [da.zeros(shape, dtype="uint8", chunks=plan.chunk) for shape in plan.pyramid_shapes]
        names = list(plan.class_names)
        colours = {i + 1: target.class_colors.get(n) or c
                   for i, (n, c) in enumerate(zip(names, default_colours(len(names)), strict=True))}
        unit = float(image.scale[-1])
        origin = [float(t) / unit for t in image.translate[-2:]]
        oy, ox = plan.origin  # level-0 pixels of the slide where the output starts
        meta = prediction_metadata(None, names, colours, plan.downsample, (oy, ox), status="running",
                                   image=image.name)
        layer = self.session.viewer.add_labels(
            levels if len(levels) > 1 else levels[0], name=f"{plan.name} prediction",
            multiscale=len(levels) > 1, colormap=label_colormap(colours), opacity=0.6,
            units=tuple(image.units[-2:]), features=class_features(names, "no prediction"),
            metadata={META: meta}, **placement(unit, plan.downsample, (origin[0] + oy, origin[1] + ox)))
        keep_read_only(layer)
        target.layer = layer

    @staticmethod
    def _show_store(target: Target, chunk: Any) -> None:
        """Swap the placeholders for the engine's partial store (read-only zarr: no stale dask cache).

        The engine may finish (and rename the partial store) before the GUI gets round to a chunk, even
        while its levels are being opened here; then the placeholders stay, all of them, until the next
        chunk or the finished output attached when the worker returns (:func:`~._stream.open_levels`).
        """
        from ._stream import open_levels

        levels = open_levels(chunk.store, target.plan.pyramid_shapes)
        if levels is None:
            return
        layer = target.layer
        layer.data = levels if len(levels) > 1 else levels[0]
        meta = layer.metadata.get(META, {})
        layer.metadata = {**layer.metadata, META: {**meta, "partial": str(chunk.store)}}
        target.store_shown = True

    # --- control -------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop after the current chunk (finished chunks stay visible; the output stays resumable)."""
        if self.running:
            for target in self.targets:
                target.job.cancel()
            self.status.emit("cancelling")

    # --- worker events (GUI thread) ------------------------------------------------------------------
    def _on_chunk(self, event: tuple[int, Any]) -> None:
        index, chunk = event
        target = self.targets[index]
        if not target.store_shown:
            self._show_store(target, chunk)
        self._schedule_refresh(index)
        self.progress.emit(chunk.done, chunk.total)

    def _schedule_refresh(self, index: int) -> None:
        """Redraw streamed layers at most every ``REFRESH_MS``: a redraw re-reads every chunk in view."""
        from qtpy.QtCore import QTimer

        self._stale.add(index)
        if self._refresh_timer is None:
            self._refresh_timer = QTimer()
            self._refresh_timer.setSingleShot(True)
            self._refresh_timer.setInterval(REFRESH_MS)
            self._refresh_timer.timeout.connect(self._refresh)
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _refresh(self) -> None:
        from ._stream import refresh_layer

        stale, self._stale = self._stale, set()
        for index in sorted(stale):
            if index < len(self.targets) and self.targets[index].layer is not None:
                refresh_layer(self.targets[index].layer)

    def _on_returned(self, value: tuple[str, list[Any]] | Failure) -> None:
        if isinstance(value, Failure):
            self._on_error(value.exc)
            return
        status, outcomes = value
        main = None
        for target, outcome in zip(self.targets, outcomes, strict=False):
            target.outcome = outcome
            if outcome.status != "cancelled":
                self._attach_output(target, outcome.path)
            main = target
        for target in self.targets:  # cancelled: keep what was streamed
            if target.layer is not None and (target.outcome is None or target.outcome.status == "cancelled"):
                meta = target.layer.metadata.get(META, {})
                target.layer.metadata = {**target.layer.metadata, META: {**meta, "status": "cancelled"}}
        main = main or (self.targets[0] if self.targets else None)
        finished = main.outcome if main is not None else None
        if finished is not None and finished.status != "cancelled":
            self.last = PredictOutcome(status, finished.path, main.layer if main else None,
                                       sum(o.chunks_run for o in outcomes), measurements=finished.measurements,
                                       measurement_rows=tuple(finished.measurement_rows))
        else:
            self.last = PredictOutcome(status, None, main.layer if main else None, sum(o.chunks_run for o in outcomes))
        if status == "completed":
            notify_info(f"Prediction finished: {self.last.path}")

    def _attach_output(self, target: Target, path: Path) -> None:
        """Point the layer at the engine's finished store (the partial one it showed was renamed)."""
        from pfmseg_engine.labelstore.omezarr import LabelOutput

        levels = list(LabelOutput(path).levels)
        data = levels if len(levels) > 1 else levels[0]
        partial = f"{path}.partial"  # renamed now: layers of earlier, cancelled runs showed it too
        for layer in list(self.session.viewer.layers):
            meta = layer.metadata.get(META, {})
            if layer is target.layer or (meta.get("kind") == "prediction" and meta.get("partial") == partial):
                layer.data = data
                layer.metadata = {**layer.metadata, META: {**meta, "store": str(path), "status": "completed"}}
                layer.refresh()

    def _on_error(self, exc: BaseException) -> None:
        self.last = PredictOutcome("failed", message=notify_error(exc, "Prediction"))

    def _on_finished(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.stop()
        self._refresh()
        self.worker = None
        self.session.release("predicting")
        outcome = self.last or PredictOutcome("failed")
        self.status.emit(outcome.status)
        self.finished.emit(outcome)


def scale_warning_text(mismatch: Any) -> str:
    """A :class:`~pfmseg_engine.training_scale.ScaleMismatch` in the plugin's words: the widget's setting
    that fixes it, never a command-line flag (napari users may never have seen the CLI)."""
    return (f"{mismatch.summary()} Set '{RESOLUTION_LABEL}' in the Predict widget to {mismatch.suggested_mpp:g} "
            "to predict at the training scale.")


def keep_read_only(layer: Any) -> None:
    """Predictions are outputs, not annotations: napari re-enables editing of single-scale labels
    whenever it re-slices, so switch it off again each time."""

    def lock(*_: Any) -> None:
        if layer.editable:
            layer.editable = False

    layer.events.editable.connect(lock)
    lock()


def prediction_controller(session: Any) -> PredictionController:
    """The session's prediction controller (one per viewer, shared by every Predict widget)."""
    if "prediction" not in session.controllers:
        session.controllers["prediction"] = PredictionController(session)
    return session.controllers["prediction"]


def _first_slide_layer(viewer: Any) -> Any:
    for layer in viewer.layers:
        if getattr(layer, "rgb", False):
            return layer
    return None


def export_prediction(layer: Any, path: str | Path, kind: str, **geojson_options: Any) -> Path:
    """Export a finished prediction layer's store: ``zarr`` (copy), ``tiff`` (pyramidal) or ``geojson``.

    ``geojson_options`` go to :func:`~pfmseg_engine.inference.geojson_export.export_geojson`
    (``per_region``, ``object_type``, ``min_area_um2``, ``frame``)."""
    import shutil

    from pfmseg_engine import ConfigError

    store = layer.metadata.get(META, {}).get("store")
    if not store or not Path(store).exists():
        raise ConfigError(f"Layer '{layer.name}' has no finished prediction to export; let the prediction finish "
                          "(or run it again to resume it) first.")
    path = Path(path)
    if kind == "zarr":
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(store, path)
        return path
    if kind == "tiff":
        from pfmseg_engine.inference.export_tiff import export_ome_tiff

        return export_ome_tiff(store, path)
    if kind == "geojson":
        from pfmseg_engine.inference.geojson_export import export_geojson

        return export_geojson(store, path, **geojson_options)
    raise ConfigError(f"Unknown export format '{kind}'; choose zarr, tiff or geojson.")


def _xywh(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """The plugin's (y0, y1, x0, x1) level-0 box as the engine's (x, y, width, height)."""
    y0, y1, x0, x1 = box
    return x0, y0, x1 - x0, y1 - y0
