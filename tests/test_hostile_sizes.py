"""Files whose headers claim huge sizes: refused before decoding, and tissue detection stays bounded.

The hostile files are forged in a few hundred bytes to a few hundred KB: a PNG whose IHDR claims 30,000 x
30,000 px over a one-row IDAT, an ``.npy`` header without data, TIFFs whose tiles are all absent (byte
count 0) claiming up to 10^6 x 10^6 px. Nothing here decodes them: a regression would allocate the claimed
size, so the tests that could do that run in a child process under an address-space limit.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.data.images import image_size, read_image
from pfmseg_engine.data.masks import read_mask_file
from pfmseg_engine.errors import (
    ConfigError,
    DataError,
    ImagePixelLimitError,
    PixelLimitError,
    SlideError,
    SlidePixelLimitError,
)
from pfmseg_engine.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, SCAN_FACTOR, max_pixels
from pfmseg_engine.slides import detect_tissue, open_slide
from pfmseg_engine.slides.tissue import THUMBNAIL_MAX_PIXELS

BOMB_SIDE = 30_000  # the PNG: 9e8 px, over the default limit, refused by Pillow alone too


# ---- forging files ------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(path: Path, width: int, height: int, colour_type: int = 2) -> Path:
    """A valid PNG header claiming ``width x height`` (8-bit; colour type 2 RGB, 0 grey) over one row of data."""
    channels = {0: 1, 2: 3}[colour_type]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    row = b"\0" + b"\xff" * (width * channels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row, 9))
                     + _chunk(b"IEND", b""))
    return path


def tiff_claiming(path: Path, width: int, height: int, tile: int, mpp: float = 0.25) -> Path:
    """A classic RGB TIFF of ``tile``-square tiles, every one absent (byte count 0), with ``mpp`` in its tags.

    Readers fill absent tiles without decoding anything, so any claimed size costs 8 bytes per tile on disk.
    """
    tiles = -(-width // tile) * -(-height // tile)
    per_cm = round(1e4 / mpp)
    zeros = bytes(4 * tiles)
    entries = [  # (tag, type, count, value): 3 SHORT, 4 LONG, 5 RATIONAL
        (256, 4, 1, struct.pack("<I", width)), (257, 4, 1, struct.pack("<I", height)),
        (258, 3, 3, struct.pack("<3H", 8, 8, 8)), (259, 3, 1, struct.pack("<H", 1)),
        (262, 3, 1, struct.pack("<H", 2)), (277, 3, 1, struct.pack("<H", 3)),
        (282, 5, 1, struct.pack("<II", per_cm, 1)), (283, 5, 1, struct.pack("<II", per_cm, 1)),
        (284, 3, 1, struct.pack("<H", 1)), (296, 3, 1, struct.pack("<H", 3)),
        (322, 4, 1, struct.pack("<I", tile)), (323, 4, 1, struct.pack("<I", tile)),
        (324, 4, tiles, zeros), (325, 4, tiles, zeros),
    ]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd, data = [struct.pack("<H", len(entries))], b""
    for tag, kind, count, value in entries:
        if len(value) <= 4:
            ifd.append(struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0"))
        else:
            ifd.append(struct.pack("<HHII", tag, kind, count, data_at + len(data)))
            data += value
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + b"".join(ifd) + struct.pack("<I", 0) + data)
    return path


def npy_claiming(path: Path, shape: tuple[int, ...], dtype: str = "<i8") -> Path:
    """An ``.npy`` header claiming ``shape``, with no data behind it."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": dtype, "fortran_order": False, "shape": shape})
    return path


