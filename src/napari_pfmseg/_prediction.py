"""Prediction of the visible area, a drawn region or the whole slide, streamed into a labels layer.

The engine's ``iter_predict_slide`` runs in a napari ``thread_worker`` generator and yields every
finished chunk; the GUI thread writes it into the layer's display pyramid (:mod:`._stream`) and
refreshes the layer, so results appear while the slide is processed. For a whole slide, the area in
view is predicted first (a quick region run shown underneath), then the whole slide replaces it.
When a run completes, the layer switches to the engine's OME-Zarr output, which is what exports
and the reader use. Cancelling stops after the current chunk and leaves the finished chunks shown
and the engine's ``.partial`` output resumable.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from psygnal import Signal

from ._layers import META, label_colormap, placement, prediction_metadata
from ._notify import Failure, guarded_generator, notify_error, notify_info

MODES = ("view", "region", "slide")
#: Layers are redrawn at most this often while chunks stream in (each redraw re-reads the view).
REFRESH_MS = 200
#: A view covering more than this fraction of the slide is predicted as the whole slide directly.
VIEW_FIRST_MAX_FRACTION = 0.5


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
    """One engine run: which slide (or region of it) and where its layer goes."""

    slide: Any
    offset_px: tuple[float, float]
    name: str
    plan: Any
    window: int
    chunk: int
    role: str = "main"  # or "preview"
    layer: Any = None
    pyramid: Any = None
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
def _run(model: Any, targets: list[Target], config: Any, device: str, out_dir: Path, cancel: threading.Event):
    """The worker: run the engine on each target in turn, yielding (target index, chunk result)."""
    from pfmseg_engine.inference.slide import iter_predict_slide

    results = []
    for index, target in enumerate(targets):
        generator = iter_predict_slide(model, target.slide, out_dir, replace(config, chunk=target.chunk),
                                       device=device, name=target.name)
        try:
            while True:
                try:
                    chunk = next(generator)
                except StopIteration as stop:
                    results.append(stop.value)
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
        from pfmseg_engine.inference.slide import SlideInferenceConfig

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
        targets = self._targets(image, slide, settings, shapes, model, config)
        out_dir = Path(settings.output_dir).expanduser() if settings.output_dir else session.output_dir("predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        for target in targets:
            target.name = _free_name(out_dir, target.name)
            self._add_layer(image, target, model, out_dir)
        self.targets = targets
        self.cancel_event = threading.Event()
        worker = create_worker(_run, model, targets, config, device, out_dir, self.cancel_event,
                               _start_thread=False)
        worker.yielded.connect(self._on_chunk)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.status.emit("predicting")
        worker.start()
        return worker

    # --- planning (GUI thread, cheap) ----------------------------------------------------------------
    def _targets(self, image: Any, slide: Any, settings: PredictSettings, shapes: Any, model: Any, config: Any
                 ) -> list[Target]:
        from pfmseg_engine import ConfigError

        from ._engine_adapter import crop_slide
        from ._slides import box_area, shapes_box, visible_box

        height, width = slide.levels[0].shape[:2]
        whole = float(height * width)
        if settings.mode == "region":
            if shapes is None:
                raise ConfigError("Region prediction needs a shapes layer: draw a rectangle, then choose that layer.")
            boxes = [("region", shapes_box(shapes, image))]
        elif settings.mode == "view":
            boxes = [("view", visible_box(self.session.viewer, image))]
        else:
            view = visible_box(self.session.viewer, image)
            small = 0 < box_area(view) < VIEW_FIRST_MAX_FRACTION * whole
            boxes = [("preview", view)] if settings.view_first and small else []
            boxes.append(("slide", None))
        targets = []
        for role, box in boxes:
            if box is not None and box_area(box) <= 0:
                raise ConfigError("The region to predict is empty or outside the slide; pan to the slide or redraw.")
            if box is None or box_area(box) >= 0.999 * whole:
                part, offset, name = slide, (0.0, 0.0), slide.name
            else:
                part, aligned = crop_slide(slide, box)
                offset, name = (float(aligned[0]), float(aligned[2])), part.name
            targets.append(self._target(part, offset, name, model, config, "preview" if role == "preview" else "main"))
        return targets

    @staticmethod
    def _target(slide: Any, offset: tuple[float, float], name: str, model: Any, config: Any, role: str) -> Target:
        from pfmseg_engine.inference.slide import DEFAULT_WINDOW
        from pfmseg_engine.slides import plan_resolution

        plan = plan_resolution(slide, config.target_mpp or model.config.mpp, config.mpp_tolerance)
        window = int(config.window or model.config.input_size or DEFAULT_WINDOW)
        return Target(slide, offset, name, plan, window, max(int(config.chunk), window), role)

    def _add_layer(self, image: Any, target: Target, model: Any, out_dir: Path) -> None:
        from ._layers import default_colours
        from ._stream import StreamingPyramid

        names = list(model.config.class_names)
        chosen = self.session.class_colours
        colours = {i + 1: chosen.get(n) or c for i, (n, c) in enumerate(zip(names, default_colours(len(names)),
                                                                             strict=True))}
        target.pyramid = StreamingPyramid(tuple(target.plan.shape), target.chunk, folder=out_dir)
        unit = float(image.scale[-1])
        origin = [float(t) / unit for t in image.translate[-2:]]
        offset = (origin[0] + target.offset_px[0], origin[1] + target.offset_px[1])
        meta = prediction_metadata(None, names, colours, target.plan.downsample, target.offset_px,
                                   status="running", role=target.role, image=image.name)
        from ._layers import class_features

        layer = self.session.viewer.add_labels(
            target.pyramid.data(), name=f"{target.name} {'preview' if target.role == 'preview' else 'prediction'}",
            multiscale=len(target.pyramid.levels) > 1, colormap=label_colormap(colours), opacity=0.6,
            units=tuple(image.units[-2:]), features=class_features(names, "no prediction"),
            metadata={META: meta}, **placement(unit, target.plan.downsample, offset))
        keep_read_only(layer)
        target.layer = layer

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
        target.pyramid.add(chunk.box, chunk.labels)
        self._schedule_refresh(index)
        if target.role == "main":
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
            if target.role == "preview":
                if status == "completed":
                    self._drop(target)
                continue
            self._attach_output(target, result)
            main = target
        for target in self.targets[len(results):]:  # cancelled: keep what was streamed
            meta = target.layer.metadata.get(META, {})
            target.layer.metadata = {**target.layer.metadata, META: {**meta, "status": "cancelled"}}
            main = main or (target if target.role == "main" else None)
        path = main.result.path if main is not None and main.result is not None else None
        self.last = PredictOutcome(status, path, main.layer if main else None,
                                   sum(r.chunks_run for r in results))
        if status == "completed":
            notify_info(f"Prediction finished: {path}")

    def _attach_output(self, target: Target, result: Any) -> None:
        """Point the layer at the engine's finished store and drop the display pyramid."""
        from pfmseg_engine.inference.omezarr import LabelOutput

        from ._engine_adapter import set_store_attrs, set_store_colours

        layer = target.layer
        meta = layer.metadata.get(META, {})
        colours = {int(k): list(v) for k, v in meta.get("colours", {}).items()}
        set_store_colours(result.path, colours)  # exports and the reader show the annotation colours
        set_store_attrs(result.path, {"napari_pfmseg": {"offset_px": list(target.offset_px)}})
        output = LabelOutput(result.path)
        levels = list(output.levels)
        if len(levels) == len(target.pyramid.levels):
            layer.data = levels if len(levels) > 1 else levels[0]
        layer.metadata = {**layer.metadata, META: {**meta, "store": str(result.path), "status": "completed",
                                                   "colours": {int(k): list(v) for k, v in colours.items()}}}
        if len(levels) == len(target.pyramid.levels):
            target.pyramid.close()
        layer.refresh()

    def _drop(self, target: Target) -> None:
        viewer = self.session.viewer
        if target.layer in viewer.layers:
            viewer.layers.remove(target.layer)
        target.pyramid.close()

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
    from pfmseg_engine.inference.slide import SUFFIX

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


def export_prediction(layer: Any, path: str | Path, kind: str) -> Path:
    """Export a finished prediction layer's store: ``zarr`` (copy), ``tiff`` (pyramidal) or ``geojson``."""
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
        from pfmseg_engine.inference.export_geojson import export_geojson

        return export_geojson(store, path)
    raise ConfigError(f"Unknown export format '{kind}'; choose zarr, tiff or geojson.")
