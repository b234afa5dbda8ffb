"""Prediction of the visible area, a drawn region or the whole slide, streamed into a labels layer.

Each run is planned on the GUI thread with the engine's torch-free ``plan_slide`` (cheap: geometry only;
tissue detection happens when the worker first needs it), and the layer's shape, placement, pyramid
and name come from that plan, never from engine internals. The engine's ``iter_execute_plan`` runs the
plan in a napari ``thread_worker`` generator and yields every finished chunk; the layer shows the
engine's own (partial) store, whose coarser levels the engine keeps up to date, and the GUI thread only
refreshes it, so results appear while the slide is processed, zoomed in or out. Regions are the
plan's ``region=``; for a whole slide, the area in view is computed first (``priority_box=``). When a
run completes, the layer switches to the engine's finished OME-Zarr output, which is what exports and
the reader use. Cancelling stops after the current chunk and leaves the finished chunks shown and the
engine's ``.partial`` output resumable. A run at a resolution more than 25 % away from the scale the model
was trained at gets a warning notification naming the Predict widget's resolution value that matches
training (the engine decides, :func:`~pfmseg_engine.inference.scale.check_training_scale`; the plugin words it).
"""

from __future__ import annotations

import threading
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


@dataclass(frozen=True)
class PredictSettings:
    mode: str = "view"
    target_mpp: float | None = None  # None: the model's training resolution, else slide level 0
    window: int | None = None  # None: the model's input size
    overlap: float = 0.25
    batch_size: int = 4
    chunk: int = 512
    tissue: bool = True
    view_first: bool = True
    output_dir: str | None = None


@dataclass
class Target:
    """One engine run: its plan (slide, region, geometry, output paths) and where its layer goes."""

    plan: Any  # pfmseg_engine.inference.plan.SlidePlan
    class_colors: dict[str, list[int]] = field(default_factory=dict)
    image: Any = None
    layer: Any = None
    store_shown: bool = False
    result: Any = None


@dataclass
class PredictOutcome:
    status: str  # completed, cancelled, failed
    path: Path | None = None
    layer: Any = None
    chunks: int = 0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@guarded_generator
def _run(model: Any, targets: list[Target], device: str, cancel: threading.Event):
    """The worker: run each target's plan in turn, yielding (target index, chunk result).

    A finished output gets its measurements CSV here, in the worker (it reads the whole store)."""
    from pfmseg_engine.annotations.measurements import read_measurements, write_measurements
    from pfmseg_engine.inference.slide import iter_execute_plan

    results = []
    for index, target in enumerate(targets):
        generator = iter_execute_plan(target.plan, model, device=device, class_colors=target.class_colors)
        try:
            while True:
                try:
                    chunk = next(generator)
                except StopIteration as stop:
                    result = stop.value
                    csv = write_measurements(result.path)
                    result.extra["measurements"] = {"path": csv, "rows": read_measurements(csv)}
                    results.append(result)
                    break
                yield index, chunk
                if cancel.is_set():
                    return "cancelled", results
        finally:
            generator.close()
    return "completed", results