def traced_peak(call) -> int:
    """Peak bytes allocated (numpy included) while ``call()`` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture
def ordinary_png(tmp_path) -> Path:
    path = tmp_path / "ordinary.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    return path


# ---- the setting --------------------------------------------------------------------------------
def test_the_limit_is_one_environment_variable(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS < BOMB_SIDE ** 2
    monkeypatch.setenv(MAX_PIXELS_ENV, "1e9")
    assert max_pixels() == 10 ** 9
    monkeypatch.setenv(MAX_PIXELS_ENV, "2_000_000")
    assert max_pixels() == 2_000_000
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(MAX_PIXELS_ENV, bad)
        with pytest.raises(ConfigError, match=MAX_PIXELS_ENV):
            max_pixels()


# ---- images, masks and PNG/JPEG slides ------------------------------------------------------------
def _read_slide(path: Path) -> np.ndarray:
    with open_slide(path, mpp=0.5) as slide:
        return slide.read(0, 0, slide.dimensions[1], 0, slide.dimensions[0])


@pytest.mark.parametrize(("read", "error"), [(read_image, ImagePixelLimitError), (_read_slide, SlidePixelLimitError)],
                         ids=["image", "slide"])
def test_a_bomb_after_an_ordinary_png_is_refused_before_decoding(read, error, ordinary_png, tmp_path, monkeypatch):
    """The cohort case: an ordinary PNG first must not open the door for the bomb that follows."""
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    bomb = png_claiming(tmp_path / "bomb.png", BOMB_SIDE, BOMB_SIDE)
    assert read(ordinary_png).shape == (40, 60, 3)
    caught = []

    def read_bomb():
        with pytest.raises(error) as info:
            read(bomb)
        caught.append(str(info.value))

    assert traced_peak(read_bomb) < 1 << 20  # nothing decoded (the bomb would be 2.7 GB)
    message = caught[0]
    assert str(bomb) in message and f"{BOMB_SIDE:,} x {BOMB_SIDE:,} px" in message
    assert f"{MAX_PIXELS_ENV}={BOMB_SIDE ** 2}" in message and "\n" not in message
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # Pillow's process-wide limit untouched
    assert image_size(bomb) == (BOMB_SIDE, BOMB_SIDE)  # the header alone is still readable


def test_images_within_the_limit_ignore_and_keep_pillows_own_limit(ordinary_png, monkeypatch):
    """Pillow's limit neither refuses what pfmseg allows nor is changed by reading."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 60 px is over twice this: Pillow alone would refuse
    assert read_image(ordinary_png).shape == (40, 60, 3)
    assert _read_slide(ordinary_png).shape == (40, 60, 3)
    assert image_size(ordinary_png) == (40, 60)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_lowering_the_limit_refuses_an_ordinary_image(ordinary_png, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, str(40 * 60 - 1))
    with pytest.raises(ImagePixelLimitError, match="60 x 40 px"):
        read_image(ordinary_png)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(40 * 60))
    assert read_image(ordinary_png).shape == (40, 60, 3)


