"""Whole-slide prediction: exact stitching, tissue skipping, OME-Zarr output, resume, errors, exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pfmseg_engine.errors import SlideError
from pfmseg_engine.inference import (
    LabelOutput,
    export_geojson,
    export_ome_tiff,
    iter_predict_slide,
    predict_image,
    predict_slide,
    window_starts,
)
from pfmseg_engine.inference.window import stride_for
from pfmseg_engine.slides import Slide
from test_wsi_support import PixelModel, decided, pixel_labels, random_image
from testdata import SLIDES


def labels_of(result) -> np.ndarray:
    return np.asarray(LabelOutput(result.path).levels[0][:])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("window", "overlap", "blend", "chunk"),
    [(16, 0.0, "constant", 32), (32, 0.25, "gaussian", 64), (32, 0.5, "constant", 48),
     (48, 0.75, "gaussian", 64), (64, 0.5, "gaussian", 64)],
)
def test_slide_stitching_equals_direct(tmp_path, window, overlap, blend, chunk):
    image = random_image(150, 230, seed=window)  # 150 and 230 are multiples of nothing used here
    slide = Slide.from_array(image, mpp=0.5, name="rand")
    result = predict_slide(PixelModel(), slide, tmp_path, window=window, overlap=overlap, blend=blend,
                           chunk=chunk, tissue=False, probabilities=True)
    labels = labels_of(result)
    ok = decided(image)
    assert labels.shape == image.shape[:2] and labels.min() >= 1
    np.testing.assert_array_equal(labels[ok], pixel_labels(image)[ok])
    direct = predict_image(PixelModel(), image, window=window, overlap=overlap, blend=blend)
    np.testing.assert_array_equal(labels[ok], direct.argmax(0)[ok] + 1)
    probs = np.asarray(zarr.open_group(str(result.path), mode="r")["probabilities/0"][:])
    assert np.abs(probs.astype(int) - np.round(direct * 255).astype(int)).max() <= 1
    stride = stride_for(window, overlap)
    n_windows = len(window_starts(150, window, stride)) * len(window_starts(230, window, stride))
    assert result.windows_run == n_windows  # every window computed exactly once, whatever the chunking


def test_slide_smaller_than_window(tmp_path):
    image = random_image(20, 37, seed=3)
    result = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0), tmp_path, window=64, tissue=False)
    ok = decided(image)
    np.testing.assert_array_equal(labels_of(result)[ok], pixel_labels(image)[ok])


def test_chunking_does_not_change_output(tmp_path):
    image = random_image(200, 170, seed=5)
    a = labels_of(predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0), tmp_path / "a", window=32,
                                chunk=32, tissue=False))
    b = labels_of(predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0), tmp_path / "b", window=32,
                                chunk=96, tissue=False))
    ok = decided(image)
    np.testing.assert_array_equal(a[ok], b[ok])


class SpyArray:
    """An (H, W, 3) array that records every region read from it."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        self.reads.append((key[0].start, key[0].stop, key[1].start, key[1].stop))
        return self.array[key]


