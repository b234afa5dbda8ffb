"""QuPath GeoJSON in: reading, checks with one clear message each, exact lazy rasterisation, slide training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from shapely.geometry import Polygon, box

from pfmseg_engine.annotations import (
    PolygonLabels,
    StoreLabels,
    class_table,
    labels_to_features,
    load_annotations,
    read_geojson,
)
from pfmseg_engine.annotations.rasterize import StoreLabels as _StoreLabels
from pfmseg_engine.checkpoint import read_checkpoint
from pfmseg_engine.cli import main
from pfmseg_engine.errors import ConfigError, DataError
from pfmseg_engine.labelstore.omezarr import write_labels
from pfmseg_engine.slides import Slide
from testdata import CMU

CMU_SIZE = (2220, 2967)  # (width, height) level-0 px at 0.499 um/px


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry, name=None, colour=None, object_type="annotation", **extra):
    properties = {"objectType": object_type, **extra}
    if name is not None:
        properties["classification"] = {"name": name, **({"color": colour} if colour else {})}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def polygon(*rings):
    return {"type": "Polygon", "coordinates": [list(r) for r in rings]}


def qupath_export(tmp_path: Path, name: str = "cmu.geojson") -> Path:
    """A QuPath-style export on CMU-1-Small-Region: areas of two classes (one with a hole, one a MultiPolygon),
    a detection, an Ignore* region, an unclassified annotation (skipped)."""
    features = [
        feature(polygon(rect(700, 1500, 1100, 1900), rect(850, 1650, 950, 1750)), "Tissue", [200, 0, 100]),
        feature({"type": "MultiPolygon", "coordinates": [[rect(1700, 200, 2100, 600)], [rect(1800, 2400, 2150, 2800)]]},
                "Glass", [230, 230, 230]),
        feature(polygon(rect(1200, 1200, 1230, 1228)), "Tissue", [200, 0, 100], object_type="detection"),
        feature(polygon(rect(720, 1520, 760, 1560)), "Ignore*", [0, 0, 0]),
        feature(polygon(rect(10, 10, 50, 50))),  # unclassified: no class to train
    ]
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


# --- reading --------------------------------------------------------------------------------------------
def test_reads_qupath_export_classes_colours_holes(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pfmseg_engine.annotations"):
        found = read_geojson(qupath_export(tmp_path))
    assert "unclassified" in caplog.text and "feature 4" in caplog.text
    assert found.classes() == {"Tissue": (200, 0, 100), "Glass": (230, 230, 230), "Ignore*": (0, 0, 0)}
    tissue = found.features[0].geometry
    assert tissue.area == 400 * 400 - 100 * 100  # the hole is kept
    assert found.features[1].geometry.geom_type == "MultiPolygon"
    assert [f.object_type for f in found.features[:3]] == ["annotation", "annotation", "detection"]
    assert found.features[3].ignored and (4, "unclassified") in found.skipped


def test_list_of_features_legacy_ids_and_packed_colours():
    data = [{"type": "Feature", "id": "PathDetectionObject", "geometry": polygon(rect(0, 0, 4, 4)),
             "properties": {"classification": {"name": "Nuclei", "colorRGB": -16776961}}},
            {"type": "Feature", "geometry": polygon(rect(4, 4, 8, 8)),
             "properties": {"classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}}]
    found = read_geojson(data)
    assert [(f.class_name, f.colour, f.object_type) for f in found.features] == [
        ("Nuclei", (0, 0, 255), "detection"), ("Tumor: Positive", (1, 2, 3), "annotation")]


def test_self_intersecting_polygon_is_repaired_with_a_warning(caplog):
    bowtie = polygon([[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]])
    with caplog.at_level(logging.WARNING, logger="pfmseg_engine.annotations"):
        found = read_geojson([feature(bowtie, "Tumor")], name="bowtie.geojson")
    assert found.repaired == [0]
    assert "bowtie.geojson, feature 0" in caplog.text and "make_valid" in caplog.text
    geometry = found.features[0].geometry
    assert geometry.is_valid and geometry.area == pytest.approx(50.0)


def test_unknown_geometry_names_file_feature_and_fix_in_strict_mode(tmp_path):
    path = tmp_path / "points.geojson"
    path.write_text(json.dumps([feature(polygon(rect(0, 0, 9, 9)), "Tumor"),
                                feature({"type": "Point", "coordinates": [3, 4]}, "Tumor")]))
    with pytest.raises(DataError, match=r"points\.geojson, feature 1 has a Point geometry.*QuPath.*strict=False"):
        read_geojson(path, options={"strict": True})
    skipped = read_geojson(path)  # the default: left out, counted
    assert len(skipped.features) == 1 and skipped.skipped == [(1, "Point geometry")]
    assert skipped.unsupported == {"Point": 1}


def test_coordinates_outside_the_slide_and_the_file_frame(tmp_path):
    slide = Slide.from_array(np.zeros((300, 400, 3), np.uint8), mpp=0.5, name="small", bounds_offset=(1000, 2000))
    path = tmp_path / "far.geojson"
    path.write_text(json.dumps([feature(polygon(rect(10, 10, 50, 50)), "A"),
                                feature(polygon(rect(1100, 2100, 1150, 2150)), "A")]))
    with pytest.raises(DataError, match=r"far\.geojson, feature 1 lies at x 1100\.\.1150.*slide 'small' is 400 x 300.*"
                                        r"frame='file'"):
        load_annotations(path, slide=slide)
    # the same file in the scanner's full frame: the bounds offset is subtracted, then feature 0 is outside
    with pytest.raises(DataError, match="feature 0"):
        load_annotations(path, slide=slide, frame="file")
    clipped = load_annotations(path, slide=slide, clip=True)
    assert len(clipped.file.features) == 1  # the outside one is dropped, with a warning
    moved = read_geojson(path, frame="file", bounds_offset=slide.bounds_offset)
    assert moved.features[1].geometry.bounds == (100, 100, 150, 150)


def test_class_tables_across_files():
    a = ("a.geojson", {"Tumor": (255, 0, 0), "Stroma": None}, {"Tumor": "a.geojson, feature 0"})
    b = ("b.geojson", {"Stroma": (0, 255, 0), "Necrosis": None, "Ignore*": None}, {})
    table = class_table([a, b], ignore_classes="prefix")
    assert table.names == ("Tumor", "Stroma", "Necrosis") and table.ignored == ("Ignore*",)
    assert table.colours[0] == (255, 0, 0) and table.colours[1] == (0, 255, 0)  # colours from the files
    assert table.label_of("Ignore*") == 0 and table.label_of("Necrosis") == 3
    qupath = class_table([a, b])  # the default: QuPath trains its ignored classes
    assert qupath.names == ("Tumor", "Stroma", "Necrosis", "Ignore*") and qupath.label_of("Ignore*") == 4
    typo = ("c.geojson", {"Tumour": None}, {"Tumour": "c.geojson, feature 7"})
    with pytest.raises(DataError, match=r"c\.geojson, feature 7 has class 'Tumour', found only in this file.*"
                                        r"'Tumor'.*class_map=\{'Tumour': 'Tumor'\}"):
        class_table([a, b, typo])
    with pytest.raises(DataError, match=r"a\.geojson, feature 0 has class 'Tumor'.*not one of the model's classes"):
        class_table([a], class_names=["Stroma", "Fat"])
    with pytest.raises(DataError, match="No classified areas"):
        class_table([("e.geojson", {"Ignore*": None}, {})], ignore_classes="prefix")
    with pytest.raises(DataError, match=r"No classified areas.*Region\*"):
        class_table([("e.geojson", {"Region*": None}, {})])


# --- rasterisation ------------------------------------------------------------------------------------------
def test_pixel_centres_decide_and_tiles_match_the_whole():
    labels = PolygonLabels([box(96, 64, 160, 128)], [2], (200, 200), 1.0)
    ys, xs = np.nonzero(np.asarray(labels))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (96, 159, 64, 127)
    shape = Polygon([(10.3, 5.7), (180.2, 20.1), (150.5, 190.9), (60.1, 120.4), (5.5, 170.2)],
                    holes=[[(60, 60), (100, 60), (100, 100), (60, 100)]])
    lazy = PolygonLabels([shape], [1], (200, 200), 1.0)
    whole = np.asarray(lazy)
    tiled = np.zeros_like(whole)
    for y in range(0, 200, 37):
        for x in range(0, 200, 41):
            tiled[y:y + 37, x:x + 41] = lazy[y:y + 37, x:x + 41]
    assert np.array_equal(whole, tiled)
    from skimage.measure import points_in_poly

    yy, xx = np.mgrid[0:200, 0:200]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside = points_in_poly(centres, np.asarray(shape.exterior.coords)) & ~points_in_poly(
        centres, np.asarray(shape.interiors[0].coords))
    assert np.array_equal(inside.reshape(200, 200), whole.astype(bool))


def test_overlaps_small_objects_and_ignore():
    stroma, island = box(0, 0, 100, 100), box(40, 40, 60, 60)
    nuclei = [box(x, 10, x + 6, 16) for x in range(5, 95, 10)]
    ignore = box(80, 0, 100, 100)
    labels = np.asarray(PolygonLabels([island, stroma, *nuclei, ignore], [2, 1, *[3] * 9, 0], (100, 100), 1.0))
    assert labels[50, 50] == 2 and labels[20, 20] == 1  # the smaller area wins, whatever the order
    assert labels[12, 7] == 3 and labels[12, 14] == 1  # small objects on top
    assert not labels[:, 80:].any()  # Ignore* clears everything under it


def test_labels_round_trip_through_qupath_features_at_a_coarser_resolution():
    labels = np.zeros((300, 400), np.uint8)
    labels[20:120, 30:200] = 1
    labels[50:80, 60:100] = 0  # a hole
    labels[150:290, 210:390] = 2
    labels[200:220, 250:260] = 1  # an island inside a hole of class 2
    features = labels_to_features(labels, class_names=["a", "b"], scale=2.0, mpp=0.5)
    found = read_geojson({"type": "FeatureCollection", "features": features})
    values = [1 if f.class_name == "a" else 2 for f in found.features]
    back = PolygonLabels([f.geometry for f in found.features], values, (300, 400), 2.0)
    assert np.array_equal(np.asarray(back), labels)


def test_store_labels_resample_a_saved_annotation_layer(tmp_path):
    labels = np.zeros((150, 200), np.uint8)
    labels[10:60, 20:90] = 2
    labels[100:140, 150:190] = 1
    store = write_labels(tmp_path / "a.ome.zarr", labels, class_names=["x", "y"], mpp=2.0, slide_mpp=0.5, chunk=64)
    same = StoreLabels(store, (150, 200), 4.0)  # 2 um/px on a 0.5 um/px slide
    assert np.array_equal(np.asarray(same), labels)
    finer = StoreLabels(store, (300, 400), 2.0, lut=[0, 0, 5])  # 1 um/px; class "x" dropped, "y" -> 5
    assert np.array_equal(finer[20:120, 40:180], np.where(labels[10:60, 20:90] == 2, 5, 0).repeat(2, 0).repeat(2, 1))
    assert finer.annotated_cells(64) == [(0, 64, 0, 64), (0, 64, 64, 128), (0, 64, 128, 192), (64, 128, 0, 64),
                                         (64, 128, 64, 128), (64, 128, 128, 192)]


# --- training from slides ----------------------------------------------------------------------------------
@pytest.fixture
def slide_config(tmp_path) -> Path:
    config = {"system": {"num_workers": 0, "device": "cpu"},
              "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"},
                        "cnn_adapter": {"channels": [8, 8, 16]}},
              "training": {"batch_size": 2, "epochs": 1, "samples_per_epoch": 4,
                           "augmentation": {"RandomResizedCropSize": 32}},
              "visualization": {"save_predictions": False},
              "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": "slides", "plot_history": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_trains_from_slides_with_geojson_and_a_saved_layer_then_resumes(tmp_path, slide_config, monkeypatch,
                                                                            capsys):
    def no_whole_raster(self, *args, **kwargs):
        raise AssertionError("a whole-slide label raster was requested")

    monkeypatch.setattr(PolygonLabels, "__array__", no_whole_raster)
    monkeypatch.setattr(_StoreLabels, "__array__", no_whole_raster)
    geojson = qupath_export(tmp_path)
    # the second slide's annotations were painted in napari at 4 um/px and saved: classes Glass + Fat
    painted = np.zeros((371, 278), np.uint8)
    painted[20:80, 200:260] = 1
    painted[300:360, 20:80] = 2
    store = write_labels(tmp_path / "painted.ome.zarr", painted, class_names=["Glass", "Fat"], mpp=3.992,
                         slide_mpp=0.499, class_colors=[[230, 230, 230], [250, 220, 0]], chunk=128,
                         extra={"source": "napari-pfmseg"})
    args = ["train", "--config", str(slide_config), "--slides", str(CMU), str(CMU), "--annotations", str(geojson),
            str(store), "--train_mpp", "2.0", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "logs" / "slides"
    assert "completed: 1 epochs" in out and str(experiment) in out
    last = read_checkpoint(experiment / "checkpoints" / "last.pt")
    # Ignore* is trained, as QuPath's pixel classifier trains its ignored classes
    assert last["config"]["class_names"] == ["Tissue", "Glass", "Ignore*", "Fat"] and last["config"]["mpp"] == 2.0
    assert (experiment / "checkpoints" / "best.pt").is_file()  # validation regions were held out and scored
    saved = yaml.safe_load((experiment / "config.yaml").read_text())
    assert saved["dataset"]["class_colors"][:4] == [[200, 0, 100], [230, 230, 230], [0, 0, 0], [250, 220, 0]]
    history = json.loads((experiment / "history.json").read_text())
    assert "mIoU" in history[0]

    assert main([*args, "--resume", str(experiment / "checkpoints" / "last.pt"),
                 "--options", "training.epochs=2"]) == 0
    assert read_checkpoint(experiment / "checkpoints" / "last.pt")["training_state"]["epoch"] == 2
    assert [row["epoch"] for row in json.loads((experiment / "history.json").read_text())] == [1, 2]


def test_bad_annotations_stop_before_anything_is_written(tmp_path, slide_config, capsys):
    bad = tmp_path / "typo.geojson"
    bad.write_text(json.dumps([feature(polygon(rect(100, 100, 300, 300)), "Tisue")]))
    code = main(["train", "--config", str(slide_config), "--slides", str(CMU), str(CMU), "--annotations",
                 str(qupath_export(tmp_path)), str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "typo.geojson, feature 0 has class 'Tisue'" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()
    assert main(["train", "--config", str(slide_config), "--slides", str(CMU), "--no-progress"]) == 2
    assert "--slides needs --annotations" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="2 slides but 1 annotation"):
        from pfmseg_engine.training import load_config, train_on_slides

        train_on_slides(load_config(slide_config, check_dataset=False), [CMU, CMU], [bad])


def test_slide_trainer_api_holds_out_regions_and_reads_lazily(tmp_path, slide_config):
    from pfmseg_engine.training import build_slide_trainer, load_config

    config = load_config(slide_config, check_dataset=False)
    trainer = build_slide_trainer(config, [CMU], [qupath_export(tmp_path)], train_mpp=2.0, validation_share=0.5)
    pair = trainer.slide_pairs[0]
    assert pair.plan.mpp == pytest.approx(2.0, rel=0.01) and pair.labels.shape == pair.plan.shape
    assert trainer.class_table.names == ("Tissue", "Glass", "Ignore*")
    assert trainer.val_source.num_images() >= 2  # squares of 64 px held out on both classes' regions
    for image, mask in zip(trainer.val_source.images, trainer.val_source.masks, strict=True):
        assert image.shape[:2] == mask.shape and (mask != 255).any()
    assert trainer.config.model.mpp == 2.0 and trainer.config.num_classes == 3
