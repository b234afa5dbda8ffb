"""Measurements out (areas, shares, regions across chunk borders, nuclei) and the GeoJSON export options."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from pfmseg_engine.annotations import (
    PolygonLabels,
    cohort_measurements,
    measure_output,
    read_geojson,
    write_cohort_measurements,
    write_measurements,
)
from pfmseg_engine.annotations.export import polygon_area
from pfmseg_engine.inference import LabelOutput, export_geojson, predict_slide, write_labels
from pfmseg_engine.slides import Slide
from test_wsi_support import PixelModel

CLASSES = ["Tumour", "Stroma", "Nuclei", "Background"]


def measured_labels() -> np.ndarray:
    """300 x 260 labels whose regions cross the 64-px chunk borders in every direction."""
    labels = np.zeros((300, 260), np.uint8)
    labels[250:, :] = 4  # background strip
    labels[10:30, 10:240] = 1  # a U of tumour over many chunks: one region
    labels[10:200, 10:30] = 1
    labels[10:200, 220:240] = 1
    labels[100:120, 100:140] = 2  # two stroma blobs
    labels[150:170, 60:70] = 2
    for i, (y, x) in enumerate([(60, 62), (62, 126), (126, 190), (190, 62), (40, 100), (40, 150), (200, 100),
                                (200, 126), (126, 62), (126, 126)]):
        labels[y:y + 4, x:x + 4 + (i % 2)] = 3  # nuclei straddling chunk borders, 16 or 20 px
    labels[230, 230] = 3  # a one-pixel speck
    return labels


def test_measurements_are_exact_across_chunks_and_written_beside_the_store(tmp_path):
    labels = measured_labels()
    store = write_labels(tmp_path / "slide1.ome.zarr", labels, class_names=CLASSES, mpp=0.5, chunk=64)
    rows = {row["class"]: row for row in measure_output(store, min_region_um2=1.0)}
    px = 0.25  # um^2 per pixel
    tissue = np.isin(labels, [1, 2, 3]).sum()
    for k, name in enumerate(CLASSES, start=1):
        row = rows[name]
        area = int((labels == k).sum())
        assert row["label"] == k and row["area_px"] == area
        assert row["area_um2"] == pytest.approx(area * px) and row["area_mm2"] == pytest.approx(area * px / 1e6)
        assert row["tissue_area_mm2"] == pytest.approx(tissue * px / 1e6)
        # regions: the whole array labelled at once (4-connected), regions below 1 um^2 (4 px) not counted
        components, _ = ndimage.label(labels == k)
        sizes = np.bincount(components.ravel())[1:]
        assert row["regions"] == int((sizes >= 4).sum())
    assert rows["Tumour"]["regions"] == 1 and rows["Stroma"]["regions"] == 2
    assert rows["Tumour"]["share_of_tissue"] == pytest.approx((labels == 1).sum() / tissue)
    assert rows["Background"]["share_of_tissue"] == ""  # not tissue
    assert rows["Nuclei"]["count"] == 10 and rows["Tumour"]["count"] == ""
    assert rows["Nuclei"]["mean_area_um2"] == pytest.approx((5 * 16 + 5 * 20) / 10 * px)

    path = write_measurements(store)
    assert path == tmp_path / "slide1_measurements.csv"
    with open(path) as handle:
        written = list(csv.DictReader(handle))
    assert [r["class"] for r in written] == CLASSES and written[2]["count"] == "11"  # the speck counts by default

    second = np.where(labels[:, :130] <= 2, labels[:, :130], 0)  # tumour and (here) necrosis
    other = write_labels(tmp_path / "slide2.ome.zarr", second, class_names=["Tumour", "Necrosis"], mpp=0.5, chunk=64)
    table = cohort_measurements([path, other])
    assert [row["slide"] for row in table] == ["slide1", "slide2"]
    assert table[1]["Stroma area_mm2"] == 0.0 and table[0]["Necrosis regions"] == 0
    assert table[1]["Necrosis area_mm2"] == pytest.approx((labels[:, :130] == 2).sum() * px / 1e6)
    assert "Nuclei count" in table[0] and table[0]["Nuclei count"] == 11
    cohort = write_cohort_measurements([store, other], tmp_path / "cohort.csv")
    with open(cohort) as handle:
        assert len(list(csv.DictReader(handle))) == 2


@pytest.fixture
def predicted(tmp_path):
    """A prediction of a slide whose scanned area starts at (1000, 2000) in its file (bounds offset)."""
    image = np.zeros((256, 256, 3), np.uint8)
    image[..., 0] = 255  # red: class 0
    image[64:128, 96:160] = (0, 255, 0)  # a green ring (class 1) with a red hole
    image[80:112, 112:144] = (255, 0, 0)
    for y, x in ((10, 10), (10, 40), (200, 200)):
        image[y:y + 8, x:x + 8] = (0, 0, 255)  # blue squares (class 2), 16 um^2 each at 1 um/px
    image[240:242, 20:22] = (0, 0, 255)  # a speck: 1 um^2
    slide = Slide.from_array(image, mpp=0.5, name="bounded", bounds_offset=(1000, 2000))
    result = predict_slide(PixelModel(), slide, tmp_path, target_mpp=1.0, window=32, chunk=64, tissue=False)
    return slide, result.path


def test_geojson_export_options_and_the_bounds_offset_frame(tmp_path, predicted):
    slide, store = predicted
    labels = np.asarray(LabelOutput(store).levels[0][:])
    path = export_geojson(store, tmp_path / "regions.geojson", level=0, per_region=True, object_type="detection",
                          min_area_um2=4.0)
    features = json.loads(path.read_text())["features"]
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    assert {f["geometry"]["type"] for f in features} == {"Polygon"}
    by_class: dict[str, list] = {}
    for f in features:
        by_class.setdefault(f["properties"]["classification"]["name"], []).append(f)
    assert len(by_class["class_2"]) == 3  # the 1 um^2 speck is below the minimum area
    for square in by_class["class_2"]:  # our measurement, and QuPath's own area of the outline, in µm^2
        assert square["properties"]["measurements"] == {"pfmseg: area µm^2": pytest.approx(16.0)}
        assert polygon_area([np.asarray(r) for r in square["geometry"]["coordinates"]]) * 0.5**2 == 16.0
    [ring] = by_class["class_1"]
    assert len(ring["geometry"]["coordinates"]) == 2  # outline + hole
    assert ring["properties"]["measurements"]["pfmseg: area µm^2"] == pytest.approx(64 * 64 / 4 - 32 * 32 / 4)
    outline = np.array(ring["geometry"]["coordinates"][0])
    # QuPath crops formats with bounds to them: our slide's frame, no offset
    assert outline[:, 0].min() == 96 and outline[:, 0].max() == 160 and outline[:, 1].min() == 64

    # back in: the exported objects rasterise to the prediction on the slide (speck aside)
    found = read_geojson(path)
    values = [int(f.class_name[-1]) + 1 for f in found.features]
    back = np.asarray(PolygonLabels([f.geometry for f in found.features], values, labels.shape, 2.0))
    expected = labels.copy()
    expected[120, 10] = 0  # the speck (2x2 level-0 px = 1 output px at 1 um/px)
    assert np.array_equal(back, expected)

    # the file's frame adds the bounds offset, and reading it back in that frame removes it
    whole = export_geojson(store, tmp_path / "file.geojson", level=0, frame="file", min_area=1)
    classes = {f["properties"]["classification"]["name"]: f for f in json.loads(whole.read_text())["features"]}
    ring = np.array(classes["class_1"]["geometry"]["coordinates"][0][0])
    assert ring[:, 0].min() == 1096 and ring[:, 1].min() == 2064
    assert classes["class_1"]["properties"]["objectType"] == "annotation"
    assert classes["class_2"]["properties"]["measurements"] == {"pfmseg: area µm^2": pytest.approx(49.0),
                                                                "pfmseg: regions": 4.0}
    again = read_geojson(whole, frame="file", bounds_offset=slide.bounds_offset)
    assert again.features[1].geometry.bounds[:2] == (96.0, 64.0)

    # the measurements of the same prediction agree with its exported objects
    rows = {row["class"]: row for row in measure_output(store)}
    assert rows["class_2"]["regions"] == 4 and rows["class_2"]["area_um2"] == pytest.approx(49.0)
    assert rows["class_1"]["regions"] == 1 and rows["class_0"]["regions"] == 2  # outside and inside the ring
    assert sum(row["share_of_tissue"] for row in rows.values()) == pytest.approx(1.0)
