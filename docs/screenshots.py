"""Drive the napari plugin under a virtual display and save the README screenshots.

    python docs/screenshots.py [--out docs/images] [--epochs 15]

Opens the demo slide, paints annotations, fine-tunes a model in the Train widget, streams a
whole-slide prediction and ranks three backbones x two strategies in the Compare widget within a
time budget, saving ``annotations.png``, ``training.png``, ``prediction_streaming.png``,
``prediction.png`` and ``compare.png`` (each dock with its run's slide, progress, status, output
folder and, for Predict, the measurements). Outputs and remembered choices go to a temporary folder,
never the user's. Without a display it starts a virtual one (``xvfb-run``, or
``pyvirtualdisplay`` when installed). The model is the tiny random-weight test variant of
Kaiko ViT-S/16 so the script runs on any CPU in a minute; with real weights (Model widget) the
same steps give real predictions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = {"backbone": "kaiko-vits16", "tiny": True, "input_size": 64, "mpp": 1.0, "strategy": "cnn_adapter"}
CLASSES = (["stained gland", "stroma"], [[235, 125, 20], [40, 170, 70]])


def ensure_display() -> None:
    """Re-run under xvfb-run (or start pyvirtualdisplay) when there is no X display."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform != "linux":
        return
    if shutil.which("xvfb-run") and not os.environ.get("PFMSEG_UNDER_XVFB"):
        env = {**os.environ, "PFMSEG_UNDER_XVFB": "1"}
        command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv]
        raise SystemExit(subprocess.call(command, env=env))
    from pyvirtualdisplay import Display  # optional fallback

    Display(visible=False, size=(1600, 1000)).start()


def wait(condition, timeout: float = 600.0) -> None:
    from qtpy.QtWidgets import QApplication

    app, start = QApplication.instance(), time.monotonic()
    while not condition():
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() - start > timeout:
            raise TimeoutError("the plugin did not finish in time")
    for _ in range(20):  # let the canvas redraw
        app.processEvents()
        time.sleep(0.01)


def paint(layer) -> None:
    """Scribbles over the demo slide: stained glands (class 1) and stroma/background (class 2)."""
    layer.brush_size = 7
    for x in range(30, 110, 2):
        layer.paint((60, x), 1)
        layer.paint((200, x + 100), 1)
    for y in range(120, 190, 2):
        layer.paint((y, 40), 2)
        layer.paint((y, 220), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "images")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    ensure_display()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pfmseg-screenshots-"))
    os.environ["PFMSEG_CONFIG_DIR"] = str(scratch / "config")  # the user's remembered choices stay untouched

    import napari

    from napari_pfmseg._annotate_widget import AnnotateWidget
    from napari_pfmseg._compare_widget import CompareWidget
    from napari_pfmseg._model_widget import ModelWidget
    from napari_pfmseg._predict_widget import PredictWidget
    from napari_pfmseg._session import session_for
    from napari_pfmseg._train_widget import TrainWidget

    viewer = napari.Viewer(title="pfmseg", show=True)
    viewer.window.resize(1500, 950)
    viewer.open_sample("pfmseg", "demo_slide")
    session = session_for(viewer)
    session.choose_output_folder(scratch / "pfmseg-output")
    widgets = {"Model": ModelWidget(viewer), "Annotate": AnnotateWidget(viewer),
               "Train": TrainWidget(viewer), "Predict": PredictWidget(viewer), "Compare": CompareWidget(viewer)}
    docks = {name: viewer.window.add_dock_widget(widget, name=name, tabify=True)
             for name, widget in widgets.items()}
    session.set_recipe(session.recipe.with_changes(**TINY))
    widgets["Model"]._show_recipe(session.recipe)

    docks["Annotate"].raise_()
    widgets["Annotate"].target_mpp.setValue(1.0)
    annotations = widgets["Annotate"].create_layer()
    widgets["Annotate"]._apply_classes(*CLASSES)
    paint(annotations)
    viewer.reset_view()
    wait(lambda: True)
    viewer.screenshot(str(args.out / "annotations.png"), canvas_only=False)

    docks["Train"].raise_()
    train = widgets["Train"]
    train.epochs.setValue(args.epochs)
    train.samples.setValue(64)
    train.batch.setValue(4)
    train.train()
    wait(lambda: not train.controller.running)
    viewer.screenshot(str(args.out / "training.png"), canvas_only=False)

    docks["Predict"].raise_()
    predict = widgets["Predict"]
    predict.set_mode("slide")
    predict.chunk.setValue(64)
    predict.batch.setValue(16)
    predict.view_first.setChecked(False)
    annotations.visible = False
    shot: dict[str, bool] = {}

    def halfway(done: int, total: int) -> None:
        if not shot and done >= total // 2:
            shot["taken"] = True
            predict.controller._refresh()  # draw what has streamed in so far, then capture it
            viewer.screenshot(str(args.out / "prediction_streaming.png"), canvas_only=False)

    predict.controller.progress.connect(halfway)
    predict.predict()
    wait(lambda: not predict.controller.running)
    viewer.screenshot(str(args.out / "prediction.png"), canvas_only=False)

    docks["Compare"].raise_()
    compare = widgets["Compare"]
    compare.tiny.setChecked(True)
    compare.set_checked(["kaiko-vits16", "lunit_vits8", "unet"])
    compare.set_strategies(["frozen", "cnn_adapter_small"])
    compare.epochs.setValue(3)
    compare.samples.setValue(16)
    compare.budget.setValue(1.0)
    compare.compare()
    wait(lambda: not compare.controller.running)
    compare.split.setSizes([110, 430, 90])  # the leaderboard's share of the dock, as a user would drag it
    wait(lambda: True)
    viewer.screenshot(str(args.out / "compare.png"), canvas_only=False)
    viewer.close()
    print("\n".join(str(p) for p in sorted(args.out.glob("*.png"))))


if __name__ == "__main__":
    main()