class PredictionController:
    """Starts and cancels prediction runs of one session; the Predict widget listens to its signals."""

    progress = Signal(int, int)  # chunks done, total (of the main run)
    status = Signal(str)
    finished = Signal(object)  # PredictOutcome

    def __init__(self, session: Any):
        self.session = session
        self.worker: Any = None
        self.cancel_event = threading.Event()
        self.targets: list[Target] = []
        self.last: PredictOutcome | None = None
        self.settings = PredictSettings()
        self.image: Any = None
        self.shapes: Any = None
        self._stale: set[int] = set()
        self.settings_source: Any = None  # the Predict widget's form, when one is open
        self._refresh_timer: Any = None
        self.scale_warning: str | None = None  # the last run's training-scale warning, as shown
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
            return self._start(image, settings, shapes)
        except Exception as exc:
            if not self.running:  # never release the claim of a run that is still going
                self.session.release("predicting")
            self.last = PredictOutcome("failed", message=notify_error(exc, "Prediction"))
            return None

    def _start(self, image: Any, settings: PredictSettings, shapes: Any) -> Any:
        from napari.qt.threading import create_worker

        from pfmseg_engine import ConfigError, resolve_device
        from pfmseg_engine.inference.plan import SlideInferenceConfig

        session = self.session
        if session.model is None:
            raise ConfigError("No model yet: build or load one in the Model widget, or train one first.")
        if settings.mode not in MODES:
            raise ConfigError(f"Unknown prediction mode '{settings.mode}'; choose one of {', '.join(MODES)}.")
        session.claim("predicting")
        self.image, self.shapes, self.settings = image, shapes, settings
        session.current_image = image
        device = str(resolve_device(session.device))
        slide = session.slide_for(image)
        slide.require_mpp()
        model = session.model
        config = SlideInferenceConfig(target_mpp=settings.target_mpp, window=settings.window,
                                      overlap=settings.overlap, batch_size=settings.batch_size,
                                      chunk=settings.chunk, tissue=settings.tissue)
        out_dir = Path(settings.output_dir).expanduser() if settings.output_dir else session.output_dir("predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        targets = self._targets(image, slide, settings, shapes, model, config, out_dir)
        self._warn_about_scale(model, targets)
        for target in targets:
            self._add_layer(target)
        self.targets = targets
        self.cancel_event = threading.Event()
        worker = create_worker(_run, model, targets, device, self.cancel_event, _start_thread=False)
        worker.yielded.connect(self._on_chunk)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.status.emit("predicting")
        worker.start()
        return worker

    # --- planning (GUI thread, cheap) ----------------------------------------------------------------
    def _targets(self, image: Any, slide: Any, settings: PredictSettings, shapes: Any, model: Any, config: Any,
                 out_dir: Path) -> list[Target]:
        """Plan the run (the engine's torch-free plan: geometry, names and paths; no model is moved)."""
        from pfmseg_engine import ConfigError
        from pfmseg_engine.errors import TrainingScaleWarning
        from pfmseg_engine.inference.plan import ModelInfo, plan_slide

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
        options = {"region": _xywh(region) if region is not None else None,
                   "priority_box": _xywh(priority) if priority is not None and box_area(priority) > 0 else None,
                   "output_dir": out_dir}
        with warnings.catch_warnings():  # worded for Python users; _warn_about_scale words it for the widget
            warnings.simplefilter("ignore", TrainingScaleWarning)
            plan = plan_slide(slide, info, config, **options)
            free = _free_name(out_dir, plan.name)  # never overwrite or reuse a finished output
            if free != plan.name:
                plan = plan_slide(slide, info, config, name=free, **options)
        return [Target(plan, class_colors=chosen, image=image)]

    def _warn_about_scale(self, model: Any, targets: list[Target]) -> None:
        """Notify when a target is predicted far from the scale the model was trained at (once per run)."""
        from pfmseg_engine.inference.scale import check_training_scale, training_scale_of

        scale = training_scale_of(model)
        mismatches = (check_training_scale(scale, target.plan.mpp) for target in targets)
        mismatch = next((m for m in mismatches if m is not None), None)
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
            self.cancel_event.set()
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
        status, results = value
        main = None
        for target, result in zip(self.targets, results, strict=False):
            target.result = result
            self._attach_output(target, result)
            main = target
        for target in self.targets[len(results):]:  # cancelled: keep what was streamed
            if target.layer is not None:
                meta = target.layer.metadata.get(META, {})
                target.layer.metadata = {**target.layer.metadata, META: {**meta, "status": "cancelled"}}
            main = main or target
        path = main.result.path if main is not None and main.result is not None else None
        measured = main.result.extra.get("measurements", {}) if main is not None and main.result is not None else {}
        self.last = PredictOutcome(status, path, main.layer if main else None,
                                   sum(r.chunks_run for r in results), extra={"measurements": measured})
        if status == "completed":
            notify_info(f"Prediction finished: {path}")

    def _attach_output(self, target: Target, result: Any) -> None:
        """Point the layer at the engine's finished store (the partial one it showed was renamed)."""
        from pfmseg_engine.inference.omezarr import LabelOutput

        levels = list(LabelOutput(result.path).levels)
        data = levels if len(levels) > 1 else levels[0]
        partial = f"{result.path}.partial"  # renamed now: layers of earlier, cancelled runs showed it too
        for layer in list(self.session.viewer.layers):
            meta = layer.metadata.get(META, {})
            if layer is target.layer or (meta.get("kind") == "prediction" and meta.get("partial") == partial):
                layer.data = data
                layer.metadata = {**layer.metadata, META: {**meta, "store": str(result.path), "status": "completed"}}
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
    """A :class:`~pfmseg_engine.inference.scale.ScaleMismatch` in the plugin's words: the widget's setting
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


def _free_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... so a finished output is never overwritten or reused."""
    from pfmseg_engine.inference.plan import SUFFIX

    candidate, n = name, 1
    while (folder / f"{candidate}{SUFFIX}").exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


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
