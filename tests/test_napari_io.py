"""napari plugin I/O: manifest, reader (real slides, demo sample, engine outputs), writers."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

pytest.importorskip("napari")

from test_napari_workflow import own_output_folder  # noqa: F401  (autouse: outputs per test)

pytest.importorskip("npe2")

from napari_pfmseg._reader import napari_get_reader
from testdata import SLIDES

pytestmark = pytest.mark.gui




def test_manifest_validates_and_imports():
    """``npe2 validate pfmseg --imports``: the installed distribution's manifest and every python_name."""
    from npe2 import PluginManifest

    manifest = PluginManifest._from_package_or_name("pfmseg")
    manifest.validate_imports()
    contributions = manifest.contributions
    widgets = {w.display_name for w in contributions.widgets}
    assert {"Model", "Annotate", "Train", "Predict", "Compare models"} <= widgets
    patterns = set(contributions.readers[0].filename_patterns)
    assert {"*.svs", "*.ndpi", "*.tif", "*.tiff", "*.ome.tif", "*.ome.tiff", "*.zarr"} <= patterns
    assert {tuple(w.layer_types) for w in contributions.writers} == {("labels",)}
    assert "napari/layers/segment" in contributions.menus
    assert [s.key for s in contributions.sample_data] == ["demo_slide"]


def test_reader_declines_other_files(tmp_path):
    import tifffile

    for name in ("image.png", "slide.svs"):
        (tmp_path / name).write_bytes(b"")
    assert napari_get_reader(str(tmp_path / "image.png")) is None  # napari's own reader opens plain images
    assert napari_get_reader(str(tmp_path / "slide.svs")) is not None
    assert napari_get_reader(str(tmp_path / "missing.svs")) is None  # the engine opens only what exists
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((4, 16, 16), np.uint16))  # not a slide: other readers
    assert napari_get_reader(str(tmp_path / "stack.tif")) is None
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((16, 16, 3), np.uint8))
    assert napari_get_reader(str(tmp_path / "rgb.tif")) is not None


def test_reader_claims_only_ome_zarr_that_pfmseg_wrote(tmp_path):
    """Other OME-Zarr images and label images are left to napari-ome-zarr; pfmseg stores are ours."""
    import zarr

    from pfmseg_engine.labelstore.omezarr import write_labels

    image = zarr.open_group(str(tmp_path / "image.ome.zarr"), mode="w", zarr_format=2)
    image.create_array("0", shape=(3, 32, 32), dtype="uint8")
    image.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}],
                                   "axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}]}]
    labels = zarr.open_group(str(tmp_path / "labels.ome.zarr"), mode="w", zarr_format=2)
    labels.create_array("0", shape=(32, 32), dtype="uint8")
    labels.attrs.update({"multiscales": image.attrs["multiscales"], "image-label": {"version": "0.4"}})
    ours = write_labels(tmp_path / "ours.ome.zarr", np.ones((32, 32), np.uint8), class_names=["tumour"], mpp=1.0)
    assert napari_get_reader(str(tmp_path / "image.ome.zarr")) is None
    assert napari_get_reader(str(tmp_path / "labels.ome.zarr")) is None
    assert napari_get_reader(str(ours)) is not None
    assert napari_get_reader([str(ours), str(tmp_path / "labels.ome.zarr")]) is None


@pytest.mark.parametrize(("name", "levels", "mpp"), [
    ("CMU-1-Small-Region.svs", 1, 0.499),
    ("TCGA-CR-7395-01A-01-TS1.svs", 2, None),
])
def test_real_slides_open_lazily(make_napari_viewer, name, levels, mpp):
    import tiffslide

    path = SLIDES / name
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin="pfmseg")
    assert layer.rgb
    arrays = list(layer.data) if layer.multiscale else [layer.data]
    assert len(arrays) == levels and all(isinstance(a, da.Array) for a in arrays)
    meta = layer.metadata["pfmseg"]
    assert meta["path"] == str(path)
    if mpp:
        assert layer.scale[-1] == pytest.approx(mpp, rel=1e-3) and str(layer.units[-1]) == "micrometer"
    else:  # no calibration in the file: pixels until the user gives one
        assert meta["mpp"] is None and tuple(layer.scale) == (1.0, 1.0)
    with tiffslide.TiffSlide(path) as slide:
        expected = np.asarray(slide.read_region((64, 32), 0, (48, 40)).convert("RGB"))
    assert np.array_equal(np.asarray(arrays[0][32:72, 64:112]), expected)


def test_demo_sample_is_a_pyramidal_tiff(make_napari_viewer):
    from pfmseg_engine.demo import DEMO_MPP, demo_image, demo_slide_path

    viewer = make_napari_viewer()
    [layer] = viewer.open_sample("pfmseg", "demo_slide")
    assert layer.multiscale and [a.shape[:2] for a in layer.data] == [(512, 512), (256, 256), (128, 128)]
    assert layer.scale[-1] == pytest.approx(DEMO_MPP)
    assert demo_slide_path().suffix == ".tif"
    assert np.array_equal(np.asarray(layer.data[0]), demo_image())


def _annotation(viewer):
    from napari_pfmseg._annotations import new_annotation_layer
    from napari_pfmseg._session import session_for

    [image] = viewer.open_sample("pfmseg", "demo_slide")
    slide = session_for(viewer).slide_for(image)
    data, kwargs = new_annotation_layer(image, slide, 1.0, ["gland", "stroma", "lumen"],
                                        [[200, 0, 0], [0, 200, 0], [0, 0, 200]])
    data[10:40, 20:60] = 1
    data[100:140, 100:130] = 3
    return image, viewer.add_labels(data, **kwargs)


