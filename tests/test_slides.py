"""Opening slides of every supported kind, resolution planning, tissue detection, clear errors."""

from __future__ import annotations

import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor

import dask.array as da
import numpy as np
import pytest
import zarr
from PIL import Image

from pfmseg_engine.errors import SlideError
from pfmseg_engine.slides import Slide, detect_tissue, open_slide, plan_resolution, save_tissue_qc
from pfmseg_engine.slides.resolution import ResampledReader
from testdata import CMU, TCGA


def test_open_svs_lazily():
    import tiffslide

    with open_slide(CMU) as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.dimensions == (2220, 2967) and slide.level_count == 1
        level = slide.levels[0]
        assert isinstance(level, da.Array) and level.shape == (2967, 2220, 3) and level.dtype == np.uint8
        assert level.chunksize[0] == 960  # a few native 240-px tiles per chunk, not one per tile
        region = level[1000:1100, 500:640].compute()
        reference = np.asarray(tiffslide.TiffSlide(CMU).read_region((500, 1000), 0, (140, 100)))[..., :3]
        np.testing.assert_array_equal(region, reference)
        np.testing.assert_array_equal(slide.read(0, 1000, 1100, 500, 640), reference)


def test_missing_mpp_needs_override():
    with pytest.raises(SlideError, match=r"no microns-per-pixel.*open_slide\(path, mpp=0\.5\)") as refused:
        open_slide(TCGA)
    assert refused.value.fix_with == ("mpp",) and "--" not in str(refused.value)  # the CLI adds its flag
    slide = open_slide(TCGA, mpp=0.5)
    assert slide.level_count == 2 and slide.level_mpps[1] == pytest.approx(1.0, rel=1e-3)
    assert open_slide(TCGA, require_mpp=False).mpp is None


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_readers_per_thread_and_picklable(backend):
    slide = open_slide(CMU, reader=backend)
    reader = slide.readers[0]
    boxes = [(y, y + 64, x, x + 80) for y in range(0, 2900, 300) for x in range(0, 2100, 350)]
    expected = [reader[y0:y1, x0:x1] for y0, y1, x0, x1 in boxes]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: reader[b[0]:b[1], b[2]:b[3]], boxes))
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    assert len(reader._handles._all) >= 2  # threads opened their own handles
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone[0:50, 0:50], expected[0][:50, :50])
    slide.close()
    np.testing.assert_array_equal(reader[0:10, 0:10], clone[0:10, 0:10])  # reopens after close


def test_tissue_found_on_real_slides(tmp_path):
    for path, mpp in ((CMU, None), (TCGA, 0.5)):
        slide = open_slide(path, mpp=mpp)
        tissue = detect_tissue(slide, halo_um=100)
        assert 0.15 < tissue.fraction < 0.9, (path.name, tissue.fraction)
        assert tissue.mpp == pytest.approx(8.0, rel=0.1)
        assert tissue.mask.sum() > tissue.tissue.sum()  # the halo dilates
        qc = save_tissue_qc(tissue, tmp_path / f"{path.stem}.png")
        assert Image.open(qc).size == tissue.mask.shape[::-1]


def _virtual(height, width, blob=None):
    """A white slide with an H&E-coloured rectangle (y0, y1, x0, x1)."""
    image = np.full((height, width, 3), 235, np.uint8)
    if blob:
        y0, y1, x0, x1 = blob
        image[y0:y1, x0:x1] = (180, 90, 160)
    return image


def test_tissue_blank_and_blob():
    assert detect_tissue(Slide.from_array(_virtual(2000, 2000), mpp=1.0)).fraction == 0.0
    tissue = detect_tissue(Slide.from_array(_virtual(4000, 4000, (800, 2400, 1600, 3200)), mpp=1.0))
    assert tissue.fraction == pytest.approx(0.16, abs=0.02)
    assert tissue.any_in(1000, 1100, 2000, 2100) and not tissue.any_in(3000, 3900, 100, 900)


def test_tissue_in_a_small_crop_is_not_erased_as_noise():
    """A 100 um object on a 512 um crop is far below the whole-slide noise floor (20,000 um^2)."""
    tissue = detect_tissue(Slide.from_array(_virtual(512, 512, (200, 300, 200, 300)), mpp=1.0))
    assert tissue.any_in(220, 280, 220, 280)
    assert tissue.fraction == pytest.approx(100 * 100 / 512**2, abs=0.03)


def test_resolution_plan():
    cmu = open_slide(CMU)
    assert plan_resolution(cmu).factor == 1 and plan_resolution(cmu, 0.5).level == 0  # within tolerance
    plan = plan_resolution(cmu, 1.0)
    assert plan.factor == 2 and plan.shape == (1483, 1110) and plan.mpp == pytest.approx(0.998)
    assert plan_resolution(cmu, 1.3).factor == pytest.approx(1.3 / 0.499)
    with pytest.raises(SlideError, match="never upsampled"):
        plan_resolution(cmu, 0.25)
    tcga = open_slide(TCGA, mpp=0.5)
    assert plan_resolution(tcga, 1.0).level == 1 and plan_resolution(tcga, 1.0).factor == 1
    plan = plan_resolution(tcga, 4.0)
    assert plan.level == 1 and plan.factor == 4 and plan.downsample == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize("factor", [2.0, 2.6])
