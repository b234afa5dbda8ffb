"""QuPath GeoJSON read in QuPath's own terms, from files in the shapes QuPath 0.2-0.5 write (tests/data/qupath).

Points and lines are left out with one warning (refused in strict mode), classes ending in "*" are trained
as QuPath's pixel classifier trains them (``Region*`` never is) and left out of the measurements, cells
train on their boundary or their nucleus, derived classes are named "Tumor: Positive" whatever the
version wrote, and the options reach the CLI and the napari import from the engine's one declaration.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from pfmseg_engine.annotations import ImportOptions, class_table, load_annotations, measure_output, read_geojson
from pfmseg_engine.annotations.sources import class_table_of
from pfmseg_engine.cli import main
from pfmseg_engine.errors import ConfigError, DataError
from pfmseg_engine.labelstore.omezarr import write_labels
from pfmseg_engine.slides import Slide, plan_resolution
from testdata import CMU, TEST_DATA

DATA = TEST_DATA / "qupath"
FEATURES = DATA / "v05_feature_collection.geojson"
CELLS = DATA / "v05_cells.geojson"


@pytest.fixture(scope="module")
def slide() -> Slide:
    """A 256 x 256 px slide at 0.5 µm/px: every test file was drawn on it."""
    return Slide.from_array(np.zeros((256, 256, 3), np.uint8), mpp=0.5, name="tiny")


def labels_of(slide: Slide, path, **options) -> tuple[np.ndarray, object]:
    """(labels of the whole slide at level 0, class table) of one file read with ``options``."""
    source = load_annotations(path, slide=slide, options=options)
    table = class_table_of([source])
    return np.asarray(source.labels(table, plan_resolution(slide, 0.5))), table


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- every kind of export ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "classes"), [
    ("v05_feature_collection.geojson", ["Tumor", "Stroma", "Ignore*", "Artefact*", "Ignore_from_analysis", "Region*"]),
    ("v04_plain_list.geojson", ["Tumor: Positive", "Tumor: Negative", "Stroma"]),
    ("v05_cells.geojson", ["Tumor", "Immune cells", "Tumor", "Tumor"]),
    ("v02_objects.geojson", ["Tumor: Positive", "Stroma", "Tumor: Positive: 2+"]),
    ("geometry_collections.geojson", ["Necrosis"]),
])
def test_every_kind_of_export_reads_by_default(slide, name, classes):
    source = load_annotations(DATA / name, slide=slide)
    assert [f.class_name for f in source.file.features] == classes
    assert all(f.geometry.is_valid and f.geometry.area > 0 for f in source.file.features)


def test_points_and_lines_are_left_out_with_one_warning(slide, caplog):
    with caplog.at_level(logging.WARNING, logger="pfmseg_engine.annotations"):
        labels, _ = labels_of(slide, FEATURES)
    [warning] = warnings_of(caplog)
    assert FEATURES.name in warning and "left out 5 point/line geometries" in warning
    assert "2 Point" in warning and "2 LineString" in warning and "1 MultiPoint" in warning and "strict=True" in warning
    found = read_geojson(FEATURES)
    assert found.unsupported == {"MultiPoint": 1, "Point": 2, "LineString": 2}  # one collection held a point + line
    assert [i for i, _ in found.skipped] == [6, 7, 8, 9]
    assert labels[100, 60] == 0 and labels[110, 70] == 0  # the classified points drew nothing
    collection = read_geojson(DATA / "geometry_collections.geojson")
    assert collection.features[0].geometry.area == 30 * 30  # the polygon of a collection is kept
    assert collection.unsupported == {"Point": 1, "MultiLineString": 1}


def test_strict_mode_refuses_points_and_lines_naming_the_feature():
    with pytest.raises(DataError, match=r"v05_feature_collection\.geojson, feature 6 has a MultiPoint geometry.*"
                                        r"Expand annotations"):
        read_geojson(FEATURES, options=ImportOptions(strict=True))
    with pytest.raises(DataError, match=r"feature 0 has a GeometryCollection holding a Point"):
        read_geojson(DATA / "geometry_collections.geojson", options={"strict": True})
    read_geojson(DATA / "v04_plain_list.geojson", options={"strict": True})  # areas only: nothing to refuse
    with pytest.raises(ConfigError, match="Did you mean 'cells'"):
        ImportOptions.of({"cell": "nucleus"})
    with pytest.raises(ConfigError, match="ignore_classes='star'"):
        ImportOptions(ignore_classes="star")


# --- ignored classes -----------------------------------------------------------------------------------------
def test_ignored_classes_are_trained_as_qupath_trains_them(slide):
    labels, table = labels_of(slide, FEATURES)
    assert table.names == ("Tumor", "Stroma", "Ignore*", "Artefact*", "Ignore_from_analysis")
    assert table.ignored == ("Region*",)  # QuPath's pixel classifier never trains Region*
    label = {name: k for k, name in enumerate(table.names, start=1)}
    assert labels[40, 40] == label["Ignore*"] and labels[25, 25] == label["Tumor"]  # the smaller area wins
    assert labels[210, 210] == label["Artefact*"] and labels[210, 30] == label["Ignore_from_analysis"]
    assert labels[30, 130] == label["Stroma"] and labels[70, 170] == 0  # a hole of the MultiPolygon
    assert labels[5, 5] == 0 and labels[250, 250] == 0  # only the Region* container lies there: not drawn


def test_the_prefix_rule_clears_ignore_areas_as_before(slide):
    labels, table = labels_of(slide, FEATURES, ignore_classes="prefix")
    assert table.names == ("Tumor", "Stroma", "Artefact*", "Region*")
    assert table.ignored == ("Ignore*", "Ignore_from_analysis")
    label = {name: k for k, name in enumerate(table.names, start=1)}
    assert labels[40, 40] == 0 and labels[25, 25] == label["Tumor"]  # Ignore* clears the tumour under it
    assert labels[210, 30] == 0 and labels[210, 210] == label["Artefact*"]
    assert labels[5, 5] == label["Region*"]  # an ordinary (largest, drawn first) class under this rule
    default = load_annotations(FEATURES, slide=slide)
    prefix = load_annotations(FEATURES, slide=slide, options={"ignore_classes": "prefix"})
    with pytest.raises(ConfigError, match="different ignore_classes rules"):
        class_table_of([default, prefix])


def test_measurements_leave_out_qupath_ignored_classes(tmp_path):
    labels = np.zeros((64, 64), np.uint8)
    labels[:20] = 1
    labels[20:40] = 2
    labels[40:50] = 3
    store = write_labels(tmp_path / "p.ome.zarr", labels, class_names=["Tumor", "Ignore*", "Stroma"], mpp=0.5)
    rows = measure_output(store)
    assert [row["class"] for row in rows] == ["Tumor", "Stroma"]
    tissue_px = 20 * 64 + 10 * 64  # the Ignore* pixels are no tissue
    assert rows[0]["tissue_area_mm2"] == pytest.approx(tissue_px * 0.25 / 1e6)
    assert rows[0]["share_of_tissue"] == pytest.approx(20 / 30)
    every = measure_output(store, ignored_classes=[])
    assert [row["class"] for row in every] == ["Tumor", "Ignore*", "Stroma"]


# --- cells ---------------------------------------------------------------------------------------------------
def test_cells_train_on_their_boundary_or_their_nucleus(slide, caplog):
    boundary, table = labels_of(slide, CELLS)
    tumour = table.names.index("Tumor") + 1
    assert boundary[12, 12] == tumour and np.count_nonzero(boundary[10:30, 10:30]) == 400
    with caplog.at_level(logging.WARNING, logger="pfmseg_engine.annotations"):
        nucleus, _ = labels_of(slide, CELLS, cells="nucleus")
    assert nucleus[12, 12] == 0 and nucleus[20, 20] == tumour
    assert np.count_nonzero(nucleus[10:30, 10:30]) == 100 and np.count_nonzero(nucleus[10:30, 40:60]) == 64
    assert np.count_nonzero(nucleus[10:30, 70:90]) == 400  # a cell without nucleusGeometry keeps its boundary
    assert np.count_nonzero(nucleus[10:30, 100:120]) == 400  # a detection is no cell
    assert ["1 cell(s) have no nucleusGeometry (first: feature 2)" in m for m in warnings_of(caplog)] == [True]
    v02 = read_geojson(DATA / "v02_objects.geojson", options={"cells": "nucleus"})
    assert v02.features[2].object_type == "cell" and v02.features[2].geometry.area == 100


# --- names, ids ----------------------------------------------------------------------------------------------
def test_derived_classes_are_named_as_qupath_names_them(slide):
    v02 = read_geojson(DATA / "v02_objects.geojson")
    assert [(f.class_name, f.colour) for f in v02.features] == [
        ("Tumor: Positive", (200, 50, 50)), ("Stroma", (150, 200, 150)), ("Tumor: Positive: 2+", (112, 112, 225))]
    v04 = read_geojson(DATA / "v04_plain_list.geojson")
    assert [f.class_name for f in v04.features] == ["Tumor: Positive", "Tumor: Negative", "Stroma"]
    # the same class from both versions is one class (no "only in this file" spelling error)
    table = class_table_of([load_annotations(DATA / "v02_objects.geojson", slide=slide),
                            load_annotations(DATA / "v04_plain_list.geojson", slide=slide)])
    assert table.names == ("Tumor: Positive", "Stroma", "Tumor: Positive: 2+", "Tumor: Negative")
    # intensity classes of one base are different classes; a misspelt base is still caught
    one, two = ("a.geojson", {"Tumor: 1+": None}, {}), ("b.geojson", {"Tumor: 2+": None}, {})
    assert class_table([one, two]).names == ("Tumor: 1+", "Tumor: 2+")
    with pytest.raises(DataError, match="'Tumour: 2\\+', found only in this file"):
        class_table([one, two, ("c.geojson", {"Tumour: 2+": None}, {})])


def test_ids_locks_and_object_types_are_read():
    v05 = read_geojson(FEATURES)
    assert v05.features[0].object_id == "3f2b6c1e-8d4a-4b7e-9a51-0c6e2d7f1a01"
    assert [f.locked for f in v05.features] == [False] * 5 + [True]
    v02 = read_geojson(DATA / "v02_objects.geojson")  # v0.2 put the object type where ids go now
    assert [(f.object_id, f.object_type, f.locked) for f in v02.features] == [
        (None, "annotation", False), (None, "annotation", True), (None, "cell", False)]


# --- the options reach the CLI and napari --------------------------------------------------------------------
@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"system": {"device": "cpu"}, "model": {"pfm_name": "kaiko-vits16", "tiny": True},
                                    "logging": {"log_dir": str(tmp_path / "logs")}}))
    return path


class Captured(DataError):
    """Raised by the stand-ins below so the command stops right after handing the options over."""


def capture(seen: dict):
    def stand_in(*args, **kwargs):
        seen.update(kwargs)
        raise Captured("captured")

    return stand_in


def test_cli_flags_become_the_engines_import_options(config, tmp_path, monkeypatch, capsys):
    import pfmseg_engine.compare.data
    import pfmseg_engine.training.slides

    train = ["train", "--config", str(config), "--slides", str(CMU), "--annotations", str(FEATURES), "--no-progress"]
    assert main([*train, "--strict"]) == 2  # refused while reading, before any model is built
    assert "feature 6 has a MultiPoint geometry" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()

    seen: dict = {}
    monkeypatch.setattr(pfmseg_engine.training.slides, "build_slide_trainer", capture(seen))  # what train uses
    assert main(train) == 2 and seen["import_options"] == ImportOptions()
    assert main([*train, "--ignore_classes", "prefix", "--cells", "nucleus"]) == 2
    assert seen["import_options"] == ImportOptions(ignore_classes="prefix", cells="nucleus")
    capsys.readouterr()
    assert main([*train, "--skip_unsupported"]) == 2  # deprecated: accepted, and the default anyway
    assert "no longer needed" in capsys.readouterr().err and seen["import_options"] == ImportOptions()
    assert main([*train, "--skip_unsupported", "--strict"]) == 2
    assert "contradict" in capsys.readouterr().err

    monkeypatch.setattr(pfmseg_engine.compare.data, "compare_on_slides", capture(seen))
    assert main(["compare", "--config", str(config), "--pfms", "unet", "--output_dir", str(tmp_path / "cmp"),
                 "--slides", str(CMU), "--annotations", str(FEATURES), "--cells", "nucleus", "--strict"]) == 2
    assert seen["import_options"] == ImportOptions(strict=True, cells="nucleus")


def test_napari_import_reads_with_the_engines_defaults_and_options(slide, monkeypatch):
    pytest.importorskip("napari")
    import napari_pfmseg._notify
    from napari_pfmseg._qupath import import_geojson, read_for_slide

    shown: list[str] = []
    monkeypatch.setattr(napari_pfmseg._notify, "notify_warning", shown.append)
    image = SimpleNamespace(name="tiny", scale=(0.5, 0.5), translate=(0.0, 0.0), units=("µm", "µm"))
    (data, kwargs), outlines = import_geojson(image, slide, FEATURES, 0.5)
    assert kwargs["metadata"]["pfmseg"]["class_names"] == ["Tumor", "Stroma", "Ignore*", "Artefact*",
                                                          "Ignore_from_analysis"]
    assert data[40, 40] == 3 and outlines is not None
    assert len(shown) == 1 and "left out 5 point/line geometries" in shown[0]
    source = read_for_slide(CELLS, slide, options={"cells": "nucleus"})
    assert source.options == ImportOptions(cells="nucleus") and source.file.features[0].geometry.area == 100
