"""The Compare widget in a real viewer: rank tiny backbones on painted annotations, preview, use the winner,
cancel keeping what finished, the feature PCA layer, the time budget (a fake clock), several strategies per
run, rows accumulating across runs, per-phase progress, error states and a layout that grows."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from test_compare import TickingClock
from test_napari_workflow import own_output_folder  # noqa: F401  (autouse: outputs per test)

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
    compare.set_strategies(["frozen"])
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


def test_budget_covers_every_phase_and_the_rest_says_not_run(app, qtbot):
    _viewer, widget, _session = app
    widget.set_checked(["kaiko-vits16", "lunit_vits8", "unet"])
    widget.epochs.setValue(20)
    widget.budget.setValue(0.25)  # 15 s of the fake clock
    controller = widget.controller
    controller.clock = TickingClock(1.0)
    phases = []
    controller.phase.connect(lambda phase: phases.append(phase.name))
    assert widget.compare() is not None
    assert widget.run_state.subject.text() == "Comparing on: demo slide (IHC)"
    wait(qtbot, controller)
    outcome = controller.last
    assert outcome.status == "completed", outcome.message
    rows = outcome.leaderboard.rows
    not_run = [r for r in rows if r.status == "pending"]
    assert any(r.ok for r in rows) and not_run
    assert all("time budget" in r.note for r in not_run) and "not run within the time budget" in outcome.message
    assert controller.clock.now < 2 * 15  # nothing started once the budget was spent
    assert "train" in phases and "score" in phases
    # the dock says why a row has no score
    table = {widget.table.item(i, 1).text(): i for i in range(widget.table.rowCount())}
    for r in not_run:
        assert widget.table.item(table[r.pfm], 3).text() == "not run"
        assert "time budget" in widget.table.item(table[r.pfm], len(widget.COLUMNS) - 1).text()


def test_several_strategies_and_rows_accumulate_across_runs(app, qtbot):
    _viewer, widget, _session = app
    controller = widget.controller
    widget.set_checked(["unet"])
    widget.compare()
    wait(qtbot, controller)
    assert controller.last.status == "completed", controller.last.message
    first_dir = controller.last.output_dir

    runs = []
    controller.run.connect(runs.append)
    widget.set_checked(["kaiko-vits16"])
    widget.set_strategies(["frozen", "cnn_adapter_small"])
    assert widget.checked_strategies() == ("frozen", "cnn_adapter_small")
    widget.compare()
    wait(qtbot, controller)
    outcome = controller.last
    assert outcome.status == "completed", outcome.message and outcome.output_dir == first_dir
    assert sorted(str(r.combination) for r in runs) == ["kaiko-vits16 / cnn_adapter_small", "kaiko-vits16 / frozen"]
    ranked = {(r.pfm, r.strategy) for r in outcome.leaderboard.rows if r.ok}
    assert ranked == {("unet", "full"), ("kaiko-vits16", "frozen"), ("kaiko-vits16", "cnn_adapter_small")}
    assert widget.table.rowCount() == 3


def test_errors_stay_visible_until_the_next_run_resets_the_dock(app, qtbot):
    _viewer, widget, _session = app
    widget.set_checked([])
    assert widget.compare() is None  # nothing ticked: refused before it starts
    assert widget.run_state.failed and "Tick at least one backbone" in widget.status.text()
    assert "color" in widget.status.styleSheet() and widget.progress.format() == "failed"
    widget.set_checked(["unet"])
    started = []
    widget.controller.started.connect(lambda: started.append((widget.run_state.state, widget.status.text(),
                                                               widget.status.styleSheet())))
    widget.compare()
    assert started and started[0][0] == "running" and "Tick" not in started[0][1] and not started[0][2]
    wait(qtbot, widget.controller)
    assert widget.run_state.state == "completed" and widget.status.text().startswith("Comparison completed")


def test_lists_and_leaderboard_grow_with_the_dock(app, qtbot):
    _viewer, widget, _session = app
    widget.resize(420, 700)
    qtbot.waitUntil(lambda: widget.height() == 700)
    small = (widget.models.height(), widget.table.height())
    widget.resize(420, 1400)
    qtbot.waitUntil(lambda: widget.height() == 1400)
    assert widget.models.height() > small[0] and widget.table.height() > small[1]


def test_a_row_that_scores_zero_says_why(app):
    import numpy as np

    from pfmseg_engine.compare.leaderboard import build_row

    _viewer, widget, _session = app
    # two held-out images holding only class 0 ('background'); the model predicted only class 1 ('tissue')
    confusion = [[[0, 40], [0, 0]], [[0, 25], [0, 0]]]
    run = {"status": "ok", "seed": 0, "image_names": ["a", "b"], "confusions": confusion, "trainable_params": 10,
           "train_seconds": 1.0, "metrics": {"mIoU": 0.0}, "checkpoint": ""}
    row = build_row("kaiko-vits16", "frozen", [run], ("background", "tissue"), n_bootstrap=20,
                    scored_on="held-out annotations")
    assert row.metrics["mIoU"] == 0.0 and np.isfinite(row.metrics["mIoU"])
    assert row.note == "predicted only 'tissue'; held-out annotations contain no 'tissue' (they hold 'background')"
    from pfmseg_engine.compare import Leaderboard
    from pfmseg_engine.compare.leaderboard import rank_rows

    widget._show_ranking(Leaderboard(rank_rows([row], 20), ("background", "tissue"), "held-out annotations", 20))
    assert widget.table.item(0, len(widget.COLUMNS) - 1).text() == row.note
