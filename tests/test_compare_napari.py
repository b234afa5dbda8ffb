"""The Compare widget in a real viewer: rank tiny backbones on painted annotations, preview, use the winner,
cancel keeping what finished, and the feature PCA layer."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.gui

TIMEOUT_MS = 240_000
TINY = {"backbone": "kaiko-vits16", "tiny": True, "input_size": 32, "mpp": 1.0}


@pytest.fixture
def app(make_napari_viewer):
    from napari_pfmseg._annotate_widget import AnnotateWidget
    from napari_pfmseg._compare_widget import CompareWidget
    from napari_pfmseg._session import session_for
    from test_napari_workflow import paint_strokes

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open_sample("pfmseg", "demo_slide")
    annotate, compare = AnnotateWidget(viewer), CompareWidget(viewer)
    for widget in (annotate, compare):
        viewer.window.add_dock_widget(widget, tabify=True)
    session = session_for(viewer)
    session.set_recipe(session.recipe.with_changes(**TINY))
    annotate.target_mpp.setValue(1.0)
    labels = annotate.create_layer()
    paint_strokes(labels)
    compare.image.set_layer(image)
    compare.annotations.set_layer(labels)
    compare.tiny.setChecked(True)
    compare.strategy.setCurrentText("frozen")
    compare.epochs.setValue(1)
    compare.samples.setValue(8)
    compare.val_fraction.setValue(0.3)
    return viewer, compare, session


def wait(qtbot, controller):
    """Until the job has finished and its worker thread (on Qt's global pool) has ended."""
    from qtpy.QtCore import QThreadPool

    qtbot.waitUntil(lambda: not controller.running, timeout=TIMEOUT_MS)
    assert QThreadPool.globalInstance().waitForDone(TIMEOUT_MS)


def test_compare_ranks_previews_and_uses_the_winner(app, qtbot):
    viewer, widget, session = app
    widget.set_checked(["kaiko-vits16", "lunit_vits8", "unet"])
    assert widget.checked() == ("kaiko-vits16", "lunit_vits8", "unet")
    controller = widget.controller
    runs = []
    controller.run.connect(runs.append)
    assert widget.compare() is not None
    assert not widget.compare_button.isEnabled() and session.job == "comparing"
    wait(qtbot, controller)
    outcome = controller.last
    assert outcome.status == "completed", outcome.message
    board = outcome.leaderboard
    ranked = [r for r in board.rows if r.ok]
    assert {r.pfm for r in ranked} == {"kaiko-vits16", "lunit_vits8", "unet"} and len(runs) == 3
    assert [r.rank for r in ranked] == [1, 2, 3] and board.eval_split == "held-out annotations"
    assert all(r.intervals["mIoU"][0] <= r.metrics["mIoU"] <= r.intervals["mIoU"][1] + 1e-9 for r in ranked)
    assert widget.table.rowCount() == 3 and widget.table.item(0, 1).text() == board.winner.pfm
    assert "[" in widget.table.item(0, 3).text()  # the CI is shown
    assert len(outcome.previews) == 3 and len(widget.preview_labels) == 6
    for caption, rgb in outcome.previews:
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8 and caption
    assert (outcome.output_dir / "leaderboard.csv").is_file()
    assert session.job == "" and widget.use_button.isEnabled()

    assert widget.use_winner() is not None
    qtbot.waitUntil(lambda: session.model is not None and not session.job, timeout=TIMEOUT_MS)
    assert session.model.config.backbone == board.winner.pfm and "compare" in session.state.source
    assert session.model.config.class_names == ("background", "tissue")

    layers = len(viewer.layers)
    widget.table.selectRow(next(i for i, r in enumerate(ranked) if r.pfm != "unet"))
    assert widget.feature_view() is not None
    qtbot.waitUntil(lambda: len(viewer.layers) > layers and not session.job, timeout=TIMEOUT_MS)
    layer = viewer.layers[-1]
    assert layer.name.endswith("features (PCA)") and layer.rgb and layer.data.dtype == np.uint8


def test_cancel_keeps_finished_models(app, qtbot):
    _viewer, widget, session = app
    widget.set_checked(["kaiko-vits16", "lunit_vits8", "unet"])
    controller = widget.controller
    controller.ranking.connect(lambda board: any(r.ok for r in board.rows) and controller.cancel())
    widget.compare()
    wait(qtbot, controller)
    outcome = controller.last
    assert outcome.status == "cancelled", outcome.message
    finished = [r for r in outcome.leaderboard.rows if r.ok]
    assert 1 <= len(finished) < 3 and finished[0].rank == 1
    assert session.job == "" and widget.compare_button.isEnabled() and widget.use_button.isEnabled()


def test_backbones_without_weights_cannot_be_ticked(app):
    _viewer, widget, _session = app
    widget.tiny.setChecked(False)
    widget.set_checked(["uni_v1", "unet"])
    assert widget.checked() == ("unet",)  # uni_v1 has no weights here; the baseline needs none
