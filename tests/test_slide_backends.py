"""Reader backends behind ``open_slide``: tiffslide, OpenSlide and DICOM (wsidicom), chosen per file.

Real files throughout: the shipped SVS slides, and small slides written here in formats only one
backend (or two) reads: a Hamamatsu VMS (JPEG index, OpenSlide only), a Leica SCN with bounds and
two scanned regions (tiffslide and OpenSlide), and a DICOM WSI series (wsidicom and OpenSlide).
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.errors import ConfigError, SlideError
from pfmseg_engine.slides import READERS, open_slide
from testdata import CMU, TCGA

openslide = pytest.importorskip("openslide", reason="OpenSlide backend: pip install openslide-bin openslide-python")


def _pattern(height: int, width: int, blob: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Pixels that differ everywhere (any misplacement by one pixel shows), with an H&E-coloured block."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx % 256, yy % 256, (xx // 3 + yy // 5) % 256], -1).astype(np.uint8)
    if blob:
        y0, y1, x0, x1 = blob
        image[y0:y1, x0:x1] = (180, 90, 160)
    return image


def _boxes(shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """A few regions of a level: a corner, the middle, the far edge, and one across tile borders."""
    h, w = shape[:2]
    boxes = [(0, 70, 0, 90), (h // 2 - 20, h // 2 + 25, w // 2 - 33, w // 2 + 40), (h - 50, h, w - 64, w),
             (250, 530, 230, 530)]
    clipped = {(max(0, y0), min(h, y1), max(0, x0), min(w, x1)) for y0, y1, x0, x1 in boxes}
    return sorted(b for b in clipped if b[1] > b[0] and b[3] > b[2])


def _same_metadata(a, b) -> None:
    assert a.mpp == pytest.approx(b.mpp) if a.mpp else b.mpp is None
    assert a.level_dimensions == b.level_dimensions
    assert a.downsamples == pytest.approx(b.downsamples)
    assert a.bounds_offset == b.bounds_offset


# ---- generated slides --------------------------------------------------------------------------
def _write_vms(folder: Path) -> tuple[Path, np.ndarray]:
    """A Hamamatsu VMS slide: a key file naming a JPEG with restart markers (OpenSlide tiles by them)."""
    image = _pattern(512, 768, (100, 300, 150, 450))
    # 4:4:4 with one restart interval per 256 px: OpenSlide's VMS reader tiles the JPEG by interval.
    Image.fromarray(image).save(folder / "slide.jpg", quality=95, subsampling=0, restart_marker_blocks=32)
    Image.fromarray(image[::8, ::8]).save(folder / "map.jpg", quality=95, subsampling=0, restart_marker_blocks=4)
    vms = folder / "slide.vms"
    vms.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
                   "ImageFile=slide.jpg\nMapFile=map.jpg\nPhysicalWidth=384000\nPhysicalHeight=256000\n")
    return vms, np.asarray(Image.open(folder / "slide.jpg").convert("RGB"))


def _write_scn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Leica SCN: a macro image plus two scanned regions (3 levels each) in a 1600 x 1200 px collection.

    Region A (800 x 600 px) sits at (x, y) = (300, 200), region B (200 x 100) at (1300, 1000): the
    bounds are x 300..1500, y 200..1100, with unscanned glass between the regions.
    """
    import tifffile

    nm = 500  # nm per level-0 pixel: 0.5 um/px
    region_a, region_b = _pattern(600, 800, (100, 300, 200, 500)), _pattern(100, 200)[::-1].copy()
    placed = [(region_a, 300, 200), (region_b, 1300, 1000)]
    scan = ("<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings><illuminationSettings>"
            "<numericalAperture>0.4</numericalAperture><illuminationSource>brightfield</illuminationSource>"
            "</illuminationSettings></scanSettings>")
    device = '<creationDate>2020-01-01T00:00:00Z</creationDate><device model="Leica SCN400" version="1.5"/>'
    macro = np.full((150, 200, 3), 200, np.uint8)
    images = [f'<image name="macro">{device}<pixels sizeX="200" sizeY="150"><dimension sizeX="200" sizeY="150" '
              f'r="0" ifd="0"/></pixels><view sizeX="{1600 * nm}" sizeY="{1200 * nm}" offsetX="0" offsetY="0" '
              f'spacingZ="0"/>{scan}</image>']
    pages = []
    for n, (region, x, y) in enumerate(placed):
        dims = ""
        for r in range(3):
            level = region[:: 2**r, :: 2**r].copy()
            dims += f'<dimension sizeX="{level.shape[1]}" sizeY="{level.shape[0]}" r="{r}" ifd="{1 + len(pages)}"/>'
            pages.append((level, 2**r))
        h, w = region.shape[:2]
        images.append(f'<image name="region{n}">{device}<pixels sizeX="{w}" sizeY="{h}">{dims}</pixels>'
                      f'<view sizeX="{w * nm}" sizeY="{h * nm}" offsetX="{x * nm}" offsetY="{y * nm}" '
                      f'spacingZ="0"/>{scan}</image>')
    xml = ('<?xml version="1.0" encoding="utf-8"?>\n<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
           f'<collection name="test" sizeX="{1600 * nm}" sizeY="{1200 * nm}">{"".join(images)}</collection></scn>')
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(macro, tile=(64, 64), photometric="rgb", compression="zlib", description=xml, metadata=None)
        for level, factor in pages:
            tif.write(level, tile=(64, 64), photometric="rgb", compression="zlib", metadata=None,
                      resolution=(2e4 / factor, 2e4 / factor), resolutionunit="CENTIMETER")
    expected = np.full((900, 1200, 3), 255, np.uint8)  # the bounds region: glass where nothing was scanned
    for region, x, y in placed:
        expected[y - 200:y - 200 + region.shape[0], x - 300:x - 300 + region.shape[1]] = region
    return expected, region_a