def test_labels_round_trip_through_ome_zarr(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, labels = _annotation(viewer)
    assert labels.data.shape == (256, 256) and labels.scale[-1] == pytest.approx(1.0)
    assert labels.translate[-1] == pytest.approx(0.25)  # pixel centre of a 2x2 block of 0.5 um pixels
    [written] = labels.save(str(tmp_path / "annotations.ome.zarr"), plugin="pfmseg")
    [reopened] = viewer.open(written, plugin="pfmseg")
    assert reopened.__class__.__name__ == "Labels"
    base = reopened.data[0] if reopened.multiscale else reopened.data
    assert np.array_equal(np.asarray(base), labels.data)
    assert reopened.scale[-1] == pytest.approx(labels.scale[-1])
    assert reopened.translate[-1] == pytest.approx(labels.translate[-1])
    assert reopened.metadata["pfmseg"]["class_names"] == ["gland", "stroma", "lumen"]
    assert np.allclose(reopened.colormap.map(3)[:3], [0, 0, 200 / 255], atol=1e-3)


def test_labels_to_pyramidal_tiff(make_napari_viewer, tmp_path):
    import tifffile

    viewer = make_napari_viewer()
    _, labels = _annotation(viewer)
    [written] = labels.save(str(tmp_path / "annotations.ome.tif"), plugin="pfmseg")
    with tifffile.TiffFile(written) as tif:
        series = tif.series[0]
        assert np.array_equal(series.levels[0].asarray(), labels.data)
        assert tif.pages[0].is_tiled


def test_engine_output_opens_as_labels(make_napari_viewer, tmp_path):
    """A store written by the engine (here its labels writer) opens as coloured multiscale labels."""
    from pfmseg_engine.inference import write_labels

    labels = np.zeros((1100, 900), np.uint8)
    labels[:600, :500] = 1
    labels[700:, 300:] = 2
    store = write_labels(tmp_path / "slide.ome.zarr", labels, class_names=["tumour", "stroma"],
                         class_colors=[[255, 0, 0], [0, 0, 255]], mpp=1.0, slide_mpp=0.5, chunk=256)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(store), plugin="pfmseg")
    assert layer.__class__.__name__ == "Labels" and layer.multiscale
    assert np.array_equal(np.asarray(layer.data[0]), labels)
    assert layer.scale[-1] == pytest.approx(1.0) and layer.translate[-1] == pytest.approx(0.25)
    assert np.allclose(layer.colormap.map(1)[:3], [1, 0, 0])
    assert list(layer.features["class"]) == ["no prediction", "tumour", "stroma"]


def test_streamed_pyramid_redraws_every_level(make_napari_viewer, qtbot, tmp_path):
    """Chunks the engine writes while a prediction runs show up zoomed in and zoomed out (no stale caches)."""
    import zarr

    from napari_pfmseg._layers import label_colormap
    from napari_pfmseg._stream import refresh_layer
    from pfmseg_engine.inference import LabelStore

    viewer = make_napari_viewer(show=True)
    store = LabelStore(tmp_path / "s.ome.zarr", shape=(1024, 1024), chunk=256, num_classes=1, probabilities=False)
    root = zarr.open_group(str(store.path), mode="r")  # what the plugin shows: the store, read-only
    levels = [root[str(i)] for i in range(len(store.levels))]
    layer = viewer.add_labels(levels, multiscale=True, colormap=label_colormap({1: [255, 0, 0]}))
    viewer.camera.zoom = 0.05  # the coarsest level is on screen (napari keeps it cached in memory)
    qtbot.waitUntil(lambda: layer.data_level == len(levels) - 1, timeout=120_000)  # once the canvas has drawn
    assert layer.data_level == 2
    empty = layer.thumbnail.copy()
    store.write((0, 256, 0, 256), np.ones((256, 256), np.uint8))
    refresh_layer(layer)
    assert np.asarray(layer._slice.image.raw).any()  # what the canvas draws now
    assert not np.array_equal(layer.thumbnail, empty)
    assert np.asarray(layer.data[2])[:64, :64].all() and not np.asarray(layer.data[2])[64:].any()
    viewer.camera.zoom = 4.0  # and zoomed in, level 0
    viewer.camera.center = (128, 128)
    qtbot.waitUntil(lambda: layer.data_level == 0, timeout=120_000)
    assert np.asarray(layer._slice.image.raw).any()
    viewer.layers.clear()


def test_reader_opens_openslide_only_formats(make_napari_viewer, tmp_path):
    """A Hamamatsu VMS (OpenSlide reads it, tiffslide does not) opens in the viewer like any slide."""
    from test_slide_backends import _write_vms

    for suffix in (".mrxs", ".scn", ".bif", ".dcm"):
        (tmp_path / f"slide{suffix}").write_bytes(b"")
    assert all(napari_get_reader(str(tmp_path / f"slide{s}")) is not None for s in (".mrxs", ".scn", ".bif", ".dcm"))
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "level0.dcm").write_bytes(b"")
    assert napari_get_reader(str(tmp_path / "dicom")) is not None  # a DICOM WSI series folder
    vms, image = _write_vms(tmp_path)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(vms), plugin="pfmseg")
    arrays = list(layer.data) if layer.multiscale else [layer.data]
    np.testing.assert_array_equal(np.asarray(arrays[0]), image)
    assert layer.scale[-1] == pytest.approx(0.5)