def blob_slide(height=1024, width=1024, blob=(100, 300, 600, 900), noise=True):
    """White slide at 1 um/px with one tissue-coloured, textured rectangle; level 1 at 8 um/px."""
    image = np.full((height, width, 3), 240, np.uint8)
    y0, y1, x0, x1 = blob
    tissue = random_image(y1 - y0, x1 - x0, seed=9) // 4 + np.array([150, 60, 130], np.uint8)
    image[y0:y1, x0:x1] = tissue if noise else (190, 80, 170)
    spy = SpyArray(image)
    small = image.reshape(height // 8, 8, width // 8, 8, 3).mean((1, 3)).astype(np.uint8)
    return Slide.from_array([spy, small], mpp=1.0, name="blob", downsamples=[1.0, 8.0]), spy, image


def test_tissue_skipping(tmp_path):
    slide, spy, image = blob_slide()
    model = PixelModel()
    result = predict_slide(model, slide, tmp_path, window=64, overlap=0.5, chunk=128, tissue=True)
    labels = labels_of(result)
    assert 0.03 < result.tissue_fraction < 0.1 and result.qc_path.is_file()
    total = len(window_starts(1024, 64, 32)) ** 2
    assert 0 < result.windows_run < total / 5
    assert result.chunks_run < 64 / 3  # most chunks neither read nor computed
    # no read outside the tissue mask dilated by the halo plus one window
    for y0, y1, x0, x1 in spy.reads:
        assert y1 > 100 - 200 and y0 < 300 + 200 and x1 > 600 - 200 and x0 < 900 + 200
    assert labels[700:, :300].max() == 0
    on_blob = labels[100:300, 600:900] > 0
    for rows, cols in ((slice(0, 6), slice(0, 6)), (slice(0, 6), slice(-6, None)), (slice(-6, None), slice(0, 6)),
                       (slice(-6, None), slice(-6, None))):
        on_blob[rows, cols] = True  # the 8-µm tissue mask rounds the blob's square corners
    assert on_blob.all()
    full = labels_of(predict_slide(PixelModel(), blob_slide()[0], tmp_path / "full", window=64, overlap=0.5,
                                   chunk=128, tissue=False))
    inside = np.zeros(labels.shape, bool)
    inside[100:300, 600:900] = True
    inside &= decided(image)
    np.testing.assert_array_equal(labels[inside], full[inside])  # skipping changes nothing on tissue


def test_glass_inside_windows_that_touch_tissue_stays_unlabelled(tmp_path):
    """Windows touching tissue are predicted whole; only pixels within one tissue-mask pixel (8 µm) of tissue
    keep their class, so no band of one class runs along the tissue's edge and measurements count tissue only."""
    settings = dict(window=64, overlap=0.5, chunk=128, tissue=True)
    clipped = labels_of(predict_slide(PixelModel(), blob_slide()[0], tmp_path / "clip", **settings))
    whole = labels_of(predict_slide(PixelModel(), blob_slide()[0], tmp_path / "whole", clip_to_tissue=False,
                                    **settings))
    band = (slice(100, 300), slice(600 - 40, 600 - 12))  # glass left of the blob, inside windows on tissue
    assert (whole[band] > 0).all() and clipped[band].max() == 0
    margin = (slice(120, 280), slice(600 - 7, 600))  # glass within one mask pixel of the tissue edge
    assert (clipped[margin] > 0).all()
    blob = (slice(106, 294), slice(606, 894))
    np.testing.assert_array_equal(clipped[blob], whole[blob])
    assert (clipped > 0).sum() < (whole > 0).sum()


def test_real_slide_writes_valid_ome_zarr(tmp_path):
    seen = []
    result = predict_slide(PixelModel(), SLIDES / "CMU-1-Small-Region.svs", tmp_path, window=256, chunk=512,
                           batch_size=8, callback=seen.append)
    assert result.path == tmp_path / "CMU-1-Small-Region.ome.zarr" and result.path.is_dir()
    assert not (tmp_path / "CMU-1-Small-Region.ome.zarr.partial").exists()
    assert not (result.path / ".pfmseg_work").exists()
    assert len(seen) == result.chunks_total and seen[-1].done == seen[-1].total
    root = zarr.open_group(str(result.path), mode="r")
    attrs = dict(root.attrs)
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" for a in ms["axes"])
    scales = [d["coordinateTransformations"][0]["scale"][0] for d in ms["datasets"]]
    assert scales[0] == pytest.approx(0.499) and scales[1] == pytest.approx(2 * 0.499)
    shapes = [root[d["path"]].shape for d in ms["datasets"]]
    assert shapes[0] == (2967, 2220) and shapes[1] == (1484, 1110) and len(shapes) >= 3
    label = attrs["image-label"]
    assert label["version"] == "0.4" and len(label["colors"]) == 4
    assert [p["class"] for p in label["properties"]][1:] == ["class_0", "class_1", "class_2"]
    meta = attrs["pfmseg"]
    assert meta["resolution_plan"]["level"] == 0 and meta["tissue"]["fraction"] > 0.2
    level0 = np.asarray(root["0"][:])
    assert set(np.unique(level0)) <= {0, 1, 2, 3} and (level0 > 0).mean() > 0.2
    for chunk in seen[:3]:
        y0, y1, x0, x1 = chunk.box
        np.testing.assert_array_equal(level0[y0:y1, x0:x1], chunk.labels)
    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    layers = napari_ome_zarr.napari_get_reader(str(result.path))(str(result.path))
    assert layers and layers[0][2] == "labels"


def test_slide_without_mpp_and_resolution_plan(tmp_path):
    path = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(SlideError, match=r"mpp=0\.5"):
        predict_slide(PixelModel(), path, tmp_path, window=128)
    assert not any(tmp_path.iterdir())
    chunks = list(_drain(iter_predict_slide(PixelModel(), path, tmp_path, mpp=0.5,
                                            config=_config(target_mpp=2.0, window=128, chunk=256))))
    meta = LabelOutput(tmp_path / "TCGA-CR-7395-01A-01-TS1.ome.zarr").pfmseg
    plan = meta["resolution_plan"]
    assert plan["level"] == 1 and plan["factor"] == 2 and plan["downsample"] == pytest.approx(4.0, rel=1e-3)
    assert chunks and chunks[0].level0_box[1] == pytest.approx(chunks[0].box[1] * plan["downsample"])


def _config(**kw):
    from pfmseg_engine.inference import SlideInferenceConfig

    return SlideInferenceConfig(**kw)


def _drain(generator):
    yield from generator


class Stop(Exception):
    pass


def test_resume_after_interruption_is_byte_identical(tmp_path):
    options = {"window": 32, "overlap": 0.5, "chunk": 64, "probabilities": True}
    reference = predict_slide(PixelModel(), blob_slide(512, 768, (100, 400, 200, 600))[0], tmp_path / "a",
                              **options)
    count = []

    def interrupt(chunk):
        count.append(chunk)
        if len(count) == 4:
            raise Stop

    with pytest.raises(Stop):
        predict_slide(PixelModel(), blob_slide(512, 768, (100, 400, 200, 600))[0], tmp_path / "b",
                      callback=interrupt, **options)
    partial = tmp_path / "b" / "blob.ome.zarr.partial"
    assert partial.is_dir() and not (tmp_path / "b" / "blob.ome.zarr").exists()
    resumed = predict_slide(PixelModel(), blob_slide(512, 768, (100, 400, 200, 600))[0], tmp_path / "b",
                            **options)
    assert resumed.resumed and resumed.chunks_run == reference.chunks_total - 4
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    again = predict_slide(PixelModel(), blob_slide(512, 768, (100, 400, 200, 600))[0], tmp_path / "b",
                          **options)
    assert again.chunks_run == 0  # complete output is reused, not recomputed
    redo = predict_slide(PixelModel(), blob_slide(512, 768, (100, 400, 200, 600))[0], tmp_path / "b",
                         overwrite=True, **options)
    assert redo.chunks_run == reference.chunks_total and tree(tmp_path / "a") == tree(tmp_path / "b")


class FailingArray(SpyArray):
    def __getitem__(self, key):
        if key[0].stop > 300:
            raise SlideError("Reading region failed: corrupt JPEG tile")
        return super().__getitem__(key)


def test_corrupt_slide_leaves_no_complete_output(tmp_path):
    image = random_image(512, 512)
    slide = Slide.from_array(FailingArray(image), mpp=1.0, name="bad")
    with pytest.raises(SlideError, match="corrupt"):
        predict_slide(PixelModel(), slide, tmp_path, window=64, chunk=128, tissue=False)
    assert not (tmp_path / "bad.ome.zarr").exists()
    broken = tmp_path / "broken.svs"
    broken.write_bytes((SLIDES / "CMU-1-Small-Region.svs").read_bytes()[:300_000])
    out = tmp_path / "out"
    with pytest.raises(SlideError, match=r"broken\.svs"):
        predict_slide(PixelModel(), broken, out, window=64)
    assert not out.exists() or not any(out.iterdir())


def test_exports_and_coordinates(tmp_path):
    image = np.zeros((256, 256, 3), np.uint8)
    image[..., 0] = 255  # red -> class 0
    image[64:128, 96:160] = (0, 255, 0)  # green square -> class 1
    slide = Slide.from_array(image, mpp=0.5, name="square", bounds_offset=(1000, 2000))
    result = predict_slide(PixelModel(), slide, tmp_path, target_mpp=1.0, window=32, chunk=64, tissue=False)
    labels = labels_of(result)
    assert labels.shape == (128, 128) and (labels[32:64, 48:80] == 2).all() and labels[0, 0] == 1

    geojson = json.loads(export_geojson(result.path, level=0, frame="file").read_text())  # the file's frame
    assert geojson["type"] == "FeatureCollection"
    features = {f["properties"]["classification"]["name"]: f for f in geojson["features"]}
    assert set(features) == {"class_0", "class_1"}
    square = features["class_1"]["geometry"]
    assert square["type"] == "MultiPolygon" and len(square["coordinates"]) == 1
    ring = np.array(square["coordinates"][0][0])
    assert ring[:, 0].min() == 96 + 1000 and ring[:, 0].max() == 160 + 1000  # level-0 px + bounds offset
    assert ring[:, 1].min() == 64 + 2000 and ring[:, 1].max() == 128 + 2000
    assert len(features["class_0"]["geometry"]["coordinates"][0]) == 2  # outline + the square's hole
    assert features["class_1"]["properties"]["objectType"] == "annotation"

    tiff = export_ome_tiff(result.path)
    with tifffile.TiffFile(tiff) as tif:
        assert tif.is_ome
        series = tif.series[0]
        np.testing.assert_array_equal(series.levels[0].asarray(), labels)
        assert len(series.levels) == len(LabelOutput(result.path).levels)
        assert 'PhysicalSizeX="1.0"' in tif.ome_metadata


def test_ngff_05_output(tmp_path):
    image = random_image(100, 90)
    result = predict_slide(PixelModel(), Slide.from_array(image, mpp=0.5), tmp_path, window=32, tissue=False,
                           ngff="0.5")
    meta = json.loads((result.path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    assert "image-label" in meta["attributes"]["ome"]
    output = LabelOutput(result.path)
    assert output.mpp == 0.5 and output.class_names == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("method", ["mode", "nearest"])
def test_label_pyramid(tmp_path, method):
    from pfmseg_engine.labelstore.pyramid import DOWNSAMPLERS

    image = random_image(300, 266, seed=4)
    result = predict_slide(PixelModel(), Slide.from_array(image, mpp=0.5), tmp_path, window=32, chunk=64,
                           tissue=False, pyramid=method)
    output = LabelOutput(result.path)
    level0, level1 = (np.asarray(a[:]) for a in output.levels[:2])
    assert level1.shape == (150, 133) and output.multiscales["type"] == method
    np.testing.assert_array_equal(level1, DOWNSAMPLERS[method](level0))
    scale1 = output.multiscales["datasets"][1]["coordinateTransformations"]
    assert scale1[0]["scale"] == [1.0, 1.0] and scale1[1]["translation"] == [0.25, 0.25]


def test_the_cli_switches_clipping_to_tissue_off():
    from pfmseg_engine.cli import build_parser
    from pfmseg_engine.commands.infer import prediction_settings

    parser = build_parser()
    base = ["infer", "--checkpoint", "m.pt", "--slide", "s.svs", "--output_dir", "o"]
    assert prediction_settings(parser.parse_args(base)).clip_to_tissue is True
    assert prediction_settings(parser.parse_args([*base, "--no-clip_to_tissue"])).clip_to_tissue is False
