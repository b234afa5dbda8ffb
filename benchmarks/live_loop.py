"""Live mode's speed: end of a stroke -> refreshed prediction, feature fill, and GUI event-loop gaps.

Two parts, both on random-weight backbones (no pathology weights are needed to time them):

1. **Loop latency** (no GUI). A live head on ``kaiko-vits16`` (ViT-S/16, full size) and on
   ``kaiko-vitb16`` (ViT-B/16) over a ``--field`` px square (default 2048) of the CMU slide at its
   full resolution: the field's features are stored first (``feature_fill_windows_per_s``), then
   ``--strokes`` strokes are painted one after the other, each waiting for its refreshed prediction of
   the field; ``stroke_to_update_s`` is the median of ``LivePrediction.latency`` (seconds from
   ``update_labels`` to the refreshed field: ``--first-steps`` training steps, or the loop's
   ``first_seconds`` if sooner, plus predicting the field). Training stops at the refresh
   (``max_steps = first_steps``), so every stroke is timed from an idle loop and nothing else competes.
2. **GUI gaps.** A real napari viewer (Xvfb when there is no display) with a 20 ms ``QTimer`` on the
   GUI thread; the longest gap between two ticks while each action runs is how long the viewer froze:
   slide open, opening each pfmseg widget, creating the annotation layer, live mode (start, feature
   fill, strokes, refreshed predictions), GeoJSON export and import, and the start of a whole-slide
   prediction. ``gui_max_gap_ms`` is the worst of them.

Ends with one JSON line (``stroke_to_update_s``, ``gui_max_gap_ms``, ``feature_fill_windows_per_s``, ...)::

    python benchmarks/live_loop.py                    # both parts (several minutes on 2 cores)
    python benchmarks/live_loop.py --skip-gui --backbones kaiko-vits16
    python benchmarks/live_loop.py --skip-latency     # GUI gaps only

Targets (issue 17): stroke -> update <= 2 s median with ViT-S/16, <= 5 s with ViT-B/16; gaps <= 100 ms.
Feature stores and outputs go to a temporary folder, never the user's pfmseg cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SLIDE = HERE.parent.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
CLASSES = ("tumour", "stroma", "background")


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def stroke_labels(height: int, width: int, seed: int) -> Any:
    """A painted rectangle: two classes split by a diagonal, the third in a band (like scribbles)."""
    import numpy as np

    yy, xx = np.mgrid[:height, :width]
    labels = np.where(yy * width > xx * height, 1, 2).astype(np.uint8)
    band = (yy // 16 + seed) % 5 == 0
    labels[band] = 3
    return labels


def latency(backbone: str, args: argparse.Namespace, store_root: Path) -> dict[str, Any]:
    """Fill the field's features, then time ``args.strokes`` strokes -> refreshed field predictions."""
    import numpy as np

    from pfmseg_engine.live import LiveLoop, LiveSettings, build_live_model, live_model_config
    from pfmseg_engine.slides import open_slide

    slide = open_slide(args.slide, mpp=0.499)
    model = build_live_model(live_model_config(backbone, CLASSES, window=args.window, mpp=None))
    settings = LiveSettings(window=args.window, device="cpu", store_root=str(store_root), fill_outward=False,
                            tissue=False, max_steps=args.first_steps, first_steps=args.first_steps)
    loop = LiveLoop(model, slide, settings)
    width, height = slide.level_dimensions[0]
    side = min(args.field, width, height)
    step = loop.geometry.window * loop.geometry.downsample  # the field starts on a window: field / window squared
    x0 = int((width - side) // 2 // step * step)
    y0 = int((height - side) // 2 // step * step)
    loop.set_view((x0, y0, side, side))
    events: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: [events.put(e) for e in loop.iter_run()], daemon=True)
    began = time.perf_counter()
    thread.start()
    filled = fill_seconds = 0.0
    total = None
    while True:  # the view's windows are stored first
        event = events.get(timeout=3600)
        if event.kind == "fill":
            filled, total = event.done, event.total
            fill_seconds += event.seconds
            if event.done >= event.total:
                break
    fill_wall = time.perf_counter() - began
    latencies, heads = [], []
    rng = np.random.default_rng(0)
    for i in range(args.strokes):
        sx = int(x0 + rng.integers(0, side - args.stroke))
        sy = int(y0 + rng.integers(0, side - args.stroke))
        loop.update_labels(stroke_labels(args.stroke, args.stroke, i), offset=(sx, sy))
        version = loop.labels.version
        while True:
            event = events.get(timeout=3600)
            if event.kind == "prediction" and event.latency is not None and event.labels_version == version:
                latencies.append(event.latency)
                heads.append(event.seconds)
                break
    loop.cancel()
    thread.join(timeout=600)
    shape = list(event.labels.shape)
    return {"backbone": backbone, "field_px": side, "window": args.window, "windows_filled": int(filled),
            "windows_total": total, "fill_seconds": round(fill_seconds, 2), "fill_wall_seconds": round(fill_wall, 2),
            "feature_fill_windows_per_s": round(filled / max(fill_seconds, 1e-9), 3),
            "stroke_to_update_s": round(statistics.median(latencies), 3),
            "stroke_to_update_all_s": [round(v, 3) for v in latencies],
            "predict_field_s": round(statistics.median(heads), 3), "prediction_shape": shape,
            "first_steps": args.first_steps, "store_mb": round(loop.store.disk_bytes() / 1e6, 1)}


# --- GUI gaps -----------------------------------------------------------------------------------------
def start_display() -> Any:
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform != "linux":
        return None
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=(1600, 1000))
    display.start()
    return display


