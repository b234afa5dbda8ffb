"""Live mode's job: the engine's ``LiveLoop`` in a napari worker, fed with strokes and the visible field.

The worker builds (or continues) a live head, opens the slide's feature store and runs
``LiveLoop.iter_run()``; its events (features stored, training steps, refreshed predictions,
suggestions, the stop) arrive on the GUI thread as signals. Strokes and view changes go the other
way: the GUI thread copies the painted rectangle (cheap) and a single background thread hands it to
the loop, so resampling a large labels array never stalls the viewer and strokes arrive in order.
Stopping keeps the head: the next start continues it, "Save head" writes it as an ordinary
checkpoint, and "Fine-tune fully" makes it the session's model for the Train widget.
Nothing here imports torch on the GUI thread.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

from ._annotations import classes_of
from ._notify import Failure, guarded, guarded_generator, notify_error, notify_info

log = logging.getLogger("napari_pfmseg")

#: (y0, y1, x0, x1) in pixels of a labels layer
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class LiveOptions:
    """What the Live widget chooses; ``settings`` holds further ``LiveSettings`` fields (engine defaults
    otherwise). ``mpp`` None: the Model widget's resolution, else the slide's full resolution."""

    window: int = 512
    mpp: float | None = None
    head: str = "fast"
    uncertainty: str = "entropy"
    device: str = "auto"
    settings: dict[str, Any] = field(default_factory=dict)

    def settings_kwargs(self, mpp: float | None) -> dict[str, Any]:
        return {"window": self.window, "mpp": mpp, "uncertainty": self.uncertainty, "device": self.device,
                **self.settings}


def labels_frame(labels_layer: Any, image: Any) -> tuple[float, float, float]:
    """(x, y, scale) of a labels layer on its slide: level-0 pixel where its pixel (0, 0) starts, and
    level-0 pixels per labels pixel (the engine's label frame)."""
    unit = float(image.scale[-1])
    downsample = float(labels_layer.scale[-1]) / unit
    start = (np.asarray(labels_layer.translate[-2:], float) - np.asarray(image.translate[-2:], float)) / unit
    start -= (downsample - 1.0) / 2.0  # translate is the centre of pixel 0 (see _layers.placement)
    return float(start[1]), float(start[0]), downsample


def stroke_box(atoms: Sequence[Any], shape: Sequence[int]) -> Box | None:
    """Bounding box (y0, y1, x0, x1) of the history atoms of one napari ``paint`` event (None: empty)."""
    boxes: list[Box] = []
    height, width = int(shape[-2]), int(shape[-1])
    for atom in atoms:
        slices = getattr(atom, "slice_key", None)
        if slices is not None:  # a masked atom: the box of the edit
            ys, xs = slices[-2], slices[-1]
            boxes.append((ys.start or 0, height if ys.stop is None else ys.stop,
                          xs.start or 0, width if xs.stop is None else xs.stop))
            continue
        indices = atom[0]
        ys_, xs_ = np.asarray(indices[-2]), np.asarray(indices[-1])
        if ys_.size:
            boxes.append((int(ys_.min()), int(ys_.max()) + 1, int(xs_.min()), int(xs_.max()) + 1))
    if not boxes:
        return None
    y0, y1, x0, x1 = (min(b[0] for b in boxes), max(b[1] for b in boxes),
                      min(b[2] for b in boxes), max(b[3] for b in boxes))
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(height, y1), min(width, x1)
    return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None


def _usable_head(model: Any, class_names: Sequence[str]) -> bool:
    """Whether ``model`` can be continued as the live head: frozen, same classes, a head on grids only."""
    if model is None or tuple(model.class_names) != tuple(class_names):
        return False
    from pfmseg_engine.live import store_refusal

    return store_refusal(model) is None


@guarded_generator
def _run(last: Any, current: Any, build: Any, slide: Any, settings: dict[str, Any]) -> Any:
    """The worker: choose or build the head, open the loop, relay its events; returns the loop."""
    from pfmseg_engine.live import LiveLoop, LiveSettings

    names = settings.pop("class_names")
    if _usable_head(last, names):
        model, origin = last, "continuing the last live head"
    elif _usable_head(current, names):
        model, origin = copy.deepcopy(current), "continuing the current model's head"
    else:
        yield ("status", "building the live head")
        model, origin = build(), "new live head"
    yield ("status", f"{origin}: opening the feature store")
    loop = LiveLoop(model, slide, LiveSettings(**settings))
    yield ("ready", loop)
    for event in loop.iter_run():
        yield ("event", event)
    return loop


def live_controller(session: Any) -> LiveController:
    """The session's live controller (one per viewer, shared by every Live widget)."""
    if "live" not in session.controllers:
        session.controllers["live"] = LiveController(session)
    return session.controllers["live"]


class LiveController:
    """Starts and stops live mode of one session, and carries strokes, views and requests to its loop."""

    claim_name = "live"

    status = Signal(str)
    started = Signal()
    ready = Signal(object)  # the LiveLoop, once it runs: send the view and the labels painted so far
    fill = Signal(object)  # engine FillProgress
    step = Signal(object)  # engine LiveStep
    prediction = Signal(object)  # engine LivePrediction
    suggestions = Signal(object)  # tuple of engine SuggestedRegion
    ended = Signal(str)  # how the run ended: "stopped", or the error message
    model_saved = Signal(object)  # Path of a saved head

    def __init__(self, session: Any):
        self.session = session
        self.worker: Any = None
        self.loop: Any = None  # the running (or last) LiveLoop
        self.model: Any = None  # the last live head (kept after stopping)
        self.steps = 0
        self._stop_requested = False
        self._handoff = False
        self._sender: ThreadPoolExecutor | None = None
        self.pending: list[Future] = []
        self._failure = ""
        self._save_after: Path | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    # --- starting and stopping ----------------------------------------------------------------------
    def start(self, image: Any, annotations: Any, options: LiveOptions) -> Any:
        """Start live mode on ``annotations`` over ``image``; returns the worker (None after an error notice)."""
        if self.running:
            return self.worker
        try:
            from napari.qt.threading import create_worker

            from pfmseg_engine import ConfigError

            if image is None or annotations is None:
                raise ConfigError("Choose a slide and an annotation layer (Annotate widget) first.")
            names, _ = classes_of(annotations)
            if len(names) < 2:
                raise ConfigError(f"Live mode needs at least two classes to tell apart, the annotation layer has "
                                  f"{names}; add a class in the Annotate widget.")
            recipe = self.session.recipe
            slide = self.session.slide_for(image)
            mpp = options.mpp or recipe.mpp or slide.mpp
            settings = {**options.settings_kwargs(mpp), "class_names": tuple(names)}
            if options.device == "auto" and self.session.device != "auto":
                settings["device"] = self.session.device

            def build() -> Any:
                from pfmseg_engine.live import build_live_model, live_model_config

                recipe.model_config(names)  # refuses a full-size backbone without weights, saying where to get them
                config = live_model_config(recipe.backbone, names, weights=recipe.weights, tiny=recipe.tiny,
                                           head=options.head, window=options.window, mpp=mpp)
                return build_live_model(config)

            self.session.claim(self.claim_name)
        except Exception as exc:
            message = notify_error(exc, "Starting live mode")
            self.ended.emit(message)
            return None
        self._stop_requested = self._handoff = False
        self.loop = None
        worker = create_worker(_run, self.model, self.session.model, build, slide, settings, _start_thread=False)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.status.emit("starting")
        self.started.emit()
        worker.start()
        return worker

    def stop(self) -> None:
        """End live mode after the current step; the head is kept."""
        self._stop_requested = True
        if self.loop is not None:
            self.loop.cancel()
        if self.running:
            self.status.emit("stopping")

    cancel = stop  # the session stops every job this way when its viewer closes

    def hand_off(self) -> None:
        """Make the live head the session's model (stopping live mode first), for a full fine-tune."""
        if self.running:
            self._handoff = True
            self.stop()
            return
        self._give_model()

    def _give_model(self) -> None:
        from pfmseg_engine import ConfigError

        if self.model is None:
            notify_error(ConfigError("There is no live head yet: turn Live on and paint first."), "Fine-tuning")
            return
        self.session.set_model(self.model, f"live head ({self.steps} steps)")
        notify_info("The live head is now the current model. Train (pfmseg) fine-tunes it on the same annotation "
                    "layer; for another strategy choose it in the Model widget and press Build, then Train.")

    # --- input to the loop --------------------------------------------------------------------------
    def _send(self, function: Any, *args: Any) -> Future | None:
        if self.loop is None:
            return None
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfmseg-live-labels")
        future = self._sender.submit(function, *args)
        future.add_done_callback(_log_failure)
        self.pending = [f for f in self.pending if not f.done()] + [future]
        return future

    def send_labels(self, labels_layer: Any, image: Any, box: Box | None = None) -> Future | None:
        """Hand the loop the labels of ``box`` (y0, y1, x0, x1 labels pixels; None: the whole layer)."""
        if self.loop is None or not self.running:
            return None
        data = labels_layer.data
        height, width = data.shape[-2:]
        y0, y1, x0, x1 = box or (0, height, 0, width)
        labels = np.array(data[y0:y1, x0:x1], dtype=np.uint8, copy=True)
        classes = self.model.num_classes if self.model is not None else None
        if classes is not None and labels.size and int(labels.max()) > classes:
            from pfmseg_engine import DataError

            notify_error(DataError(f"Label {int(labels.max())} has no class (the live head has {classes}); add "
                                   "the class in the Annotate widget, then turn Live off and on."), "Live mode")
            labels[labels > classes] = 0
        x, y, scale = labels_frame(labels_layer, image)
        return self._send(self.loop.update_labels, labels, (x + x0 * scale, y + y0 * scale), scale)

    def set_view(self, box: tuple[float, float, float, float] | None) -> None:
        """The visible field, (x, y, width, height) level-0 pixels (cheap: the loop only records it)."""
        if self.loop is not None:
            self.loop.set_view(box)

    def request_suggestions(self, k: int) -> Any:
        """Ask for ``k`` regions: from the running loop, else from the last one in a worker."""
        from pfmseg_engine import ConfigError

        if self.loop is None:
            notify_error(ConfigError("Turn Live on first: suggestions rank the windows whose features are stored."),
                         "Suggesting regions")
            return None
        if self.running:
            self.loop.request_suggestions(k)
            return self.worker
        from napari.qt.threading import create_worker

        worker = create_worker(guarded(self.loop.suggest), k, _start_thread=False)
        worker.returned.connect(self._on_suggested)
        worker.start()
        return worker

    def save(self, path: str | Path) -> Any:
        """Write the last head as an ordinary checkpoint (in a worker); ``model_saved`` says when.

        While live mode runs it stops first: the head is read when the worker no longer trains it.
        """
        from pfmseg_engine import ConfigError

        if self.running:
            self._save_after = Path(path)
            self.stop()
            return None
        if self.loop is None:
            notify_error(ConfigError("There is no live head to save yet: turn Live on and paint first."),
                         "Saving the live head")
            return None
        from napari.qt.threading import create_worker

        worker = create_worker(guarded(self.loop.save), Path(path), _start_thread=False)
        worker.returned.connect(self._on_saved)
        worker.start()
        return worker

    # --- worker events (GUI thread) -----------------------------------------------------------------
    def _on_event(self, item: tuple[str, Any]) -> None:
        what, value = item
        if what == "status":
            self.status.emit(value)
        elif what == "ready":
            self.loop, self.model = value, value.model
            if self._stop_requested:
                value.cancel()
            self.status.emit("live: paint on the annotation layer")
            self.ready.emit(value)
        else:
            kind = value.kind
            if kind == "fill":
                self.fill.emit(value)
            elif kind == "step":
                self.steps = value.step
                self.step.emit(value)
            elif kind == "prediction":
                self.prediction.emit(value)
            elif kind == "suggestions":
                self.suggestions.emit(value.regions)
            elif kind == "stopped":
                self.steps = value.steps

    def _on_returned(self, value: Any) -> None:
        if isinstance(value, Failure):
            self._failure = notify_error(value.exc, "Live mode")

    def _on_finished(self) -> None:
        failure, self._failure = self._failure, ""
        self.worker = None
        self.session.release(self.claim_name)
        if self._handoff and not failure:
            self._handoff = False
            self._give_model()
        save, self._save_after = self._save_after, None
        if save is not None and not failure:
            self.save(save)
        self.status.emit(failure or f"stopped after {self.steps} steps; the head is kept")
        self.ended.emit(failure or "stopped")

    def _on_suggested(self, value: Any) -> None:
        if isinstance(value, Failure):
            notify_error(value.exc, "Suggesting regions")
            return
        self.suggestions.emit(tuple(value))

    def _on_saved(self, value: Any) -> None:
        if isinstance(value, Failure):
            notify_error(value.exc, "Saving the live head")
            return
        notify_info(f"Saved the live head to {value} (a frozen-strategy checkpoint: infer, evaluate and compare "
                    "accept it).")
        self.model_saved.emit(value)


def _log_failure(future: Future) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("Handing strokes to the live loop failed: %s", exc, exc_info=(type(exc), exc, exc.__traceback__))