def _write_dicom_wsi(folder: Path, levels: list[np.ndarray], mpp: float, tile: int = 64) -> Path:
    """A DICOM WSI series, one uncompressed TILED_FULL instance per pyramid level (pydicom only)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    width0 = levels[0].shape[1]
    for i, image in enumerate(levels):
        h, w = image.shape[:2]
        spacing = mpp * width0 / w / 1000  # mm
        rows, cols = -(-h // tile), -(-w // tile)
        padded = np.zeros((rows * tile, cols * tile, 3), np.uint8)
        padded[:h, :w] = image
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.PatientName, ds.PatientID, ds.InstanceNumber = "SM", "Test^Slide", "0", i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else ["DERIVED", "PRIMARY", "VOLUME",
                                                                              "RESAMPLED"]
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
        ds.NumberOfFrames = rows * cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20, 40
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        measures = Dataset()
        measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.0005
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * spacing, h * spacing, 0.5
        optical_path = Dataset()
        optical_path.OpticalPathIdentifier = "0"
        ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([optical_path]), 1
        ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
        ds.PixelData = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        try:
            ds.save_as(folder / f"level{i}.dcm", enforce_file_format=True)  # pydicom >= 3
        except TypeError:
            ds.save_as(folder / f"level{i}.dcm", write_like_original=False)
    return folder


# ---- the shipped SVS slides through both backends ------------------------------------------------
@pytest.mark.parametrize("path", [CMU, TCGA], ids=["CMU-JPEG", "TCGA-JP2K"])
def test_tiffslide_and_openslide_agree_on_svs(path):
    tiff = open_slide(path, reader="tiffslide", require_mpp=False)
    osl = open_slide(path, reader="openslide", require_mpp=False)
    assert (tiff.backend, osl.backend) == ("tiffslide", "openslide")
    assert open_slide(path, require_mpp=False).backend == "tiffslide"  # auto prefers tiffslide for SVS
    _same_metadata(tiff, osl)
    assert (tiff.mpp, tiff.level_count) == ((0.499, 1) if path == CMU else (None, 2))
    for level in range(tiff.level_count):
        for y0, y1, x0, x1 in _boxes(tiff.readers[level].shape):
            a, b = tiff.read(level, y0, y1, x0, x1), osl.read(level, y0, y1, x0, x1)
            assert a.shape == b.shape == (y1 - y0, x1 - x0, 3)
            if float(osl.downsamples[level]).is_integer() or (y0, x0) == (0, 0):
                np.testing.assert_array_equal(a, b, err_msg=f"level {level} box {(y0, y1, x0, x1)}")
            else:
                # TCGA level 1 has downsample 2.0005: OpenSlide addresses it in level-0 pixels and
                # resamples such reads by a fraction of a pixel (why auto reads SVS with tiffslide).
                assert np.abs(a.astype(int) - b.astype(int)).mean() < 8
    np.testing.assert_array_equal(tiff.levels[-1][:300, :400].compute(), osl.levels[-1][:300, :400].compute())


def test_openslide_levels_are_lazy_picklable_and_reopen_after_close():
    """Per-thread handles and reader pickling: ``test_slides.test_readers_per_thread_and_picklable``."""
    slide = open_slide(CMU, reader="openslide")
    level = slide.levels[0]
    assert level.chunksize[:2] == (960, 960)  # a few native 240-px tiles per chunk, as with tiffslide
    reader = slide.readers[0]
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone[0:64, 0:80], reader[0:64, 0:80])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(level))[1000:1100, 500:640].compute(),
                                  open_slide(CMU).read(0, 1000, 1100, 500, 640))
    slide.close()
    np.testing.assert_array_equal(reader[0:10, 0:10], clone[0:10, 0:10])  # reopens after close
    assert reader[5:5, 0:10].shape == (0, 10, 3)


# ---- formats only some backends read -------------------------------------------------------------
def test_vms_is_read_by_openslide_only(tmp_path):
    vms, image = _write_vms(tmp_path)
    with pytest.raises(SlideError, match=r"tried tiffslide"):
        open_slide(vms, reader="tiffslide")
    slide = open_slide(vms)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.5)
    assert slide.level_dimensions[:4] == [(768, 512), (384, 256), (192, 128), (96, 64)]
    assert slide.downsamples[:4] == [1.0, 2.0, 4.0, 8.0] and slide.bounds_offset == (0, 0)
    np.testing.assert_array_equal(slide.levels[0].compute(), image)
    handle = openslide.OpenSlide(str(vms))
    for level in range(slide.level_count):
        for y0, y1, x0, x1 in _boxes(slide.readers[level].shape):
            ds = slide.downsamples[level]
            reference = np.asarray(handle.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0)))
            np.testing.assert_array_equal(slide.read(level, y0, y1, x0, x1), reference[..., :3])
    clone = pickle.loads(pickle.dumps(slide.readers[1]))
    np.testing.assert_array_equal(clone[10:50, 20:60], slide.read(1, 10, 50, 20, 60))


def test_leica_scn_bounds_and_regions_with_both_backends(tmp_path):
    path = tmp_path / "slide.scn"
    expected, region_a = _write_scn(path)
    auto = open_slide(path)
    tiff = open_slide(path, reader="tiffslide")
    assert (auto.backend, tiff.backend) == ("openslide", "tiffslide")  # OpenSlide is SCN's reference reader
    _same_metadata(auto, tiff)
    assert auto.mpp == pytest.approx(0.5) and auto.bounds_offset == (300, 200)
    assert auto.level_dimensions == [(1200, 900), (600, 450), (300, 225)]  # the bounds region, every level
    for slide in (auto, tiff):
        for level, f in enumerate((1, 2, 4)):
            np.testing.assert_array_equal(slide.levels[level].compute(), expected[::f, ::f],
                                          err_msg=f"{slide.backend} level {level}")
        np.testing.assert_array_equal(slide.read(0, 50, 130, 700, 790), region_a[50:130, 700:790])
        assert (slide.read(0, 700, 720, 900, 920) == 255).all()  # unscanned glass is white


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_dicom_wsi_with_wsidicom_and_openslide(tmp_path, as_file):
    pytest.importorskip("wsidicom", reason="DICOM backend: pip install wsidicom")
    image = _pattern(300, 420, (50, 200, 60, 300))
    pyramid = [image, image[::2, ::2].copy(), image[::4, ::4].copy()]
    folder = _write_dicom_wsi(tmp_path / "case1", pyramid, mpp=0.25)
    path = folder / "level1.dcm" if as_file else folder
    slide = open_slide(path)
    assert slide.backend == "dicom" and slide.name == ("level1" if as_file else "case1")
    assert slide.mpp == pytest.approx(0.25) and slide.downsamples == [1.0, 2.0, 4.0]
    assert slide.level_dimensions == [(420, 300), (210, 150), (105, 75)] and slide.bounds_offset == (0, 0)
    assert slide.levels[0].chunksize[:2] == (300, 420)  # 64-px tiles, 16 per chunk side at most
    for level, array in enumerate(pyramid):
        np.testing.assert_array_equal(slide.levels[level].compute(), array)
    other = open_slide(path, reader="openslide")  # OpenSlide 4 reads DICOM WSI too
    _same_metadata(slide, other)
    for level, array in enumerate(pyramid):
        for y0, y1, x0, x1 in _boxes(array.shape):
            np.testing.assert_array_equal(other.read(level, y0, y1, x0, x1), array[y0:y1, x0:x1])
    clone = pickle.loads(pickle.dumps(slide.readers[2]))
    np.testing.assert_array_equal(clone[:, :], pyramid[2])


def test_dicom_folder_recognised_by_content(tmp_path):
    pytest.importorskip("wsidicom", reason="DICOM backend: pip install wsidicom")
    image = _pattern(130, 200)
    folder = _write_dicom_wsi(tmp_path / "series", [image], mpp=0.5)
    for file in folder.iterdir():
        file.rename(file.with_suffix(""))  # DICOM files often have no suffix
    slide = open_slide(folder)
    assert slide.backend == "dicom"
    np.testing.assert_array_equal(slide.levels[0].compute(), image)


# ---- choosing and overriding ---------------------------------------------------------------------
def test_auto_falls_back_when_the_first_backend_refuses(monkeypatch, caplog):
    """Stand-in for an SVS variant tiffslide cannot read: tiffslide refuses, OpenSlide reads it."""
    import tiffslide

    def refuse(*args, **kwargs):
        raise tiffslide.TiffFileError("not a supported TIFF variant")

    monkeypatch.setattr(tiffslide, "TiffSlide", refuse)
    with caplog.at_level(logging.INFO, logger="pfmseg_engine.slides.backends"):
        slide = open_slide(CMU)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.499)
    assert "with openslide" in caplog.text and "not a supported TIFF variant" in caplog.text
    with pytest.raises(SlideError, match=r"tried tiffslide \(TiffFileError: not a supported TIFF variant\)"):
        open_slide(CMU, reader="tiffslide")


def test_reader_override_and_invalid_name():
    assert READERS == ("auto", "tiffslide", "openslide", "dicom")
    assert open_slide(CMU, reader="openslide").backend == "openslide"
    assert open_slide(CMU, reader=" TiffSlide ").backend == "tiffslide"
    assert open_slide(CMU, reader=None).backend == "tiffslide"
    with pytest.raises(ConfigError, match=r"Unknown slide reader 'opensilde'\. Did you mean 'openslide'\? "
                                          r"Valid: auto, tiffslide, openslide, dicom\.$") as refused:
        open_slide(CMU, reader="opensilde")
    assert refused.value.fix_with == ("reader",)  # the CLI adds its --reader
    with pytest.raises(SlideError, match=r"tried dicom"):
        open_slide(CMU, reader="dicom")


def test_png_ignores_the_reader_choice(tmp_path):
    Image.fromarray(_pattern(40, 60)).save(tmp_path / "tile.png")
    assert open_slide(tmp_path / "tile.png", mpp=1.0, reader="openslide").backend == "pil"


def test_unsupported_files_name_formats_and_backends(tmp_path, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    mrxs, other = tmp_path / "noise.mrxs", tmp_path / "noise.xyz"
    mrxs.write_bytes(noise)
    other.write_bytes(noise)
    with pytest.raises(SlideError) as info:
        open_slide(mrxs)
    message = str(info.value)
    assert "Cannot open" in message and "(MIRAX): tried openslide" in message and "folder of the same name" in message
    assert "openslide (installed): MIRAX .mrxs, Hamamatsu .vms/.vmu" in message
    assert "tiffslide (installed): Aperio .svs" in message and "DICOM WSI" in message
    with pytest.raises(SlideError, match=r"(?s)Unsupported slide file type '\.xyz'.*\.mrxs.*tiffslide.*openslide"):
        open_slide(other)
    with pytest.raises(SlideError, match=r"tried openslide \(OpenSlideUnsupportedFormatError"):
        open_slide(other, reader="openslide")  # an explicit reader tries any suffix

    monkeypatch.setitem(sys.modules, "openslide", None)  # as if openslide-python were not installed
    with pytest.raises(SlideError) as info:
        open_slide(mrxs)
    message = str(info.value)
    assert "is read by openslide (pip install openslide-bin openslide-python), which is not installed" in message
    assert "openslide (NOT installed: pip install openslide-bin openslide-python)" in message
    with pytest.raises(SlideError, match="not installed"):
        open_slide(CMU, reader="openslide")
    assert open_slide(CMU).backend == "tiffslide"  # SVS still opens without OpenSlide
