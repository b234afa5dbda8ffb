"""The plugin as a user meets it, in a real viewer: each dock shows its current run only (reset at start, errors
stay visible), outputs go to one remembered folder the docks show and open, measurements are saved where the user
says, a slide without µm/px is calibrated in one place and remembered, and names and units read as a user reads
them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from test_napari_workflow import (
    TIMEOUT_MS,
    App,
    notes,  # noqa: F401  (fixture: napari notifications shown during a test)
    own_output_folder,  # noqa: F401  (autouse fixture)
    wait_for,
)

pytestmark = pytest.mark.gui


@pytest.fixture
def app(make_napari_viewer):
    return App(make_napari_viewer(show=True))


def build_model(app, qtbot):
    app.model.build()
    qtbot.waitUntil(lambda: app.session.model is not None and not app.session.job, timeout=TIMEOUT_MS)


def predict_view(app, qtbot, centre):
    app.viewer.camera.center = centre
    app.viewer.camera.zoom = 8.0
    app.predict_settings(mode="view", chunk=64)
    assert app.predict.predict() is not None
    wait_for(qtbot, app.predict.controller)
    outcome = app.predict.controller.last
    assert outcome.status == "completed", outcome.message
    return outcome


def test_predict_dock_resets_at_start_and_keeps_errors_visible(app, qtbot):
    dock = app.predict
    assert dock.predict() is None  # no model yet: refused before it starts
    assert dock.run_state.failed and "No model yet" in dock.status.text()
    assert "color" in dock.status.styleSheet() and dock.progress.format() == "failed"

    build_model(app, qtbot)
    assert dock.run_state.failed  # another dock's job does not clear this dock's error
    dock.measurements.setText("Measurements (an earlier run)")
    seen = []
    dock.controller.started.connect(lambda: seen.append(
        (dock.run_state.state, dock.status.text(), dock.status.styleSheet(), dock.measurements.text(),
         dock.run_state.subject.text())))
    outcome = predict_view(app, qtbot, (64, 64))
    state, status, style, measurements, subject = seen[0]
    assert state == "running" and "No model" not in status and not style and measurements == ""
    assert subject == f"Predicting: {app.image.name}"
    assert dock.run_state.state == "completed" and dock.status.text() == f"Done: {outcome.path}."
    assert dock.progress.value() == dock.progress.maximum() > 0 and "Measurements" in dock.measurements.text()

    # a later failure replaces the previous run's "Done" (here: a view outside the slide, refused when planned)
    app.viewer.camera.center = (10_000, 10_000)
    assert dock.predict() is None
    assert dock.run_state.failed and "empty or outside the slide" in dock.status.text()
    assert "Done:" not in dock.status.text()


def test_train_dock_error_state_and_reset(app, qtbot):
    dock = app.train
    labels = app.annotations(paint=False)  # empty: training refuses it
    dock.annotations.set_layer(labels)
    assert dock.train() is None
    assert dock.run_state.failed and "is empty" in dock.status.text() and dock.progress.format() == "failed"
    assert app.session.job == "" and dock.train_button.isEnabled()


def test_output_folder_is_chosen_once_shown_in_every_dock_and_opened(app, qtbot, tmp_path, monkeypatch):
    from napari_pfmseg import _output_folder, _preferences

    first = _preferences.output_folder()  # chosen by the own_output_folder fixture

    for dock in (app.predict, app.train):
        assert dock.output.path.text() == str(first)
    chosen = tmp_path / "chosen"
    monkeypatch.setattr(_output_folder, "open_folder", lambda parent, title: str(chosen))
    app.predict.output.change_button.click()
    assert _preferences.output_folder() == chosen.resolve()  # remembered (a file in the user's config folder)
    for dock in (app.predict, app.train):
        assert dock.output.path.text() == str(chosen.resolve())
    opened = []
    monkeypatch.setattr(_output_folder.QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile())
                        or True)
    app.train.output.open_button.click()
    assert opened == [str(chosen.resolve())] and chosen.is_dir()

    build_model(app, qtbot)
    outcome = predict_view(app, qtbot, (64, 64))
    assert Path(outcome.path).parent == chosen.resolve() / "predictions"


def test_default_output_folder_is_beside_the_slide(app):
    from napari_pfmseg import _preferences

    _preferences.set_output_folder(None)
    app.session.output_changed.emit(None)
    slide_dir = Path(app.image.metadata["pfmseg"]["path"]).parent
    assert app.session.output_root(app.image) == slide_dir / "pfmseg-output"
    assert app.predict.output.path.text() == str(slide_dir / "pfmseg-output")
    # a layer without a file (an array dropped on the viewer) falls back to the session folder
    layer = app.viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True)
    assert app.session.output_root(layer) == app.session.work_dir


def test_save_measurements_and_the_cohort_table(app, qtbot, tmp_path):
    from pfmseg_engine.annotations.measurements import read_measurements

    build_model(app, qtbot)
    assert not app.predict.save_measurements_button.isEnabled()
    first = predict_view(app, qtbot, (64, 64))
    second = predict_view(app, qtbot, (192, 192))
    assert first.path != second.path and app.predict.save_measurements_button.isEnabled()
    target = tmp_path / "mine" / "areas.csv"
    written = app.predict.save_measurements(target)
    assert written[0] == target and read_measurements(target) == read_measurements(second.measurements)
    cohort = written[1]
    assert cohort == target.with_name("areas_cohort.csv")
    rows = cohort.read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("slide,")  # a header and one row per prediction


def test_slide_without_mpp_is_calibrated_in_one_place_and_remembered(make_napari_viewer, tmp_path, notes):  # noqa: F811
    import tifffile

    from napari_pfmseg._annotate_widget import AnnotateWidget
    from napari_pfmseg._session import session_for

    path = tmp_path / "uncalibrated.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    viewer = make_napari_viewer(show=True)
    session_for(viewer)  # a dock is open: the session watches new layers
    annotate = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(annotate)
    [layer] = viewer.open(str(path), plugin="pfmseg")
    assert str(layer.units[-1]) == "pixel" and layer.metadata["pfmseg"]["mpp"] is None
    assert any("Annotate dock's 'slide µm/px' field" in note for note in notes)

    annotate.image.set_layer(layer)
    assert annotate.slide_mpp.isEnabled()
    annotate.slide_mpp.setValue(0.5)
    assert annotate.apply_slide_mpp()
    assert str(layer.units[-1]) in ("µm", "micrometer") and layer.scale[-1] == pytest.approx(0.5)
    labels = annotate.create_layer()
    assert labels is not None and str(labels.units[-1]) in ("µm", "micrometer")

    # opened again (another session), the file comes in µm at once
    [again] = viewer.open(str(path), plugin="pfmseg")
    assert again.metadata["pfmseg"]["mpp"] == pytest.approx(0.5) and again.scale[-1] == pytest.approx(0.5)
    assert str(again.units[-1]) in ("µm", "micrometer")


def test_names_and_units_read_as_a_user_reads_them(app):
    from napari_pfmseg._layers import layer_name, unit_label

    labels = app.annotations()
    text = app.annotate.totals.text()
    assert "µm²" in text and "micrometer" not in text
    assert layer_name("annotations", "annotations") == "annotations"
    assert layer_name("slide-7", "annotations") == "slide-7 annotations"
    assert unit_label("micrometer") == "µm" and unit_label("pixel") == "px"
    assert labels.name == f"{app.image.name} annotations"


def test_reader_asks_the_engine_which_slides_it_opens(tmp_path):
    from napari_pfmseg._reader import napari_get_reader, read_slides

    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "image0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # one instance, no suffix
    assert napari_get_reader(str(dicom)) is read_slides
    png = tmp_path / "tile.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert napari_get_reader(str(png)) is None  # napari's own reader opens plain images
    assert napari_get_reader(str(tmp_path / "missing.svs")) is None
    (tmp_path / "notes.json").write_text(json.dumps({}))
    assert napari_get_reader(str(tmp_path / "notes.json")) is None


def test_the_predict_dock_plans_what_the_cli_plans(app, qtbot, tmp_path):
    """The form starts at the engine's PredictionSettings, so the same slide and model give the same plan
    (and so the same output fingerprint) from napari and from ``infer``."""
    from pfmseg_engine.cli import build_parser
    from pfmseg_engine.commands.infer import prediction_settings
    from pfmseg_engine.inference.plan import ModelInfo, plan_slide

    build_model(app, qtbot)
    app.predict.set_mode("slide")
    app.predict.view_first.setChecked(False)
    settings = app.predict.settings()
    [target] = app.predict.controller._targets(app.image, app.session.slide_for(app.image), settings, None,
                                               app.session.model, tmp_path / "gui")
    slide_path = app.image.metadata["pfmseg"]["path"]
    args = build_parser().parse_args(["infer", "--checkpoint", "model.pt", "--slide", slide_path,
                                      "--output_dir", str(tmp_path / "cli")])
    cli = plan_slide(app.session.slide_for(app.image), ModelInfo.from_model(app.session.model),
                     prediction_settings(args), output_dir=tmp_path / "cli")
    assert target.plan.identity() == cli.identity()
    assert target.plan.chunk == cli.chunk and settings.prediction.batch_size == prediction_settings(args).batch_size


def test_the_plugin_is_called_by_one_name_wherever_a_user_meets_it():
    """napari lists plugins by their manifest name; pip by the distribution; the entry point key ties them."""
    from importlib.metadata import distribution, entry_points

    import yaml

    import napari_pfmseg

    manifest = yaml.safe_load((Path(napari_pfmseg.__file__).parent / "napari.yaml").read_text())
    keys = [e.name for e in entry_points(group="napari.manifest") if e.value.startswith("napari_pfmseg")]
    assert keys == [manifest["name"]] == [manifest["display_name"]] == [distribution("pfmseg").metadata["Name"]]
