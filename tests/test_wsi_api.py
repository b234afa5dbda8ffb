"""Whole-slide inference APIs viewers need: regions, priority order, live pyramids, colours, reuse checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.inference import LabelOutput, export_geojson, iter_predict_slide, predict_slide, write_labels
from pfmseg_engine.labelstore.pyramid import DOWNSAMPLERS
from pfmseg_engine.slides import Slide
from test_wsi_support import PixelModel, decided, random_image


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def levels(path) -> list[np.ndarray]:
    return [np.asarray(a[:]) for a in LabelOutput(path).levels]


def test_region_covers_only_the_region_and_records_its_offset(tmp_path):
    image = random_image(256, 320, seed=7)
    slide = Slide.from_array(image, mpp=0.5, name="r", bounds_offset=(1000, 2000))
    whole = predict_slide(PixelModel(), slide, tmp_path / "whole", target_mpp=1.0, window=32, overlap=0.0,
                          blend="constant", chunk=64, tissue=False)
    region = predict_slide(PixelModel(), slide, tmp_path / "part", region=(96, 64, 100, 70), target_mpp=1.0,
                           window=32, overlap=0.0, blend="constant", chunk=64, tissue=False)
    out = LabelOutput(region.path)
    # (x, y, w, h) = (96, 64, 100, 70) level-0 px at 2 px per output px -> output rows 32..67, cols 48..98
    assert region.shape == (35, 50) and out.levels[0].shape == (35, 50)
    assert out.region_offset == (64.0, 96.0) and region.name == "r_x96_y64_100x70"
    shift = out.multiscales["datasets"][0]["coordinateTransformations"][1]["translation"]
    assert shift == pytest.approx([(64 + 0.5) * 0.5, (96 + 0.5) * 0.5])  # micrometres, pixel centres
    # PixelModel is per pixel, so the region equals the same pixels of the whole slide's prediction
    np.testing.assert_array_equal(levels(region.path)[0], levels(whole.path)[0][32:67, 48:98])
    features = json.loads(export_geojson(region.path, level=0, frame="file").read_text())["features"]
    xs = np.concatenate([np.array(ring)[:, 0] for f in features for poly in f["geometry"]["coordinates"]
                         for ring in poly])
    assert xs.min() == pytest.approx(1000 + 96) and xs.max() == pytest.approx(1000 + 96 + 100)
    with pytest.raises(ConfigError, match="outside"):
        predict_slide(PixelModel(), slide, tmp_path / "x", region=(5000, 0, 10, 10), window=32, tissue=False)


def test_priority_order_is_byte_identical_and_view_first(tmp_path):
    image = random_image(256, 256, seed=2)
    options = {"window": 32, "overlap": 0.5, "chunk": 64, "tissue": False, "probabilities": True}
    raster = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="p"), tmp_path / "a", **options)
    seen = []
    prio = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="p"), tmp_path / "b",
                         priority_box=(150, 150, 60, 60), callback=lambda c: seen.append(c.index), **options)
    assert seen[0] == (2, 2) and set(seen[:4]) == {(2, 2), (2, 3), (3, 2), (3, 3)}  # the box's chunks first
    assert seen != sorted(seen) and sorted(seen) == sorted(set(seen)) and len(seen) == 16
    assert prio.windows_run == raster.windows_run  # nothing computed twice
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def test_interrupted_priority_run_resumes_identically_and_reports_finished_chunks(tmp_path):
    image = random_image(256, 256, seed=3)
    options = {"window": 32, "overlap": 0.5, "chunk": 64, "tissue": False}
    predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="q"), tmp_path / "a", **options)
    generator = iter_predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="q"), tmp_path / "b",
                                   priority_box=(200, 200, 20, 20), **{**_config(options)})
    first = [next(generator) for _ in range(5)]
    generator.close()
    assert all(c.computed for c in first)
    chunks = []
    resumed = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="q"), tmp_path / "b",
                            callback=chunks.append, **options)
    old = [c for c in chunks if not c.computed]
    assert [c.index for c in old] == sorted(c.index for c in first)
    assert all(np.array_equal(o.labels, f.labels) for o, f in zip(old, sorted(first, key=lambda c: c.index),
                                                                 strict=True))
    assert resumed.resumed and resumed.chunks_run == 16 - 5 and chunks[-1].done == 16
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


def _config(options):
    from pfmseg_engine.inference import SlideInferenceConfig

    return {"config": SlideInferenceConfig(**options)}


def test_coarse_levels_are_live_while_streaming(tmp_path):
    image = random_image(300, 266, seed=4)
    generator = iter_predict_slide(PixelModel(), Slide.from_array(image, mpp=0.5, name="s"), tmp_path,
                                   **_config({"window": 32, "chunk": 64, "tissue": False}))
    chunk = next(generator)
    import zarr

    root = zarr.open_group(str(chunk.store), mode="r")
    level0, level1 = np.asarray(root["0"][:]), np.asarray(root["1"][:])
    assert level1[:32, :32].any() and not level1[40:].any()  # the first chunk shows zoomed out too
    np.testing.assert_array_equal(level1[:32, :32], DOWNSAMPLERS["mode"](level0[:64, :64]))
    generator.close()


def test_class_colours_and_distinct_default_palette(tmp_path):
    from pfmseg_engine.colors import class_palette

    palette = class_palette(3).astype(int)
    assert np.abs(palette[0] - palette[1]).sum() > 150  # classes 1 and 2 clearly distinct
    image = random_image(64, 64)
    result = predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0), tmp_path, window=32, tissue=False,
                           class_colors={"class_1": [1, 2, 3]})
    colours = LabelOutput(result.path).colours()
    assert colours[2] == [1, 2, 3, 255] and colours[1] == [*palette[0], 255] and colours[0][3] == 0
    assert LabelOutput(result.path).pfmseg["class_colors"][1] == [1, 2, 3]


def test_finished_output_of_another_model_is_not_reused(tmp_path):
    image = random_image(64, 64)
    options = {"window": 32, "tissue": False}
    first = levels(predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="m"), tmp_path,
                                 **options).path)[0]
    assert predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="m"), tmp_path,
                         batch_size=7, **options).chunks_run == 0  # runtime-only settings: reused
    other = PixelModel()
    other.scale.data.fill_(-1.0)  # different weights, different answers
    with pytest.raises(ConfigError, match=r"model weights.*recompute it over the old one \(overwrite\)"):
        predict_slide(other, Slide.from_array(image, mpp=1.0, name="m"), tmp_path, **options)
    with pytest.raises(ConfigError, match="overlap"):
        predict_slide(PixelModel(), Slide.from_array(image, mpp=1.0, name="m"), tmp_path, overlap=0.5, **options)
    redo = predict_slide(other, Slide.from_array(image, mpp=1.0, name="m"), tmp_path, overwrite=True, **options)
    ok = decided(image)
    assert redo.chunks_run == 1 and not np.array_equal(levels(redo.path)[0][ok], first[ok])


def test_write_labels_round_trip(tmp_path):
    labels = np.zeros((700, 500), np.uint8)
    labels[:300, :200] = 1
    labels[400:, 100:] = 2
    path = write_labels(tmp_path / "a.ome.zarr", labels, class_names=["tumour", "stroma"], mpp=1.0,
                        slide_mpp=0.5, class_colors=[[255, 0, 0], [0, 0, 255]], offset=(10, 20), chunk=256)
    out = LabelOutput(path)
    got = levels(path)
    np.testing.assert_array_equal(got[0], labels)
    np.testing.assert_array_equal(got[1], DOWNSAMPLERS["mode"](labels))
    assert out.class_names == ["tumour", "stroma"] and out.colours()[1] == [255, 0, 0, 255]
    assert out.downsample == 2.0 and out.region_offset == (10.0, 20.0) and out.mpp == 1.0
    with pytest.raises(Exception, match=r"0\.\.255"):
        write_labels(tmp_path / "b.ome.zarr", labels.astype(np.int32) * 200, class_names=["a"], mpp=1.0)


def test_runner_uses_shared_device_names():
    from pfmseg_engine.inference.runner import resolve_device

    assert resolve_device(None, PixelModel()).type == "cpu" and resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        resolve_device("gpu-please")


def test_inference_and_slides_import_without_torchvision():
    code = ("import sys, pfmseg_engine.inference, pfmseg_engine.slides, pfmseg_engine.inference.export_tiff, "
            "pfmseg_engine.inference.geojson_export; "
            "print(sorted(m for m in ('torchvision', 'timm', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_exporters_stay_functions_after_their_modules_are_imported():
    """No submodule shares a name with the function the package exports (importing it would shadow it)."""
    import importlib
    import inspect

    from pfmseg_engine import inference

    for name in inference.__all__:
        try:
            importlib.import_module(f"pfmseg_engine.inference.{name}")
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"pfmseg_engine.inference.{name} is a module and an export")
    importlib.import_module("pfmseg_engine.inference.geojson_export")
    assert inspect.isfunction(inference.export_geojson) and inspect.isfunction(inference.export_ome_tiff)
