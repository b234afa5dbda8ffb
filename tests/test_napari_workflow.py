"""The plugin end to end in a real viewer: annotate, train in a worker, stream predictions, cancel.

Uses the demo sample (built from scikit-image's IHC image) and a tiny random-weight backbone, so
everything runs on a CPU in seconds. Predictions are compared with the engine's direct output.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("napari")

import torch

from pfmseg_engine.training import CancelToken

pytestmark = pytest.mark.gui

TIMEOUT_MS = 180_000
#: Tiny backbone (patch 16), 32 px windows at 1 um/px: a 256 x 256 working image.
TINY = {"backbone": "kaiko-vits16", "tiny": True, "input_size": 32, "mpp": 1.0}



@pytest.fixture(autouse=True)
def own_output_folder(tmp_path, monkeypatch):
    """Each test's remembered choices and outputs stay in its own folder (the default, beside the demo slide,
    would be shared by every test of the session). Other GUI test modules import this fixture."""
    monkeypatch.setenv("PFMSEG_CONFIG_DIR", str(tmp_path / "config"))
    from napari_pfmseg import _preferences

    _preferences.set_output_folder(tmp_path / "outputs")
    return tmp_path / "outputs"


@pytest.fixture
def notes():
    """Every napari notification shown during the test (messages)."""
    from napari.utils.notifications import notification_manager

    seen: list[str] = []

    def record(notification):
        seen.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


class App:
    """A viewer with the demo slide and the four widgets docked."""

    def __init__(self, viewer):
        from napari_pfmseg._annotate_widget import AnnotateWidget
        from napari_pfmseg._model_widget import ModelWidget
        from napari_pfmseg._predict_widget import PredictWidget
        from napari_pfmseg._session import session_for
        from napari_pfmseg._train_widget import TrainWidget

        self.viewer = viewer
        [self.image] = viewer.open_sample("pfmseg", "demo_slide")
        self.model, self.annotate = ModelWidget(viewer), AnnotateWidget(viewer)
        self.train, self.predict = TrainWidget(viewer), PredictWidget(viewer)
        for widget in (self.model, self.annotate, self.train, self.predict):
            viewer.window.add_dock_widget(widget, tabify=True)
        viewer.window.resize(1400, 900)
        self.session = session_for(viewer)
        self.set_recipe(**TINY)

    def set_recipe(self, **fields):
        self.session.set_recipe(self.session.recipe.with_changes(**fields))

    def annotations(self, paint: bool = True):
        self.annotate.target_mpp.setValue(1.0)
        layer = self.annotate.create_layer()
        if paint:
            paint_strokes(layer)
        return layer

    def predict_settings(self, **changes):
        p = self.predict
        p.window_size.setValue(changes.pop("window", 32))
        p.chunk.setValue(changes.pop("chunk", 128))
        p.batch.setValue(changes.pop("batch", 16))
        p.view_first.setChecked(changes.pop("view_first", False))
        p.set_mode(changes.pop("mode", "slide"))
        assert not changes


@pytest.fixture
def app(make_napari_viewer):
    return App(make_napari_viewer(show=True))


def paint_strokes(layer) -> None:
    """Scribbles as an annotator would paint them (napari's brush, so paint events fire)."""
    layer.brush_size = 6
    for x in range(30, 110, 3):
        layer.paint((60, x), 1)
        layer.paint((200, x + 100), 1)
    for y in range(120, 180, 3):
        layer.paint((y, 40), 2)
        layer.paint((y, 220), 2)


def wait_for(qtbot, controller) -> None:
    """Until the controller's job has finished and its worker thread has ended (napari workers run on Qt's
    global thread pool); the timeouts only guard against a deadlock."""
    from qtpy.QtCore import QThreadPool

    qtbot.waitUntil(lambda: not controller.running, timeout=TIMEOUT_MS)
    assert QThreadPool.globalInstance().waitForDone(TIMEOUT_MS)


def direct_prediction(model, slide_or_path, out: Path, name: str, **config):
    """The engine's own whole-slide prediction, for comparison with what the layer shows."""
    from pfmseg_engine.inference.slide import SlideInferenceConfig, predict_slide
    from pfmseg_engine.labelstore.omezarr import LabelOutput

    region = config.pop("region", None)
    result = predict_slide(model, slide_or_path, out, SlideInferenceConfig(**config), name=name, region=region)
    return [np.asarray(level) for level in LabelOutput(result.path).levels]


def layer_levels(layer) -> list[np.ndarray]:
    return [np.asarray(level) for level in (layer.data if layer.multiscale else [layer.data])]


def test_annotate_train_and_predict_the_whole_slide(app, qtbot, tmp_path):
    labels = app.annotations()
    counts = app.annotate.counts()
    assert counts == [int((labels.data == 1).sum()), int((labels.data == 2).sum())] and min(counts) > 100
    assert labels.data.shape == (256, 256) and labels.scale[-1] == pytest.approx(1.0)

    app.train.epochs.setValue(2)
    app.train.samples.setValue(16)
    app.train.batch.setValue(4)
    finished = []
    app.train.controller.finished.connect(finished.append)
    assert app.train.train() is not None
    assert not app.train.train_button.isEnabled()
    wait_for(qtbot, app.train.controller)
    assert finished[-1].status == "completed", finished[-1].message
    assert app.train.progress.value() == app.train.progress.maximum() > 0
    assert len(app.train.curve.values("step")) == app.train.progress.maximum()
    assert len(app.train.curve.values("train")) == 2
    state = app.session.state
    assert state.model is not None and state.epochs_trained == 2
    assert state.model.config.class_names == ("background", "tissue")

    app.predict_settings(mode="slide", chunk=128)
    chunks = []
    app.predict.controller.progress.connect(lambda done, total: chunks.append((done, total)))
    assert app.predict.predict() is not None
    wait_for(qtbot, app.predict.controller)
    outcome = app.predict.controller.last
    assert outcome.status == "completed", outcome.message
    assert len(chunks) > 1 and chunks[-1][0] == chunks[-1][1]  # streamed chunk by chunk
    layer = outcome.layer
    assert layer.metadata["pfmseg"]["store"] == str(outcome.path) and not layer.editable
    expected = direct_prediction(state.model, app.image.metadata["pfmseg"]["path"], tmp_path, "direct",
                                 window=32, chunk=128, batch_size=16)
    shown = layer_levels(layer)
    assert len(shown) == len(expected)
    for got, want in zip(shown, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert set(np.unique(shown[0])) <= {0, 1, 2} and (shown[0] > 0).any()
    assert layer.scale[-1] == pytest.approx(1.0) and layer.translate[-1] == pytest.approx(0.25)

    # the dock shows how much of each class the slide holds (the CSV beside the OME-Zarr)
    assert outcome.measurements.is_file() and outcome.measurements.parent == Path(outcome.path).parent
    text = app.predict.measurements.text()
    for name in ("background", "tissue"):
        area = sum(float(r["area_mm2"]) for r in outcome.measurement_rows if r["class"] == name)
        assert area == pytest.approx(float((shown[0] == ("background", "tissue").index(name) + 1).sum()) * 1e-6)
        assert f"{name}: " in text
    app.predict.per_region.setChecked(True)
    app.predict.object_type.setCurrentText("detection")
    exported = app.predict.export(layer, tmp_path / "regions.geojson", "geojson")
    features = json.loads(exported.read_text())["features"]
    assert features and {f["properties"]["objectType"] for f in features} == {"detection"}


def test_retraining_continues_from_the_current_model(app, qtbot):
    app.annotations()
    app.train.epochs.setValue(1)
    app.train.samples.setValue(8)
    app.train.val_fraction.setValue(0.0)
    app.train.train()
    wait_for(qtbot, app.train.controller)
    first = app.session.model
    assert first is not None
    labels = app.annotate.annotations.layer()
    labels.paint((240, 240), 2)  # more annotations, then train again, and predict the view when done
    app.train.predict_after.setChecked(True)
    app.predict_settings(mode="view", chunk=128)
    app.train.train()
    wait_for(qtbot, app.train.controller)
    assert app.session.model is first and app.session.state.epochs_trained == 2
    qtbot.waitUntil(lambda: app.predict.controller.last is not None and not app.predict.controller.running,
                    timeout=TIMEOUT_MS)
    assert app.predict.controller.last.status == "completed"
    assert any(layer.name.endswith("prediction") for layer in app.viewer.layers)


class ParkedToken(CancelToken):
    """The engine's cancel token, saying when the trainer has stopped on it (``parked``), so a test
    synchronises on that instead of on time."""

    def __init__(self):
        super().__init__()
        self.parked = threading.Event()

    def wait_while_paused(self, timeout=None):
        if self.paused:
            self.parked.set()
        return super().wait_while_paused(timeout)


def test_cancel_training_keeps_a_consistent_model(app, qtbot, monkeypatch):
    from qtpy.QtCore import QCoreApplication, QTimer

    monkeypatch.setattr("pfmseg_engine.training.callbacks.CancelToken", ParkedToken)
    app.annotations()
    app.train.epochs.setValue(200)
    app.train.samples.setValue(8)
    app.train.batch.setValue(2)
    finished = []
    controller = app.train.controller
    controller.finished.connect(finished.append)
    steps = []
    controller.step.connect(steps.append)
    app.train.train()
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=TIMEOUT_MS)
    controller.pause()
    assert app.train.pause_button.text() == "Resume"
    qtbot.waitUntil(controller.cancel_token.parked.is_set, timeout=TIMEOUT_MS)  # held between two batches
    QCoreApplication.sendPostedEvents()  # every step the worker sent before it stopped
    count, ticks = len(steps), []
    QTimer.singleShot(0, lambda: ticks.append(len(steps)))
    qtbot.waitUntil(lambda: bool(ticks), timeout=TIMEOUT_MS)
    assert ticks == [count] == [len(steps)] and controller.paused  # the event loop ran; no batch did
    controller.resume()
    qtbot.waitUntil(lambda: len(steps) >= count + 2, timeout=TIMEOUT_MS)
    app.train.cancel_button.click()
    wait_for(qtbot, controller)
    outcome = finished[-1]
    assert outcome.status == "cancelled" and outcome.epochs < 200
    assert app.session.job == "" and app.train.train_button.isEnabled()
    model = app.session.model
    assert model is not None and not model.training
    with torch.inference_mode():
        assert torch.isfinite(model(torch.rand(1, 3, 32, 32))).all()


def test_cancel_prediction_then_resume(app, qtbot, tmp_path):
    from napari_pfmseg._layers import META

    app.model.build()
    qtbot.waitUntil(lambda: app.session.model is not None and not app.session.job, timeout=TIMEOUT_MS)
    app.predict_settings(mode="slide", chunk=64)
    app.predict.tissue.setChecked(False)
    controller = app.predict.controller
    seen = []
    controller.progress.connect(lambda done, total: (seen.append(done), done == 1 and controller.cancel()))
    app.predict.predict()
    wait_for(qtbot, controller)
    first = controller.last
    assert first.status == "cancelled" and 1 <= len(seen) < 16
    assert app.session.job == "" and app.predict.predict_button.isEnabled()
    partial = first.layer
    assert partial.metadata[META]["status"] == "cancelled"
    out_dir = app.session.output_dir("predictions")
    assert any(p.name.endswith(".partial") for p in out_dir.iterdir())

    controller.progress.disconnect()
    app.predict.predict()  # same settings: the engine resumes the partial output
    wait_for(qtbot, controller)
    second = controller.last
    assert second.status == "completed" and second.chunks < 16
    expected = direct_prediction(app.session.model, app.image.metadata["pfmseg"]["path"], tmp_path, "direct",
                                 window=32, chunk=64, batch_size=16, tissue=False)
    for got, want in zip(layer_levels(second.layer), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # the cancelled layer showed the engine's partial store; once resumed and renamed, it shows the result
    streamed = layer_levels(partial)[0]
    done = streamed > 0
    assert done.any() and np.array_equal(streamed[done], expected[0][done])


def test_visible_area_region_and_view_first(app, qtbot, tmp_path):
    app.model.build()
    qtbot.waitUntil(lambda: app.session.model is not None and not app.session.job, timeout=TIMEOUT_MS)
    viewer = app.viewer
    viewer.camera.center = (64, 64)  # um: the top-left quarter of the 256 um slide
    viewer.camera.zoom = 8.0  # the area in view comes from the camera model, up to date at once: no wait
    app.predict_settings(mode="view", chunk=64)
    app.predict.predict()
    wait_for(qtbot, app.predict.controller)
    view = app.predict.controller.last
    assert view.status == "completed", view.message
    offset = view.layer.metadata["pfmseg"]["offset_px"]
    assert offset[0] > 0 and offset[1] > 0  # a region, placed where it lies on the slide
    assert view.layer.translate[-1] == pytest.approx(offset[1] * 0.5 + 0.25)
    box = (offset[0], offset[0] + layer_levels(view.layer)[0].shape[0] * 2,
           offset[1], offset[1] + layer_levels(view.layer)[0].shape[1] * 2)
    slide = app.session.slide_for(app.image)
    expected = direct_prediction(app.session.model, slide, tmp_path, "view", window=32, chunk=64, batch_size=16,
                                 region=(box[2], box[0], box[3] - box[2], box[1] - box[0]))
    np.testing.assert_array_equal(layer_levels(view.layer)[0], expected[0])

    shapes = viewer.add_shapes([[[20, 150], [20, 240], [90, 240], [90, 150]]], shape_type="rectangle")
    app.predict.shapes.set_layer(shapes)
    app.predict_settings(mode="region", chunk=64)
    app.predict.predict()
    wait_for(qtbot, app.predict.controller)
    region = app.predict.controller.last
    extent = region.layer.extent.world[:, -2:]
    assert extent[0] == pytest.approx([20, 150], abs=3) and extent[1] == pytest.approx([90, 240], abs=3)
    [reopened] = viewer.open(str(region.path), plugin="pfmseg")  # the saved region lands in the same place
    assert tuple(reopened.translate) == pytest.approx(tuple(region.layer.translate))

    added = []
    viewer.layers.events.inserted.connect(lambda event: added.append(event.value.name))
    app.predict_settings(mode="slide", chunk=128, view_first=True)
    app.predict.predict()
    wait_for(qtbot, app.predict.controller)
    assert [name.split()[-1] for name in added] == ["prediction"]  # one run, the area in view first
    whole = app.predict.controller.last
    assert whole.status == "completed" and whole.layer.metadata["pfmseg"]["offset_px"] == [0.0, 0.0]


def streamed_target(tmp_path: Path):
    """A run's layer with its placeholders and the engine's partial store of 3 levels, one chunk written
    (what the GUI thread has when a chunk's event arrives)."""
    import dask.array as da
    from napari.layers import Labels

    from napari_pfmseg._prediction import Target
    from pfmseg_engine.inference import LabelStore
    from pfmseg_engine.labelstore.pyramid import pyramid_shapes

    plan = SimpleNamespace(pyramid_shapes=pyramid_shapes((600, 600), 256))
    partial = tmp_path / "slide.ome.zarr.partial"
    store = LabelStore(partial, shape=(600, 600), chunk=256, num_classes=2, probabilities=False)
    store.write((0, 256, 0, 256), np.full((256, 256), 2, np.uint8))
    placeholders = [da.zeros(shape, dtype="uint8", chunks=256) for shape in plan.pyramid_shapes]
    target = Target(None, plan, layer=Labels(placeholders, multiscale=True))
    return target, SimpleNamespace(store=partial), placeholders


def test_a_store_renamed_while_its_levels_open_keeps_the_placeholders(tmp_path, monkeypatch):
    """The worker does not wait for the GUI: the run can complete and rename its partial store between
    two reads of the store's levels on the GUI thread. That raised ``KeyError: '0'`` in napari's event
    loop; now the layer keeps all its placeholders (the finished output is attached when the worker
    returns)."""
    import zarr

    from napari_pfmseg._prediction import PredictionController

    target, chunk, placeholders = streamed_target(tmp_path)
    finished = tmp_path / "slide.ome.zarr"
    reads = []

    def then_the_run_completes(original):
        def read(group, key):  # the worker's last step (the rename) lands right after the GUI's first read
            value = original(group, key)
            reads.append(key)
            if chunk.store.exists():
                os.replace(chunk.store, finished)
            return value
        return read

    monkeypatch.setattr(zarr.Group, "__contains__", then_the_run_completes(zarr.Group.__contains__))
    monkeypatch.setattr(zarr.Group, "__getitem__", then_the_run_completes(zarr.Group.__getitem__))
    PredictionController._show_store(target, chunk)
    assert reads and finished.exists() and not chunk.store.exists()  # the rename did fall mid-read
    assert not target.store_shown
    assert len(target.layer.data) == 3 and all(a is b for a, b in zip(target.layer.data, placeholders, strict=True))


def test_only_a_store_with_every_level_is_shown(tmp_path):
    """A store lacking a level (not created yet, or from something else) is not shown; once every
    level of the plan is there, the layer shows the store itself, read-only, all levels."""
    from napari_pfmseg._layers import META
    from napari_pfmseg._prediction import PredictionController

    target, chunk, placeholders = streamed_target(tmp_path)
    aside = tmp_path / "level-2"
    shutil.move(chunk.store / "2", aside)  # the state before the writer has created the coarsest level
    PredictionController._show_store(target, chunk)
    assert not target.store_shown and len(target.layer.data) == 3 and target.layer.data[2] is placeholders[2]

    shutil.move(aside, chunk.store / "2")
    PredictionController._show_store(target, chunk)
    assert target.store_shown and target.layer.metadata[META]["partial"] == str(chunk.store)
    shown = [np.asarray(level) for level in target.layer.data]
    assert [s.shape for s in shown] == [tuple(s) for s in target.plan.pyramid_shapes]
    assert (shown[0][:256, :256] == 2).all() and not shown[0][256:].any()
    assert (shown[2][:64, :64] == 2).all() and not shown[2][64:].any()  # the coarser levels stream too
    assert all(level.read_only for level in target.layer.data)


class Hold:
    """Holds a worker at one point until the test releases it, and records the thread it was held on.

    Called on the GUI thread it does not wait (that would freeze the test): the thread it records fails
    the test instead."""

    def __init__(self):
        self.reached, self.release = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self) -> None:
        self.thread = threading.current_thread()
        self.reached.set()
        if self.thread is not threading.main_thread() and not self.release.wait(TIMEOUT_MS / 1000):
            raise RuntimeError("The test never released the worker.")  # a deadlock guard, not a race decider


def held_after_first(events, hold: Hold):
    """A worker's generator that hands on its first event, then holds until released."""
    try:
        yield next(events)
        hold()
        return (yield from events)
    finally:
        events.close()


def assert_gui_runs_while_held(qtbot, hold: Hold) -> None:
    """The worker is held off the GUI thread while the GUI thread's event loop goes on."""
    from qtpy.QtCore import QTimer

    qtbot.waitUntil(hold.reached.is_set, timeout=TIMEOUT_MS)
    assert hold.thread is not threading.main_thread()
    ticks: list[threading.Thread] = []
    QTimer.singleShot(0, lambda: ticks.append(threading.current_thread()))
    qtbot.waitUntil(lambda: bool(ticks), timeout=TIMEOUT_MS)
    assert ticks == [threading.main_thread()] and not hold.release.is_set()


def test_training_and_prediction_leave_the_event_loop_free(app, qtbot, monkeypatch):
    """Training and prediction run in worker threads: while each is held mid-run on an event this test
    controls, the viewer's event loop runs a timer and shows the events the worker sent before. (How
    long the event loop may stall is timing, measured by benchmarks/gui_responsiveness.py.)"""
    import pfmseg_engine.inference.slide as engine_slide
    import pfmseg_engine.training as engine_training

    build_trainer, execute = engine_training.build_annotation_trainer, engine_slide.iter_execute_plan
    training, predicting = Hold(), Hold()

    def held_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        fit = trainer.iter_fit
        trainer.iter_fit = lambda: held_after_first(fit(), training)
        return trainer

    monkeypatch.setattr(engine_training, "build_annotation_trainer", held_trainer)
    monkeypatch.setattr(engine_slide, "iter_execute_plan",
                        lambda *args, **kwargs: held_after_first(execute(*args, **kwargs), predicting))
    app.annotations()
    app.train.epochs.setValue(1)
    app.train.samples.setValue(8)
    steps = []
    app.train.controller.step.connect(steps.append)
    app.train.train()
    assert_gui_runs_while_held(qtbot, training)
    qtbot.waitUntil(lambda: len(steps) == 1, timeout=TIMEOUT_MS)  # the first batch's event, shown meanwhile
    assert app.train.controller.running
    training.release.set()
    wait_for(qtbot, app.train.controller)
    assert app.session.model is not None and len(steps) > 1

    app.predict_settings(mode="slide", chunk=64)
    controller = app.predict.controller
    progress = []
    controller.progress.connect(lambda done, total: progress.append(done))
    app.predict.tissue.setChecked(False)
    app.predict.predict()
    assert_gui_runs_while_held(qtbot, predicting)
    qtbot.waitUntil(lambda: progress == [1], timeout=TIMEOUT_MS)  # the first chunk, streamed into the layer
    assert controller.running and controller.targets[0].store_shown
    predicting.release.set()
    wait_for(qtbot, controller)
    assert controller.last.status == "completed" and progress[-1] == 16


def test_errors_are_notifications_with_the_fix(app, qtbot, notes, tmp_path, monkeypatch):
    # empty annotations
    app.annotations(paint=False)
    assert app.train.train() is None
    assert "paint at least one class" in notes[-1]
    assert app.session.job == ""

    # no weights for a full-size backbone
    app.set_recipe(backbone="uni_v1", tiny=False, weights=None, input_size=224)
    app.model._show_recipe(app.session.recipe)
    assert app.model.build() is None
    assert "hf-hub:MahmoodLab/UNI" in notes[-1] and "tiny test model" in notes[-1]

    # a file that is not a pfmseg checkpoint, and one trained on other backbone weights
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    app.model.load(bogus)
    qtbot.waitUntil(lambda: not app.session.job, timeout=TIMEOUT_MS)
    assert "not a pfmseg checkpoint" in notes[-1]
    from pfmseg_engine import ModelConfig, build_model, save_checkpoint

    model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=32))
    path = save_checkpoint(tmp_path / "model.pt", model)
    payload = torch.load(path, weights_only=True)
    payload["backbone_fingerprint"] += 1.0
    torch.save(payload, path)
    app.model.load(path)
    qtbot.waitUntil(lambda: not app.session.job, timeout=TIMEOUT_MS)
    assert "differ from those checkpoint" in notes[-1]

    # out of memory while training
    app.set_recipe(**TINY)
    paint_strokes(app.annotate.annotations.layer())

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("pfmseg_engine.training.build_annotation_trainer", out_of_memory)
    app.train.train()
    wait_for(qtbot, app.train.controller)
    assert "ran out of memory" in notes[-1] and "batch size" in notes[-1]
    assert app.session.job == ""

    # predicting without a model
    app.session.set_model(None, "")
    assert app.predict.predict() is None
    assert "No model yet" in notes[-1]
