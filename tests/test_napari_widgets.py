"""The Model and Annotate widgets' own behaviour, and exports from the Predict widget."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")

import torch

from test_napari_workflow import own_output_folder  # noqa: F401  (autouse: outputs per test)

pytestmark = pytest.mark.gui

TIMEOUT_MS = 180_000



@pytest.fixture
def viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("pfmseg", "demo_slide")
    return viewer


def test_model_widget_shows_the_registry_and_strategy_settings(viewer):
    from napari_pfmseg._model_widget import ModelWidget
    from pfmseg_engine import list_backbones

    widget = ModelWidget(viewer)
    names = [widget.backbone.itemText(i) for i in range(widget.backbone.count())]
    assert names == list_backbones()
    widget.backbone.setCurrentText("uni_v1")
    info = widget.info.text()
    for text in ("dim 1024", "patch 16", "303.4 M params", "mean (0.485, 0.456, 0.406)", "hf-hub:MahmoodLab/UNI"):
        assert text in info
    widget.strategy.setCurrentText("lora")
    assert widget.tuning_form.isRowVisible(widget.rank) and not widget.tuning_form.isRowVisible(widget.adapter_depth)
    widget.strategy.setCurrentText("transformer_adapter")
    assert widget.tuning_form.isRowVisible(widget.adapter_depth) and not widget.tuning_form.isRowVisible(widget.rank)
    widget.rank.setValue(8)
    widget.device.setCurrentText("cpu")
    assert widget.session.recipe.strategy == "transformer_adapter" and widget.session.device == "cpu"


def test_build_save_and_load_a_checkpoint(viewer, qtbot, tmp_path):
    from napari_pfmseg._model_widget import ModelWidget

    widget = ModelWidget(viewer)
    widget.backbone.setCurrentText("kaiko-vits16")
    widget.tiny.setChecked(True)
    widget.strategy.setCurrentText("lora")
    widget.rank.setValue(4)
    widget.input_size.setValue(32)
    session = widget.session
    assert widget.build() is not None
    qtbot.waitUntil(lambda: session.model is not None and not session.job, timeout=TIMEOUT_MS)
    built = session.model
    assert built.config.tuning.strategy == "lora" and built.config.tuning.rank == 4
    assert "Current model" in widget.status.text()

    path = tmp_path / "model.pt"
    widget.save(path)
    qtbot.waitUntil(lambda: path.is_file() and not session.job, timeout=TIMEOUT_MS)
    session.set_model(None, "")
    widget.load(path)
    qtbot.waitUntil(lambda: session.model is not None and not session.job, timeout=TIMEOUT_MS)
    loaded = session.model
    assert loaded is not built and session.state.source == f"checkpoint {path}"
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(built.eval()(x), loaded(x), atol=1e-5)


def test_annotate_widget_classes_and_counts(viewer, qtbot):
    from napari_pfmseg._annotate_widget import AnnotateWidget

    widget = AnnotateWidget(viewer)
    assert widget.slide_mpp.value() == pytest.approx(0.5) and not widget.slide_mpp.isEnabled()
    widget.target_mpp.setValue(2.0)
    layer = widget.create_layer()
    assert layer.data.shape == (128, 128) and layer.scale[-1] == pytest.approx(2.0)
    assert layer.translate[-1] == pytest.approx(0.75)  # centre of a 4x4 block of 0.5 um pixels
    widget.add_class("lumen")
    widget.table.item(0, 1).setText("stroma")
    assert list(layer.features["class"]) == ["not annotated", "stroma", "tissue", "lumen"]
    assert layer.metadata["pfmseg"]["class_names"] == ["stroma", "tissue", "lumen"]
    layer.brush_size = 5
    layer.paint((20, 20), 3)
    layer.paint((60, 60), 1)
    qtbot.waitUntil(lambda: widget.table.item(2, 2).text() != "0", timeout=120_000)
    counts = widget.counts()
    assert counts == [int((layer.data == k).sum()) for k in (1, 2, 3)] and counts[1] == 0
    widget.remove_class()  # lumen still has pixels: refused
    assert widget.table.rowCount() == 3
    widget._on_cell_clicked(1, 1)
    assert layer.selected_label == 2


def test_exports_of_a_finished_prediction(viewer, qtbot, tmp_path):
    import tifffile

    from napari_pfmseg._layers import prediction_layer
    from napari_pfmseg._predict_widget import PredictWidget
    from pfmseg_engine import ModelConfig, build_model
    from pfmseg_engine.inference.slide import predict_slide

    model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=32, mpp=2.0,
                                    class_names=("tumour", "stroma")))
    slide_path = viewer.layers[0].metadata["pfmseg"]["path"]
    result = predict_slide(model, slide_path, tmp_path, window=32, chunk=64, batch_size=16, tissue=False)
    data, kwargs, _ = prediction_layer(result.path)
    layer = viewer.add_labels(data, **kwargs)
    widget = PredictWidget(viewer)
    assert widget.export_layer.layer() is layer

    zarr_copy = widget.export(layer, tmp_path / "copy.ome.zarr", "zarr")
    assert (zarr_copy / "0").exists()
    tiff = widget.export(layer, tmp_path / "labels.ome.tif", "tiff")
    with tifffile.TiffFile(tiff) as tif:
        assert np.array_equal(tif.series[0].levels[0].asarray(), np.asarray(data[0] if kwargs["multiscale"] else data))
    geojson = widget.export(layer, tmp_path / "labels.geojson", "geojson")
    features = json.loads(geojson.read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in features} <= {"tumour", "stroma"}
    assert all(f["geometry"]["type"] == "MultiPolygon" for f in features) and features


def test_uncalibrated_slide_gets_its_mpp_from_the_annotate_widget(make_napari_viewer):
    from napari_pfmseg._annotate_widget import AnnotateWidget
    from testdata import TCGA as path
    viewer = make_napari_viewer()
    [image] = viewer.open(str(path), plugin="pfmseg")
    widget = AnnotateWidget(viewer)
    assert widget.slide_mpp.isEnabled() and widget.slide_mpp.value() == 0.0
    assert "no µm/px" in widget.layer_info.text()
    widget.slide_mpp.setValue(0.5)
    widget.target_mpp.setValue(8.0)
    layer = widget.create_layer()
    assert image.scale[-1] == pytest.approx(0.5) and str(image.units[-1]) == "micrometer"
    assert layer.scale[-1] == pytest.approx(8.0, rel=0.01)
    assert abs(layer.data.shape[1] - 4443 / 16) <= 1 and abs(layer.data.shape[0] - 3567 / 16) <= 1


def test_plugin_modules_import_without_torch():
    """napari starts fast: reader, writer, sample and widget modules defer torch and the engine."""
    import subprocess
    import sys

    code = ("import sys, napari_pfmseg._reader, napari_pfmseg._writer, napari_pfmseg._sample_data, "
            "napari_pfmseg._model_widget, napari_pfmseg._annotate_widget, napari_pfmseg._train_widget, "
            "napari_pfmseg._predict_widget; print(sorted({'torch', 'pfmseg_engine'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_recipe_round_trips_every_tuning_setting():
    from napari_pfmseg._session import ModelRecipe
    from pfmseg_engine import ModelConfig, TuningConfig

    tuning = TuningConfig(strategy="transformer_adapter", adapter_depth=3, adapter_mlp_ratio=2.0,
                          adapter_drop_path_rate=0.1, adapter_qk_norm=True)
    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, class_names=("a", "b"),
                         tuning=tuning, input_size=64, mpp=1.0)
    recipe = ModelRecipe.from_config(config)
    assert recipe.model_config(["a", "b"]) == config
    changed = recipe.with_changes(strategy="lora", rank=4, input_size=96)
    assert changed.strategy == "lora" and changed.input_size == 96
    assert changed.tuning_config() == TuningConfig(**{**tuning.to_dict(), "strategy": "lora", "rank": 4,
                                                      "adapter_channels": tuple(tuning.adapter_channels)})