class Meter:
    """A 20 ms timer on the GUI thread; the longest gap between ticks while an action runs is a freeze."""

    def __init__(self, interval_ms: int):
        from qtpy.QtCore import QElapsedTimer, QTimer

        self.clock, self.timer = QElapsedTimer(), QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[int] = []
        self.last = 0
        self.rows: list[dict[str, Any]] = []
        self.wall = time.perf_counter()  # of the last tick, read by the watchdog thread
        self.name = ""
        self.stacks: list[tuple[str, str]] = []

    def _tick(self) -> None:
        now = self.clock.elapsed()
        self.gaps.append(now - self.last)
        self.last = now
        self.wall = time.perf_counter()

    def watch(self, threshold_ms: float) -> None:
        """Record where the GUI thread is when a tick is ``threshold_ms`` late (once per gap), to name causes."""
        import traceback

        main = threading.main_thread().ident

        def run() -> None:
            seen = 0.0
            while True:
                time.sleep(0.01)
                tick = self.wall
                if time.perf_counter() - tick > threshold_ms / 1000 and tick != seen and self.timer.isActive():
                    seen = tick
                    frame = sys._current_frames().get(main)
                    if frame is not None:
                        frames = traceback.extract_stack(frame)[-8:]
                        text = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
                        self.stacks.append((self.name, text))

        threading.Thread(target=run, daemon=True).start()

    def phase(self, name: str, action: Any, until: Any = None, timeout_s: float = 600.0, settle_ms: int = 300) -> Any:
        """Run ``action()`` from the event loop, keep the loop running until ``until()`` (then ``settle_ms``)."""
        from qtpy.QtCore import QEventLoop, QTimer

        loop, result, began = QEventLoop(), [], time.perf_counter()

        def run() -> None:
            result.append(action())

        def check() -> None:
            done = bool(result) and (until is None or until())
            if done or time.perf_counter() - began > timeout_s:
                poll.stop()
                QTimer.singleShot(settle_ms, loop.quit)

        self.gaps = []
        self.name = name
        self.clock.start()
        self.last = 0
        self.wall = time.perf_counter()
        self.timer.start()
        poll = QTimer()
        poll.setInterval(50)
        poll.timeout.connect(check)
        QTimer.singleShot(40, run)  # two quiet ticks first: the action's gap is measured from a running timer
        poll.start()
        loop.exec()
        self.timer.stop()
        gaps = self.gaps[1:] or [0]
        row = {"phase": name, "max_gap_ms": max(gaps), "ticks": len(gaps), "seconds": round(time.perf_counter()
                                                                                           - began, 2),
               "completed": bool(result) and (until is None or bool(until()))}
        self.rows.append(row)
        print(f"  {name:<28} longest gap {row['max_gap_ms']:>6} ms  ({row['seconds']} s)", file=sys.stderr)
        return result[0] if result else None


