"""TIFF tiles are decoded in the threads that read them, with the same bytes as tiffslide's zarr store."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pfmseg_engine.inference.tilecache import TileCache
from pfmseg_engine.slides import open_slide
from pfmseg_engine.slides.readers import TiffLevelReader, read_tiff_tiles, tiff_level_page

DATA = Path(__file__).parent / "data" / "slides"


def _texture(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus noise: JPEG-compressible but with every tile different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    planes = [127 + 100 * np.sin(yy / (7 + 3 * c) + xx / (11 + 2 * c)) for c in range(channels)]
    image = np.stack(planes, -1) + rng.normal(0, 12, (height, width, channels))
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(path: Path, kind: str) -> Path:
    """One TIFF of each layout the direct tile reader takes."""
    rgb = _texture(333, 517)
    if kind == "jpeg_tiles":
        tifffile.imwrite(path, rgb, tile=(64, 128), compression="jpeg", photometric="rgb")
    elif kind == "zlib_gray_tiles":
        tifffile.imwrite(path, rgb[..., 0], tile=(48, 32), compression="zlib", photometric="minisblack")
    elif kind == "zlib_strips":
        tifffile.imwrite(path, rgb, rowsperstrip=37, photometric="rgb", compression="zlib")
    elif kind == "raw_contiguous":
        tifffile.imwrite(path, rgb, rowsperstrip=37, photometric="rgb")
    elif kind == "rgba_tiles":
        tifffile.imwrite(path, _texture(100, 130, 4), tile=(32, 32), photometric="rgb",
                         extrasamples=["unassalpha"], compression="zlib")
    elif kind == "ome_pyramid":
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            tif.write(rgb, subifds=2, tile=(64, 64), photometric="rgb", compression="jpeg", metadata=meta)
            tif.write(rgb[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb", compression="jpeg")
            tif.write(rgb[::4, ::4], subfiletype=1, tile=(64, 64), photometric="rgb", compression="jpeg")
    return path


def _boxes(height: int, width: int, n: int = 25, seed: int = 1) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    boxes = [(0, height, 0, width), (height - 1, height, width - 1, width), (0, 1, 0, 1)]
    for _ in range(n):
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        boxes.append((y0, int(rng.integers(y0 + 1, height + 1)), x0, int(rng.integers(x0 + 1, width + 1))))
    return boxes


@pytest.mark.parametrize("kind", ["jpeg_tiles", "zlib_gray_tiles", "zlib_strips", "rgba_tiles", "ome_pyramid",
                                  "CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs"])
def test_direct_tiles_equal_the_zarr_store(tmp_path, kind):
    """Every region of every level: the bytes tiffslide's zarr store gives (JPEG with and without shared
    tables, JPEG 2000, zlib, raw strips, gray, RGBA, partial edge tiles, SubIFD pyramids)."""
    import tiffslide

    path = DATA / kind if kind.endswith(".svs") else _write(tmp_path / f"{kind}.tif", kind)
    with tiffslide.TiffSlide(path) as handle:
        for level in range(handle.level_count):
            page = tiff_level_page(handle, level)
            assert page is not None, f"level {level} of {kind} went the slow way"
            array = handle.zarr_group[str(level)]
            for y0, y1, x0, x1 in _boxes(*array.shape[:2], n=8 if kind.startswith("TCGA") else 25):
                direct = read_tiff_tiles(page, y0, y1, x0, x1)
                expected = np.asarray(array[y0:y1, x0:x1])
                assert direct.dtype == expected.dtype and direct.shape == expected.shape
                assert np.array_equal(direct, expected), (level, y0, y1, x0, x1)


def test_absent_tiles_hold_nodata(tmp_path):
    """A tile the file does not hold (offset or byte count 0) reads as the page's nodata, as zarr fills it."""
    import tiffslide

    path = _write(tmp_path / "tiles.tif", "jpeg_tiles")
    with tiffslide.TiffSlide(path) as handle:
        page = tiff_level_page(handle, 0)
        full = read_tiff_tiles(page, 0, 333, 0, 517)
        counts = list(page.databytecounts)
        counts[1] = 0  # tile (0, 1): rows 0-63, columns 128-255
        page.databytecounts = tuple(counts)
        holed = read_tiff_tiles(page, 0, 100, 100, 300)
    assert (holed[:64, 28:156] == page.nodata).all()
    assert np.array_equal(holed[64:], full[64:100, 100:300]) and np.array_equal(holed[:64, :28], full[:64, 100:128])


def test_composed_levels_keep_the_zarr_store(tmp_path):
    """A level tiffslide composes from several series (Leica SCN) is not read directly."""

    class Handle:
        def __init__(self) -> None:
            self.properties = {"tiffslide.series-composition": {"located_series": {}}}

    assert tiff_level_page(Handle(), 0) is None


def test_contiguous_files_read_through_the_zarr_store(tmp_path):
    """Uncompressed contiguous data is one segment to tifffile: it keeps the zarr store, with the same pixels."""
    import tiffslide

    path = _write(tmp_path / "raw.tif", "raw_contiguous")
    with tiffslide.TiffSlide(path) as handle:
        assert tiff_level_page(handle, 0) is None
    with open_slide(path, mpp=0.5) as slide:
        assert np.array_equal(slide.readers[0][10:300, 20:500], _texture(333, 517)[10:300, 20:500])


def test_reader_threads_decode_at_the_same_time(tmp_path, monkeypatch):
    """Two threads reading two blocks are inside the tile decoder together (no single decoding thread).

    Each thread's first decode waits at a barrier for the other's: were decoding serialised in one
    thread, the barrier would break after its timeout and the read would fail.
    """
    path = _write(tmp_path / "tiles.tif", "jpeg_tiles")
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[int, int] = {}
    lock = threading.Lock()
    original = read_tiff_tiles

    def meeting(page, *args):
        decode = page.decode

        def wrapped(*a, **k):
            me = threading.get_ident()
            with lock:
                first = me not in seen
                seen[me] = seen.get(me, 0) + 1
            if first:
                barrier.wait()
            return decode(*a, **k)

        class Page:
            def __getattr__(self, name):
                return wrapped if name == "decode" else getattr(page, name)

        return original(Page(), *args)

    slide = open_slide(path, mpp=0.5)
    reader = slide.readers[0]
    assert isinstance(reader, TiffLevelReader)
    expected = np.asarray(slide.levels[0][:, :])
    monkeypatch.setattr("pfmseg_engine.slides.readers.read_tiff_tiles", meeting)
    cache = TileCache(reader, (128, 256))
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def read(name: str, box: tuple[int, int, int, int]) -> None:
        try:
            y0, y1, x0, x1 = box
            results[name] = cache[y0:y1, x0:x1]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=("a", (0, 128, 0, 256))),
               threading.Thread(target=read, args=("b", (128, 256, 256, 512)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slide.close()
    assert not errors, errors
    assert len(seen) == 2 and cache.decoded == 2
    assert np.array_equal(results["a"], expected[:128, :256])
    assert np.array_equal(results["b"], expected[128:256, 256:512])
