"""The Live widget: strokes refresh the prediction, stopping keeps the head, suggestions move the camera."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 180_000


@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("pfmseg", "demo_slide")  # 512 x 512 px at 0.5 µm/px
    viewer.reset_view()
    return viewer


@pytest.fixture
def live(viewer, tmp_path):
    """An annotation layer at 2 µm/px and a Live widget on a tiny random-weight head (64 px windows at 1 µm/px)."""
    from napari_pfmseg._annotate_widget import AnnotateWidget
    from napari_pfmseg._live_widget import LiveWidget

    annotate = AnnotateWidget(viewer)
    annotate.target_mpp.setValue(2.0)
    layer = annotate.create_layer()
    widget = LiveWidget(viewer)
    session = widget.session
    session.set_recipe(session.recipe.with_changes(backbone="kaiko-vits16", tiny=True, input_size=64, mpp=1.0))
    widget.window_px.setValue(64)
    widget.extra_settings = {"store_root": str(tmp_path / "features"), "crop": 32, "batch_size": 2,
                             "first_steps": 2, "predict_every": 4, "max_steps": 12, "fill_outward": False,
                             "device": "cpu"}
    yield widget, layer
    if widget.controller.running:
        widget.stop()


def paint(layer, points, label):
    layer.brush_size = 5
    for point in points:
        layer.paint(point, label)


def start_live(widget, qtbot):
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.controller.loop is not None, timeout=TIMEOUT_MS)
    return widget.controller.loop


def test_stroke_box_and_label_frame():
    from types import SimpleNamespace

    from napari_pfmseg._live import labels_frame, stroke_box

    atoms = [((np.array([3, 4]), np.array([7, 9])), np.zeros(2), 1)]
    masked = SimpleNamespace(slice_key=(slice(10, 12), slice(None, 5)))
    assert stroke_box(atoms, (64, 64)) == (3, 5, 7, 10)
    assert stroke_box([*atoms, masked], (64, 64)) == (3, 12, 0, 10)
    assert stroke_box([((np.array([], int), np.array([], int)), np.zeros(0), 1)], (64, 64)) is None
    image = SimpleNamespace(scale=(0.5, 0.5), translate=(0.0, 0.0))
    # 4 level-0 px per labels pixel; translate is the centre of pixel 0, 10 level-0 px right of the origin
    labels = SimpleNamespace(scale=(2.0, 2.0), translate=(0.75, 5.75))
    assert labels_frame(labels, image) == pytest.approx((10.0, 0.0, 4.0))


def test_live_widget_module_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, napari_pfmseg._live_widget; "
            "print(sorted({'torch', 'pfmseg_engine.live.loop'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_strokes_refresh_the_prediction(live, qtbot):
    widget, layer = live
    loop = start_live(widget, qtbot)
    assert widget.session.job == "live"
    paint(layer, [(20, 20), (20, 26), (26, 20)], 1)
    qtbot.waitUntil(lambda: widget.last_prediction is not None, timeout=TIMEOUT_MS)
    first = widget.last_prediction
    prediction = widget.prediction_layer
    assert prediction in widget.viewer.layers and widget.uncertainty_layer in widget.viewer.layers
    assert np.array_equal(prediction.data, first.labels) and set(np.unique(first.labels)) <= {1, 2}
    assert first.latency is not None and "mm²" in widget.areas.text()
    # the prediction lies on the slide: level-0 offset and scale of the event, in µm
    assert prediction.scale[-1] == pytest.approx(0.5 * first.scale)
    assert widget.viewer.layers[-1] is layer and widget.viewer.layers.selection.active is layer
    assert loop.labels.pixel_counts()[0] > 0

    paint(layer, [(100, 100), (100, 106)], 2)
    qtbot.waitUntil(lambda: widget.last_prediction.labels_version > first.labels_version, timeout=TIMEOUT_MS)
    assert loop.labels.pixel_counts()[1] > 0  # the second stroke reached the loop
    assert widget.prediction_layer is prediction  # updated in place, not a new layer per refresh
    assert np.array_equal(prediction.data, widget.last_prediction.labels)
    assert widget.last_prediction.step > first.step  # warm: the step count goes on
    uncertainty = widget.uncertainty_layer
    assert not uncertainty.visible  # hidden until asked for; shown, it holds the latest map
    uncertainty.visible = True
    assert uncertainty.data is widget.last_prediction.uncertainty
    assert 0.0 <= float(uncertainty.data.min()) <= float(uncertainty.data.max()) <= 1.0


def test_stopping_keeps_the_head(live, qtbot, tmp_path):
    import torch

    from pfmseg_engine import load_checkpoint

    widget, layer = live
    controller = widget.controller
    loop = start_live(widget, qtbot)
    paint(layer, [(20, 20), (60, 60)], 1)
    paint(layer, [(100, 20)], 2)
    qtbot.waitUntil(lambda: widget.last_prediction is not None, timeout=TIMEOUT_MS)
    with qtbot.waitSignal(controller.ended, timeout=TIMEOUT_MS) as ended:
        widget.stop()
    assert ended.args == ["stopped"] and not controller.running and widget.session.job == ""
    assert not widget.toggle.isChecked() and controller.steps > 0
    head = controller.model
    assert head is loop.model
    weights = {k: v.clone() for k, v in head.head.state_dict().items()}

    path = tmp_path / "live.pt"
    with qtbot.waitSignal(controller.model_saved, timeout=TIMEOUT_MS):
        widget.save_head(path)
    saved = load_checkpoint(path)
    assert saved.config.tuning.strategy == "frozen" and saved.config.input_size == 64
    for key, value in saved.head.state_dict().items():
        torch.testing.assert_close(value, weights[key])

    start_live(widget, qtbot)  # live again: the same head goes on training
    assert controller.model is head
    again = tmp_path / "again.pt"
    with qtbot.waitSignal(controller.model_saved, timeout=TIMEOUT_MS):
        widget.save_head(again)  # while live: stops first, then saves the head as trained
    assert not controller.running and again.is_file()
    controller.hand_off()  # "Fine-tune fully": the head becomes the session's model for the Train widget
    assert widget.session.model is head and widget.session.recipe.strategy == "frozen"


def test_suggestions_step_through_tissue(live, qtbot):
    widget, layer = live
    loop = start_live(widget, qtbot)
    paint(layer, [(20, 20)], 1)
    paint(layer, [(30, 30)], 2)
    qtbot.waitUntil(lambda: widget.last_prediction is not None, timeout=TIMEOUT_MS)
    widget.k.setValue(3)
    widget.suggest()
    qtbot.waitUntil(lambda: widget.suggestion_layer is not None, timeout=TIMEOUT_MS)
    shapes = widget.suggestion_layer
    assert len(shapes.data) == 3 and set(shapes.shape_type) == {"rectangle"}
    tissue = set(loop.store.tissue_windows())
    labelled = set(loop.labels.windows())
    assert all(r.window in tissue and r.window not in labelled for r in widget.regions)
    assert [r.rank for r in widget.regions] == [1, 2, 3]
    image = widget.image.layer()
    for region, rectangle in zip(widget.regions, shapes.data, strict=True):
        world = np.asarray([shapes.data_to_world(p) for p in rectangle])
        assert world.min() >= -0.5 and world.max() <= 512 * 0.5  # on the slide (µm)
        assert world[:, 1].min() == pytest.approx(region.x * 0.5 - 0.25)

    camera = widget._camera()

    def centre_of(index):
        r = widget.regions[index]
        return np.asarray([r.y + r.height / 2, r.x + r.width / 2]) * image.scale[-1] - 0.25

    np.testing.assert_allclose(camera.center[-2:], centre_of(0))
    widget.next()
    np.testing.assert_allclose(camera.center[-2:], centre_of(1))
    assert shapes.selected_data == {1} and widget.jump.value() == 2
    widget.previous()
    widget.previous()  # wraps around to the last
    np.testing.assert_allclose(camera.center[-2:], centre_of(2))
    widget.jump.setValue(2)
    widget.show_region(widget.jump.value() - 1)
    np.testing.assert_allclose(camera.center[-2:], centre_of(1))