def test_resampled_chunks_match_whole(factor):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    shape = (int(300 // factor), int(260 // factor))
    reader = ResampledReader(image, factor, shape)
    whole = reader[:, :]
    assert whole.shape == (*shape, 3)
    if factor == 2:
        np.testing.assert_array_equal(whole[0, 0], np.round(image[:2, :2].reshape(4, 3).mean(0) + 1e-9))
    parts = np.concatenate([np.concatenate([reader[y:y + 37, x:x + 41] for x in range(0, shape[1], 41)], 1)
                            for y in range(0, shape[0], 37)], 0)
    assert np.abs(parts.astype(int) - whole.astype(int)).max() <= 1


def test_png_and_zarr(tmp_path):
    image = _virtual(300, 400, (50, 250, 100, 300))
    Image.fromarray(image).save(tmp_path / "tile.png")
    with pytest.raises(SlideError, match=r"mpp=0\.5"):
        open_slide(tmp_path / "tile.png")
    png = open_slide(tmp_path / "tile.png", mpp=0.25)
    np.testing.assert_array_equal(png.levels[0].compute(), image)

    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    chw = np.moveaxis(image, 2, 0)
    root.create_array("0", data=chw, chunks=(3, 128, 128))
    root.create_array("1", data=chw[:, ::2, ::2].copy(), chunks=(3, 128, 128))
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 0.5]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1.0, 1.0]}]}]}]
    slide = open_slide(tmp_path / "img.ome.zarr")
    assert slide.mpp == 0.5 and slide.downsamples == [1.0, 2.0] and slide.name == "img"
    np.testing.assert_array_equal(slide.levels[0].compute(), image)
    np.testing.assert_array_equal(slide.read(1, 10, 20, 30, 50), image[::2, ::2][10:20, 30:50])


def test_corrupt_and_unsupported(tmp_path):
    garbage = tmp_path / "broken.svs"
    garbage.write_bytes(b"this is not a tiff" * 100)
    with pytest.raises(SlideError, match=r"Cannot open .*broken\.svs.*truncated, corrupt"):
        open_slide(garbage)
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(CMU.read_bytes()[:400_000])
    with pytest.raises(SlideError, match=r"cut\.svs"):
        open_slide(truncated)
    png = tmp_path / "cut.png"
    Image.fromarray(_virtual(200, 200)).save(tmp_path / "full.png")
    png.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(SlideError, match=r"cut\.png"):
        open_slide(png, mpp=1)
    other = tmp_path / "notes.docx"
    shutil.copy(garbage, other)
    with pytest.raises(SlideError, match=r"Unsupported slide file type '\.docx'"):
        open_slide(other)
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "missing.svs")


def test_ome_tiff_and_generic_tiff(tmp_path):
    import tifffile

    image = np.random.default_rng(2).integers(0, 256, (600, 700, 3), dtype=np.uint8)
    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(tmp_path / "pyr.ome.tif", bigtiff=True, ome=True) as tif:
        tif.write(image, subifds=1, tile=(256, 256), photometric="rgb", compression="zlib", metadata=meta)
        tif.write(image[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb", compression="zlib")
    slide = open_slide(tmp_path / "pyr.ome.tif")
    assert slide.name == "pyr" and slide.mpp == 0.5 and slide.downsamples == [1.0, 2.0]
    np.testing.assert_array_equal(slide.levels[1].compute(), image[::2, ::2])
    tifffile.imwrite(tmp_path / "flat.tif", image, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    flat = open_slide(tmp_path / "flat.tif")
    assert flat.mpp == pytest.approx(0.25) and flat.levels[0].chunksize[:2] == (600, 700)
    np.testing.assert_array_equal(flat.read(0, 100, 300, 200, 500), image[100:300, 200:500])


@pytest.mark.parametrize("kind", ["png", "tiff", "zarr"])
def test_rgba_slides_are_composited_on_white(tmp_path, kind):
    """Transparent pixels are glass (white), never black, in every reader."""
    import tifffile

    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)  # what an exporter leaves under transparent pixels
    rgba[16:48, 24:72] = (180, 60, 140, 255)  # opaque tissue
    rgba[16:48, 0:24] = (180, 60, 140, 128)  # half transparent
    if kind == "png":
        path = tmp_path / "slide.png"
        Image.fromarray(rgba, "RGBA").save(path)
    elif kind == "tiff":
        path = tmp_path / "slide.tif"
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(16, 16),
                         resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    else:
        path = tmp_path / "slide.zarr"
        zarr.open_array(str(path), mode="w", shape=rgba.shape, chunks=(32, 32, 1), dtype="uint8")[:] = rgba
    slide = open_slide(path, mpp=1.0)
    pixels = np.asarray(slide.levels[0])
    assert pixels.shape == (64, 96, 3)
    assert (pixels[0, 0] == 255).all() and (pixels[60, 90] == 255).all()  # transparent -> white
    assert tuple(pixels[20, 30]) == (180, 60, 140)  # opaque unchanged
    assert tuple(pixels[20, 10]) == tuple(np.rint(np.array([180, 60, 140]) * 128 / 255 + 255 * 127 / 255))