def gui_gaps(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import napari

    viewer = napari.Viewer(show=True)
    meter = Meter(args.interval)
    meter.watch(args.diagnose_ms)
    try:
        meter.phase("idle (machine load only)", lambda: None, settle_ms=3000)
        [image] = meter.phase("slide open", lambda: viewer.open(str(args.slide), plugin="pfmseg"))
        viewer.reset_view()
        widgets: dict[str, Any] = {}
        names = {"Model": "_model_widget:ModelWidget", "Annotate": "_annotate_widget:AnnotateWidget",
                 "Train": "_train_widget:TrainWidget", "Predict": "_predict_widget:PredictWidget",
                 "Live": "_live_widget:LiveWidget"}
        for title, target in names.items():
            module, cls = target.split(":")

            def open_widget(module: str = module, cls: str = cls, title: str = title) -> Any:
                import importlib

                widget = getattr(importlib.import_module(f"napari_pfmseg.{module}"), cls)(viewer)
                viewer.window.add_dock_widget(widget, name=title, tabify=True)
                widgets[title] = widget
                return widget

            meter.phase(f"open {title} widget", open_widget)
        annotate, live, predict = widgets["Annotate"], widgets["Live"], widgets["Predict"]
        annotate.image.set_layer(image)
        annotate.target_mpp.setValue(2.0)
        layer = meter.phase("new annotation layer", annotate.create_layer)
        live.image.set_layer(image)
        live.annotations.set_layer(layer)
        live.window_px.setValue(args.window)
        live.extra_settings = {"store_root": str(work / "features"), "fill_outward": False,
                               "first_steps": args.first_steps, "device": "cpu"}
        # a random-weight ViT-S head handed to the controller (the widget refuses full-size backbones without
        # weights, rightly for real use)
        from napari_pfmseg._annotations import classes_of
        from pfmseg_engine.live import build_live_model, live_model_config

        classes, _ = classes_of(layer)
        live.controller.model = build_live_model(live_model_config(args.gui_backbone, classes, window=args.window))
        controller = live.controller
        filled: list[Any] = []
        controller.fill.connect(lambda event: filled.append(event) if event.done >= event.total else None)
        meter.phase("live: start + fill the view", live.start, until=lambda: bool(filled))
        layer.brush_size = 8

        from qtpy.QtCore import QTimer

        brush = QTimer()
        brush.setInterval(15)
        points: list[tuple[int, int, int]] = []

        def dab() -> None:  # one brush dab per timer event, as mouse moves arrive
            if points:
                y, x, label = points.pop(0)
                layer.paint((y, x), label)
            else:
                brush.stop()

        brush.timeout.connect(dab)

        def stroke(y: int, label: int) -> None:
            points.extend((y, x, label) for x in range(100, 400, 4))
            brush.start()

        for i, (y, label) in enumerate(((200, 1), (420, 2), (600, 1))):
            seen = live.predictions
            meter.phase(f"live: stroke {i + 1} -> update", lambda y=y, label=label: stroke(y, label),
                        until=lambda seen=seen: not points and live.predictions > seen)
        meter.phase("live: pan the view", lambda: setattr(live._camera(), "center",
                                                          tuple(c * 0.8 for c in live._camera().center)),
                    until=lambda: live.predictions > 3 or controller.loop is None, timeout_s=120)
        meter.phase("live: stop", live.stop, until=lambda: not controller.running)
        path = work / "annotations.geojson"
        meter.phase("GeoJSON export", lambda: annotate.export_geojson(path))
        meter.phase("GeoJSON import", lambda: annotate.import_geojson(path))
        controller.hand_off()
        live.session.choose_output_folder(work / "outputs")  # never beside the slide (shared, read-only data)
        if hasattr(predict, "window_size"):
            predict.window_size.setValue(args.window)
        predict.set_mode("slide")
        started: list[float] = []

        def start_prediction() -> Any:
            started.append(time.perf_counter())
            return predict.predict()

        meter.phase("prediction start", start_prediction,
                    until=lambda: bool(started) and time.perf_counter() - started[0] > args.predict_seconds)
        predict.controller.cancel()
        meter.phase("prediction cancel", lambda: True, until=lambda: not predict.controller.running, timeout_s=120)
        if meter.stacks:
            print("where the GUI thread was during gaps longer than "
                  f"{args.diagnose_ms} ms (innermost first):", file=sys.stderr)
            for name, text in meter.stacks:
                print(f"  [{name}] {text}", file=sys.stderr)
        return meter.rows
    finally:
        viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=SLIDE)
    parser.add_argument("--backbones", nargs="+", default=["kaiko-vits16", "kaiko-vitb16"])
    parser.add_argument("--gui-backbone", default="kaiko-vits16")
    parser.add_argument("--field", type=int, default=2048, help="visible field side, level-0 px")
    parser.add_argument("--window", type=int, default=512, help="model window, px")
    parser.add_argument("--stroke", type=int, default=192, help="stroke rectangle side, level-0 px")
    parser.add_argument("--strokes", type=int, default=5)
    parser.add_argument("--first-steps", type=int, default=8, help="training steps before the refreshed prediction")
    parser.add_argument("--interval", type=int, default=20, help="GUI timer, ms")
    parser.add_argument("--predict-seconds", type=float, default=4.0, help="how long the prediction start is watched")
    parser.add_argument("--diagnose-ms", type=float, default=150.0,
                        help="print where the GUI thread was during gaps longer than this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-gui", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*randomly initialised.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    summary: dict[str, Any] = {"benchmark": "live_loop", "machine": machine(),
                               "weights": "random (no pathology weights on this machine)"}
    with tempfile.TemporaryDirectory(prefix="pfmseg-live-benchmark-") as tmp:
        work = Path(tmp)
        os.environ["PFMSEG_CACHE_DIR"] = str(work / "cache")
        if not args.skip_latency:
            runs = []
            for backbone in args.backbones:
                print(f"latency: {backbone} ...", file=sys.stderr)
                result = latency(backbone, args, work / "store")
                print(f"  {json.dumps(result)}", file=sys.stderr)
                runs.append(result)
            summary["latency"] = runs
            first = runs[0]
            summary.update(stroke_to_update_s=first["stroke_to_update_s"],
                           feature_fill_windows_per_s=first["feature_fill_windows_per_s"])
            for run in runs[1:]:
                summary[f"stroke_to_update_s_{run['backbone']}"] = run["stroke_to_update_s"]
                summary[f"feature_fill_windows_per_s_{run['backbone']}"] = run["feature_fill_windows_per_s"]
        if not args.skip_gui:
            print("GUI gaps ...", file=sys.stderr)
            display = start_display()
            try:
                rows = gui_gaps(args, work)
            finally:
                if display is not None:
                    display.stop()
            worst = max(rows[1:], key=lambda r: r["max_gap_ms"])  # rows[0]: idle baseline
            summary.update(gui_max_gap_ms=worst["max_gap_ms"], gui_worst_phase=worst["phase"],
                           gui_idle_gap_ms=rows[0]["max_gap_ms"],
                           gui_gaps_ms={r["phase"]: r["max_gap_ms"] for r in rows})
    print(json.dumps(summary), flush=True)
    if not args.skip_gui:
        # Qt's connection to the virtual display is gone once the display stops, and the interpreter's normal
        # teardown of Qt objects can then block forever; everything is written, so leave at once.
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
