"""``python -m pfmseg_engine infer``: the seed's image-set form and the whole-slide form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.cli import main
from testdata import CMU, TCGA

CLASSES = ("background", "pale", "stained", "dark")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight model saved the way training saves it (checkpoints/best.pt)."""
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=4, class_names=CLASSES,
                         tuning=TuningConfig(strategy="cnn_adapter"), head="multilevel", input_size=64)
    folder = tmp_path_factory.mktemp("run")
    path = folder / "checkpoints" / "best.pt"
    save_checkpoint(path, build_model(config))
    return path


def test_image_set_windowslide(checkpoint, slide_tile_dataset, tmp_path, capsys):
    tiles = slide_tile_dataset
    config = tmp_path / "config.yaml"
    config.write_text("dataset:\n  ignore_index: 255\n")
    code = main(["infer", "--config", str(config), "--checkpoint", str(checkpoint.parent.parent),
                 "--input_json", str(tiles), "--output_dir", str(tmp_path / "out"), "--input_size", "64",
                 "--resize_or_windowslide", "windowslide", "--batch_size", "4", "--device", "cpu"])
    assert code == 0
    masks = sorted((tmp_path / "out" / "predictions_masks").glob("*.png"))
    tests = json.loads(tiles.read_text())["data"]["test"]
    assert [m.name for m in masks] == sorted(Path(t["image_path"]).stem + ".png" for t in tests)
    for mask_path, entry in zip(masks, sorted(tests, key=lambda t: t["image_path"]), strict=True):
        image = Image.open(tiles.parent / entry["image_path"])
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == image.size[::-1] and mask.max() < 4
        overlay = Image.open(tmp_path / "out" / "predictions_overlays" / mask_path.name)
        assert overlay.size == (2 * image.size[0], image.size[1])  # label | prediction
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"mIoU", "Pixel_Accuracy", "Mean_Dice", "IoU_Class_0"} <= set(metrics)
    assert 0 <= metrics["Pixel_Accuracy"] <= 1
    assert "Metrics: mIoU" in capsys.readouterr().out


def test_image_set_resize_restores_size(checkpoint, slide_tile_dataset, tmp_path):
    tiles = slide_tile_dataset
    code = main(["infer", "--checkpoint", str(checkpoint), "--input_json", str(tiles), "--output_dir",
                 str(tmp_path), "--input_size", "64", "--resize_or_windowslide", "resize",
                 "--batch_size", "8"])
    assert code == 0
    masks = sorted((tmp_path / "predictions_masks").glob("*.png"))
    assert len(masks) == len(json.loads(tiles.read_text())["data"]["test"])
    for mask_path in masks:
        image = Image.open(tiles.parent / "images" / mask_path.name)
        assert Image.open(mask_path).size == image.size


def test_slide_form_with_exports(checkpoint, tmp_path, capsys):
    code = main(["infer", "--slide", str(CMU), "--checkpoint",
                 str(checkpoint), "--output_dir", str(tmp_path), "--target_mpp", "4.0", "--input_size", "64",
                 "--overlap", "0.5", "--blend", "constant", "--export", "ome-tiff", "geojson"])
    assert code == 0
    zarr_path = tmp_path / "CMU-1-Small-Region.ome.zarr"
    assert zarr_path.is_dir() and (tmp_path / "CMU-1-Small-Region_tissue.png").is_file()
    assert (tmp_path / "CMU-1-Small-Region.labels.ome.tif").is_file()
    geojson = json.loads((tmp_path / "CMU-1-Small-Region.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in geojson["features"]} <= set(CLASSES)
    meta = json.loads((zarr_path / ".zattrs").read_text())["pfmseg"]
    assert meta["class_names"] == list(CLASSES) and meta["blend"] == "constant"
    assert meta["resolution_plan"]["factor"] == 8
    assert "chunks run" in capsys.readouterr().out


def test_slide_form_predicts_a_region(checkpoint, tmp_path):
    code = main(["infer", "--slide", str(CMU), "--checkpoint",
                 str(checkpoint), "--output_dir", str(tmp_path), "--target_mpp", "4.0", "--input_size", "64",
                 "--region", "800", "400", "640", "512"])
    assert code == 0
    from pfmseg_engine.inference import LabelOutput

    [zarr_path] = tmp_path.glob("*.ome.zarr")
    output = LabelOutput(zarr_path)
    assert output.levels[0].shape == (512 // 8, 640 // 8)
    assert output.region_offset == (400.0, 800.0)  # (y, x) of the region in level-0 pixels


def test_slide_form_errors_are_clear(checkpoint, tmp_path, capsys):
    code = main(["infer", "--slide", str(TCGA), "--checkpoint",
                 str(checkpoint), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--mpp" in err and "Traceback" not in err
    assert main(["infer", "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path)]) == 2
    assert "--input_json" in capsys.readouterr().err


def test_manifest_with_tissue_roi_measurements_and_qupath_regions(checkpoint, tmp_path, capsys):
    """A manifest row's own tissue ROI limits the prediction; every slide gets its measurements CSV (and
    the cohort one table); GeoJSON exports one QuPath detection per region when asked."""
    import csv

    from pfmseg_engine.inference import LabelOutput

    roi = tmp_path / "roi.geojson"  # the top-left quarter of the slide (QuPath frame, level-0 pixels)
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "Tissue"}},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1100, 0], [1100, 1480], [0, 1480], [0, 0]]]}}]}))
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide_path,name,tissue_roi\n{CMU},cmu_roi,roi.geojson\n")
    out = tmp_path / "out"
    code = main(["infer", "--slide", str(manifest), "--checkpoint", str(checkpoint), "--output_dir", str(out),
                 "--target_mpp", "4.0", "--input_size", "64", "--export", "geojson", "--geojson_per_region",
                 "--geojson_object_type", "detection"])
    assert code == 0
    output = LabelOutput(out / "cmu_roi.ome.zarr")
    labels = np.asarray(output.levels[0][:])
    # the ROI ends at output pixel 137 (x) and 185 (y); windows touching it (64 px, halo 16) may reach beyond
    assert labels[:185, :137].all() and not labels[270:, :].any() and not labels[:, 225:].any()
    rows = list(csv.DictReader((out / "cmu_roi_measurements.csv").open()))
    assert {r["class"] for r in rows} <= set(CLASSES) and rows
    area = sum(float(r["area_um2"]) for r in rows)
    assert area == pytest.approx(float((labels > 0).sum()) * output.mpp ** 2, rel=1e-6)
    cohort = list(csv.DictReader((out / "measurements.csv").open()))
    assert {r["slide"] for r in cohort} == {"cmu_roi"}
    features = json.loads((out / "cmu_roi.geojson").read_text())["features"]
    assert features and {f["properties"]["objectType"] for f in features} == {"detection"}
    assert "measurements" in capsys.readouterr().out