def test_masks_are_checked_from_their_header(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    png = png_claiming(tmp_path / "mask.png", BOMB_SIDE, BOMB_SIDE, colour_type=0)
    npy = npy_claiming(tmp_path / "mask.npy", (BOMB_SIDE, BOMB_SIDE))
    for path in (png, npy):
        with pytest.raises(ImagePixelLimitError) as info:
            read_mask_file(path)
        assert isinstance(info.value, DataError) and f"Mask '{path}'" in str(info.value)
    with pytest.raises(DataError, match="2-D integer array"):  # the shape is judged before the size
        read_mask_file(npy_claiming(tmp_path / "cube.npy", (10, 10, 10)))


def test_a_tissue_roi_image_is_checked_before_decoding(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    slide = open_slide(tiff_claiming(tmp_path / "small.tif", 1024, 1024, tile=256, mpp=8.0))
    roi = png_claiming(tmp_path / "roi.png", BOMB_SIDE, BOMB_SIDE, colour_type=0)
    with pytest.raises(ImagePixelLimitError, match="Tissue ROI"):
        detect_tissue(slide, roi=roi)


# ---- slides: tiles, chunks, levels shown whole ------------------------------------------------------
def test_a_slide_whose_one_tile_is_huge_is_refused_by_every_backend(tmp_path, monkeypatch):
    """An untiled or forged TIFF decodes a whole tile (strip) to read one pixel of it."""
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    path = tiff_claiming(tmp_path / "one_tile.tif", BOMB_SIDE, BOMB_SIDE, tile=BOMB_SIDE)
    with pytest.raises(SlidePixelLimitError) as info:
        open_slide(path)
    message = str(info.value)
    assert "Each tile of level 0" in message and "tiffslide" in message and "--tile" in message
    assert "tried" not in message  # refused at once, not handed to the next backend to decode
    monkeypatch.setenv(MAX_PIXELS_ENV, str(BOMB_SIDE ** 2))  # a genuine file: the setting lets it through
    with open_slide(path) as slide:
        assert slide.dimensions == (BOMB_SIDE, BOMB_SIDE)


def test_a_zarr_slide_with_a_huge_chunk_is_refused(tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    path = tmp_path / "one_chunk.zarr"
    zarr.open_array(str(path), mode="w", shape=(BOMB_SIDE, BOMB_SIDE, 3), chunks=(BOMB_SIDE, BOMB_SIDE, 3),
                    dtype="uint8")  # metadata only: absent chunks cost nothing on disk
    with pytest.raises(SlidePixelLimitError, match=r"Each tile of level 0 .* \(zarr\)"):
        open_slide(path, mpp=0.5)


def test_napari_refuses_a_single_level_slide_it_would_draw_whole(tmp_path, monkeypatch):
    from napari_pfmseg._reader import read_one

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    path = tiff_claiming(tmp_path / "flat.tif", 20_000, 20_000, tile=512)  # 4e8 px, one level
    with pytest.raises(SlidePixelLimitError, match="napari shows it whole"):
        read_one(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, str(20_000 ** 2))
    data, _meta, kind = read_one(path)
    assert kind == "image" and data.shape == (20_000, 20_000, 3)


# ---- tissue detection -----------------------------------------------------------------------------
def test_tissue_thumbnail_is_capped_and_read_in_bounded_memory(tmp_path, monkeypatch):
    """A single-level slide at the detection resolution: the thumbnail is coarsened to the cap and the level
    is scanned block by block; peak memory follows the cap, not the level (4096^2 px, 50 MB as RGB)."""
    cap = 1 << 16
    monkeypatch.setenv(MAX_PIXELS_ENV, str(cap))
    assert cap < THUMBNAIL_MAX_PIXELS and SCAN_FACTOR * cap >= 4096 ** 2
    slide = open_slide(tiff_claiming(tmp_path / "flat.tif", 4096, 4096, tile=256, mpp=8.0))
    found = []
    peak = traced_peak(lambda: found.append(detect_tissue(slide)))
    tissue = found[0]
    assert tissue.thumbnail.shape == (256, 256, 3) and tissue.mpp == pytest.approx(128.0)
    # thumbnail, texture and detection temporaries (under 100 bytes per thumbnail pixel) plus one block of at
    # most `cap` level pixels read whole (under 40 bytes per pixel as uint8, uint32 sums and float32 spread)
    assert peak < 100 * cap + 40 * cap < 4096 * 4096 * 3


def test_ordinary_slides_keep_their_detection_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    slide = open_slide(tiff_claiming(tmp_path / "small.tif", 4096, 2048, tile=256, mpp=0.5))
    tissue = detect_tissue(slide)
    assert tissue.mpp == pytest.approx(8.0) and tissue.thumbnail.shape == (128, 256, 3)


PLAN_A_HUGE_SLIDE = """
    import resource, sys, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails fast, not the machine
    from pfmseg_engine.errors import SlidePixelLimitError
    from pfmseg_engine.inference.plan import ModelInfo, plan_slide
    from pfmseg_engine.slides import open_slide
    tracemalloc.start()
    with open_slide(sys.argv[1]) as slide:
        plan = plan_slide(slide, ModelInfo(3, 16, ("a", "b", "c"), 256, 0.25), output_dir=sys.argv[2])
        try:
            print(plan.summary())
        except SlidePixelLimitError as exc:
            print("REFUSED", exc)
    print("PEAK", tracemalloc.get_traced_memory()[1])
"""


def test_planning_a_slide_claiming_a_million_squared_pixels_is_refused_in_bounded_memory(tmp_path):
    """The plan summary (and --dry_run) detects tissue first: 10^6 x 10^6 px without a pyramid is refused with
    what to do, after reading nothing but the probe's one pixel."""
    path = tiff_claiming(tmp_path / "huge.tif", 1_000_000, 1_000_000, tile=4096)
    assert path.stat().st_size < 1 << 20
    env = {k: v for k, v in os.environ.items() if k != MAX_PIXELS_ENV}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(PLAN_A_HUGE_SLIDE), str(path), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    refused = next(line for line in out.stdout.splitlines() if line.startswith("REFUSED"))
    assert f"'{path}'" in refused and "1,000,000 x 1,000,000 px" in refused
    assert MAX_PIXELS_ENV in refused and "tissue=False" in refused and "pyramid" in refused
    peak = int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()[1])
    assert peak < THUMBNAIL_MAX_PIXELS  # not even a capped thumbnail was allocated


def test_errors_are_the_engines_own(tmp_path):
    """Front ends catch them as slide or data errors, and as one pixel-limit family."""
    assert issubclass(SlidePixelLimitError, SlideError) and issubclass(SlidePixelLimitError, PixelLimitError)
    assert issubclass(ImagePixelLimitError, DataError) and issubclass(ImagePixelLimitError, PixelLimitError)
