"""The OME-TIFF export as QuPath's Bio-Formats server reads it: pyramid, calibration, class names, offset.

Read back with tifffile: the levels are SubIFDs of one series (what Bio-Formats reports as
resolutions), tiled; the OME-XML carries the pixel size in µm, the class names (channel name,
description, MapAnnotation) and where the region lies on the slide (Plane position, MapAnnotation).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pfmseg_engine.inference import LabelOutput, export_ome_tiff
from pfmseg_engine.inference.export_tiff import CLASSES_NS, PLACEMENT_NS
from pfmseg_engine.labelstore.omezarr import write_labels

CLASSES = ["tumour", "stroma", "necrosis"]
SLIDE_MPP, MPP = 0.25, 0.5  # 2 slide level-0 pixels per label pixel
OFFSET_YX = (640, 1200)  # slide level-0 pixel of the labels' pixel (0, 0)
CHUNK = 128


def as_list(value):
    return value if isinstance(value, list) else [value]


@pytest.fixture(params=["0.4", "0.5"])
def store(request, tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, len(CLASSES) + 1, (300, 520), dtype=np.uint8)  # 3 levels at chunk 128
    labels[:40, :60] = 0  # a corner with no prediction
    path = write_labels(tmp_path / "region.ome.zarr", labels, class_names=CLASSES, mpp=MPP, slide_mpp=SLIDE_MPP,
                        offset=OFFSET_YX, chunk=CHUNK, ngff=request.param)
    return path


def ome(tif: tifffile.TiffFile) -> dict:
    return tifffile.xml2dict(tif.ome_metadata)["OME"]


def test_pyramid_levels_tiles_and_pixels(store):
    output = LabelOutput(store)
    tiff = export_ome_tiff(store)
    assert tiff.name == "region.labels.ome.tif"
    with tifffile.TiffFile(tiff) as tif:
        assert tif.is_ome and len(tif.series) == 1
        series = tif.series[0]
        assert len(series.levels) == len(output.levels) == 3
        assert len(tif.pages[0].subifds) == 2  # sub-resolutions stored as SubIFDs of the first page
        for k, (level, array) in enumerate(zip(series.levels, output.levels, strict=True)):
            page = level.keyframe
            assert level.shape == array.shape and page.dtype == np.uint8
            assert (page.tilelength, page.tilewidth) == (CHUNK, CHUNK)
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            assert page.resolution == pytest.approx((1e4 / (MPP * 2**k),) * 2)
            if k <= 1:
                np.testing.assert_array_equal(level.asarray(), np.asarray(array[:]))


def test_calibration_class_names_and_offset(store):
    with tifffile.TiffFile(export_ome_tiff(store)) as tif:
        image = ome(tif)["Image"]
    pixels = image["Pixels"]
    assert pixels["PhysicalSizeX"] == pytest.approx(MPP) and pixels["PhysicalSizeY"] == pytest.approx(MPP)
    assert pixels["PhysicalSizeXUnit"] == pixels["PhysicalSizeYUnit"] == "µm"
    legend = "0=no prediction; 1=tumour; 2=stroma; 3=necrosis"
    assert pixels["Channel"]["Name"] == f"labels: {legend}"  # what QuPath shows as the channel name
    assert image["Description"] == f"pfmseg labels: {legend}" and image["Name"] == "region"
    plane = pixels["Plane"]  # corner of pixel (0, 0) on the slide, in µm
    assert plane["PositionX"] == pytest.approx(OFFSET_YX[1] * SLIDE_MPP)
    assert plane["PositionY"] == pytest.approx(OFFSET_YX[0] * SLIDE_MPP)
    assert plane["PositionXUnit"] == plane["PositionYUnit"] == "µm"


def test_map_annotations_name_classes_and_place_the_region(store, tmp_path):
    with tifffile.TiffFile(export_ome_tiff(store, tmp_path / "out" / "pred.ome.tif")) as tif:
        annotations = as_list(ome(tif)["StructuredAnnotations"]["MapAnnotation"])
    by_ns = {a["Namespace"]: {m["K"]: m["value"] for m in as_list(a["Value"]["M"])} for a in annotations}
    assert {int(k): v for k, v in by_ns[CLASSES_NS].items()} == {0: "no prediction", 1: "tumour", 2: "stroma",
                                                                   3: "necrosis"}
    place = {k: v for k, v in by_ns[PLACEMENT_NS].items() if k != "frame"}
    assert {k: float(v) for k, v in place.items()} == {"offset_x": OFFSET_YX[1], "offset_y": OFFSET_YX[0],
                                                       "downsample": MPP / SLIDE_MPP, "slide_mpp": SLIDE_MPP}


def test_whole_slide_export_has_zero_offset(tmp_path):
    labels = np.ones((64, 48), dtype=np.uint8)
    store = write_labels(tmp_path / "whole.ome.zarr", labels, class_names=["a"], mpp=1.0, chunk=32)
    with tifffile.TiffFile(export_ome_tiff(store)) as tif:
        pixels = ome(tif)["Image"]["Pixels"]
        assert pixels["Plane"]["PositionX"] == 0 and pixels["Plane"]["PositionY"] == 0
        assert pixels["Channel"]["Name"] == "labels: 0=no prediction; 1=a"
        np.testing.assert_array_equal(tif.series[0].asarray(), labels)
