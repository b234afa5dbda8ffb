"""The QuPath round trip in napari: import GeoJSON as a trainable annotation layer, export it back, and
saved annotation layers (pyramids once larger than a chunk) reopening as paintable, trainable layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from test_napari_workflow import own_output_folder  # noqa: F401  (autouse: outputs per test)
from testdata import CMU

pytestmark = pytest.mark.gui

TIMEOUT_MS = 180_000


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def qupath_file(path):
    """QuPath-style export on the 512 x 512 demo slide (level-0 px at 0.5 um/px)."""
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [rect(40, 40, 200, 160)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Gland", "color": [220, 20, 60]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [rect(260, 260, 480, 480), rect(320, 320, 400, 400)], [rect(300, 40, 460, 120)]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [30, 144, 255]}}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[80, 80], [90, 90]]},
         "properties": {"objectType": "annotation"}},  # counting points: left out with a warning
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture
def docked(make_napari_viewer):
    from napari_pfmseg._annotate_widget import AnnotateWidget
    from napari_pfmseg._session import session_for
    from napari_pfmseg._train_widget import TrainWidget

    viewer = make_napari_viewer()
    [image] = viewer.open_sample("pfmseg", "demo_slide")
    annotate, train = AnnotateWidget(viewer), TrainWidget(viewer)
    session = session_for(viewer)
    session.set_recipe(session.recipe.with_changes(backbone="kaiko-vits16", tiny=True, input_size=32, mpp=1.0))
    return viewer, image, annotate, train


def test_import_qupath_geojson_train_on_it_and_export_it_back(docked, qtbot, tmp_path):
    from pfmseg_engine.annotations import PolygonLabels, read_geojson

    viewer, _, annotate, train = docked
    annotate.target_mpp.setValue(1.0)
    layer = annotate.import_geojson(qupath_file(tmp_path / "demo.geojson"))
    assert layer is not None and layer.__class__.__name__ == "Labels"
    meta = layer.metadata["pfmseg"]
    assert meta["kind"] == "annotation" and meta["class_names"] == ["Gland", "Stroma"]
    assert meta["colours"] == [[220, 20, 60], [30, 144, 255]]
    data = layer.data
    assert data.shape == (256, 256) and layer.scale[-1] == pytest.approx(1.0)
    assert data[50, 60] == 1 and data[40, 40] == 1  # gland, where the points were drawn too
    assert data[150, 150] == 2 and data[180, 180] == 0 and data[40, 190] == 2  # stroma, its hole, its 2nd part
    assert annotate.counts() == [int((data == 1).sum()), int((data == 2).sum())]
    outlines = [lay for lay in viewer.layers if lay.__class__.__name__ == "Shapes"]
    assert len(outlines) == 1 and len(outlines[0].data) == 3  # outer rings: gland, 2 stroma parts
    assert outlines[0].data[0][:, 1].min() == pytest.approx(39.5)  # pixel corners -> the slide's pixel centres

    train.epochs.setValue(1)
    train.samples.setValue(8)
    train.batch.setValue(4)
    finished = []
    train.controller.finished.connect(finished.append)
    assert train.train() is not None
    qtbot.waitUntil(lambda: not train.controller.running, timeout=TIMEOUT_MS)
    assert finished[-1].status == "completed", finished[-1].message
    assert train.session.state.model.config.class_names == ("Gland", "Stroma")

    annotate.per_region.setChecked(True)
    annotate.object_type.setCurrentText("detection")
    written = annotate.export_geojson(tmp_path / "out.geojson", layer)
    features = json.loads(written.read_text())["features"]
    assert len(features) == 3 and {f["properties"]["objectType"] for f in features} == {"detection"}
    found = read_geojson(written)
    back = PolygonLabels([f.geometry for f in found.features],
                         [meta["class_names"].index(f.class_name) + 1 for f in found.features], data.shape, 2.0)
    assert np.array_equal(np.asarray(back), data)  # the same pixels come back in QuPath's frame

    [saved] = layer.save(str(tmp_path / "layer.geojson"), plugin="pfmseg")  # File > Save as GeoJSON
    saved_features = json.loads(Path(saved).read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in saved_features} == {"Gland", "Stroma"}


def test_import_errors_are_one_message(docked, tmp_path):
    from napari.utils.notifications import notification_manager

    _, _, annotate, _ = docked
    seen = []
    notification_manager.notification_ready.connect(lambda n: seen.append(str(n.message)))
    bad = tmp_path / "far.geojson"
    far = {"type": "Polygon", "coordinates": [rect(0, 0, 9000, 9)]}
    bad.write_text(json.dumps([{"type": "Feature", "geometry": far, "properties": {"classification": {"name": "A"}}}]))
    assert annotate.import_geojson(bad) is None
    assert any("far.geojson, feature 0 lies at" in note for note in seen)


def test_the_widget_imports_cells_as_chosen(docked):
    """The QuPath box's choices reach the engine: nuclei give smaller cell labels than cell boundaries."""
    from pfmseg_engine.annotations.geojson import ImportOptions

    _, _, annotate, _ = docked
    assert annotate.cells.currentText() == ImportOptions().cells
    assert annotate.ignore_classes.currentText() == ImportOptions().ignore_classes
    annotate.target_mpp.setValue(0.5)
    cells = Path(__file__).parent / "data" / "qupath" / "v05_cells.geojson"
    as_cells = annotate.import_geojson(cells)
    annotate.cells.setCurrentText("nucleus")
    as_nuclei = annotate.import_geojson(cells)
    assert as_cells is not None and as_nuclei is not None
    cell_pixels, nucleus_pixels = (int(np.count_nonzero(layer.data[:40, :70])) for layer in (as_cells, as_nuclei))
    assert 0 < nucleus_pixels < cell_pixels / 3


def test_saved_annotation_pyramid_reopens_paintable_and_trainable(make_napari_viewer, tmp_path):
    from napari_pfmseg._annotations import is_annotation_layer, new_annotation_layer, training_pairs
    from napari_pfmseg._session import session_for

    viewer = make_napari_viewer()
    [image] = viewer.open(str(CMU), plugin="pfmseg")
    slide = session_for(viewer).slide_for(image)
    data, kwargs = new_annotation_layer(image, slide, slide.mpp, ["tumour", "stroma"], [[200, 0, 0], [0, 160, 0]])
    data[100:400, 200:900] = 1
    data[2500:2900, 1500:2100] = 2
    labels = viewer.add_labels(data, **kwargs)
    assert labels.data.shape == (2967, 2220)
    [written] = labels.save(str(tmp_path / "big.ome.zarr"), plugin="pfmseg")
    import zarr

    assert len([k for k in zarr.open_group(written, mode="r").array_keys()]) > 1  # saved as a pyramid
    [reopened] = viewer.open(written, plugin="pfmseg")
    assert reopened.__class__.__name__ == "Labels" and not reopened.multiscale
    assert isinstance(reopened.data, np.ndarray) and reopened.editable
    assert is_annotation_layer(reopened) and reopened.metadata["pfmseg"]["class_names"] == ["tumour", "stroma"]
    assert np.array_equal(reopened.data, labels.data)
    assert reopened.scale[-1] == pytest.approx(labels.scale[-1])
    assert tuple(reopened.translate) == pytest.approx(tuple(labels.translate))
    reopened.paint((1000, 1000), 2)  # painting works on the reopened layer
    assert reopened.data[1000, 1000] == 2
    _, snapshot, plan = training_pairs(slide, image, reopened)
    assert tuple(plan.shape) == snapshot.shape == (2967, 2220) and snapshot[1000, 1000] == 2
