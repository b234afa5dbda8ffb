"""Whole-slide reader backends, chosen per file: tiffslide, OpenSlide and DICOM (wsidicom).

* **tiffslide** (pure Python over tifffile, always installed): SVS, NDPI, generic/pyramidal TIFF,
  OME-TIFF, Leica SCN. Reads each level in its own pixel grid (exact at every level).
* **openslide** (``pip install openslide-bin openslide-python``, wheels with the native library
  inside): everything OpenSlide reads, notably what tiffslide cannot: MIRAX ``.mrxs``, Hamamatsu
  VMS/VMU, Sakura ``.svslide``, Zeiss ``.czi``, and the reference readers of Leica SCN and Ventana BIF.
* **dicom** (``pip install wsidicom``): a DICOM WSI series, given as its folder or one of its files.

``reader="auto"`` tries the backends listed for the file's suffix in :data:`AUTO_ORDER` (files
without a known suffix are recognised by content), taking the first that opens the file and decodes
a tile of it; an explicit ``reader`` uses that backend alone. Every backend yields the same parts of a
:class:`~pfmseg_engine.slides.slide.Slide`: lazy dask levels over tile-granular, per-thread, picklable
readers, level-0 microns per pixel and the bounds offset (levels cropped to the bounds region).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dask.base import tokenize

from ..errors import ConfigError, PixelLimitError, SlideError, SlidePixelLimitError, closest
from ..limits import check_pixels
from .readers import (
    DicomLevelReader,
    OpenSlideLevelReader,
    ThreadLocalHandles,
    TiffLevelReader,
    open_openslide,
    open_wsidicom,
)
from .slide import lazy_level

log = logging.getLogger(__name__)

#: Valid ``reader=`` values of :func:`~pfmseg_engine.slides.open_slide` (and the CLI's ``--reader``).
READERS = ("auto", "tiffslide", "openslide", "dicom")

#: Help text of a ``--reader`` command-line flag.
READER_HELP = (
    "Whole-slide reader backend: auto (default: tiffslide for SVS/NDPI/TIFF, OpenSlide for MIRAX "
    ".mrxs, Hamamatsu .vms/.vmu, Leica .scn, Ventana .bif, Sakura .svslide, Zeiss .czi, wsidicom for "
    "DICOM folders/.dcm, falling back to the next backend that reads the file), tiffslide, openslide "
    "or dicom (force one backend). PNG/JPEG and zarr inputs always use their own readers."
)

#: Plausible microns per pixel for histology; metadata outside this range is ignored as bogus.
MPP_RANGE = (0.01, 100.0)

#: Length units (NGFF axes, OME-XML), in micrometres.
UNIT_TO_UM = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3, "nm": 1e-3,
              "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "meter": 1e6}

DICOM_BACKENDS = ("dicom", "openslide")
TIFF_BACKENDS = ("tiffslide", "openslide")

#: ``reader="auto"``: which backends try a file with this suffix, in order.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    **dict.fromkeys((".svs", ".ndpi", ".tif", ".tiff", ".qptiff"), TIFF_BACKENDS),
    # OpenSlide is the reference reader of these TIFF variants (multi-region SCN, BIF tile overlaps).
    **dict.fromkeys((".scn", ".bif"), ("openslide", "tiffslide")),
    **dict.fromkeys((".mrxs", ".vms", ".vmu", ".svslide", ".czi"), ("openslide",)),
    ".dcm": DICOM_BACKENDS,
}

FORMAT_NAMES = {".svs": "Aperio SVS", ".ndpi": "Hamamatsu NDPI", ".tif": "TIFF", ".tiff": "TIFF",
                ".qptiff": "Akoya QPTIFF", ".scn": "Leica SCN", ".bif": "Ventana BIF", ".mrxs": "MIRAX",
                ".vms": "Hamamatsu VMS", ".vmu": "Hamamatsu VMU", ".svslide": "Sakura SVSlide",
                ".czi": "Zeiss CZI", ".dcm": "DICOM WSI"}

FORMAT_HINTS = {
    ".mrxs": " A MIRAX slide is the .mrxs file plus the folder of the same name beside it (Slidedat.ini, Index.dat, "
             "Data*.dat); copy both.",
    ".vms": " A VMS slide is the .vms index plus the JPEG and map files it names, beside it.",
}


def plausible_mpp(mpp: Any, source: str) -> float | None:
    """``mpp`` as a float when it is a plausible histology resolution, else ``None`` (logged)."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        log.warning("Ignoring implausible microns-per-pixel %r from %s.", mpp, source)
        return None
    return value


# ---- the backends ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """A whole-slide reader: what it needs installed, what it reads, and its opener."""

    name: str
    modules: tuple[str, ...]
    pip: str
    formats: str
    opener: Callable[[Path], dict[str, Any]]

    def import_error(self) -> str | None:
        """``None`` when the backend's packages import, else why not."""
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or OSError when a native library is missing
                return f"{type(exc).__name__}: {exc}"
        return None

    def status(self) -> str:
        error = self.import_error()
        return "installed" if error is None else f"NOT installed: {self.pip}"


def describe_readers() -> str:
    """Which backend reads which formats, and whether it is installed (for error messages)."""
    lines = [f"  {b.name} ({b.status()}): {b.formats}" for b in BACKENDS.values()]
    lines.append("  built in: .png .jpg .jpeg images (give their mpp) and zarr / OME-Zarr stores")
    return "Slide readers:\n" + "\n".join(lines)


def check_reader(reader: str | None) -> str:
    """The normalised reader name, or a :class:`ConfigError` listing :data:`READERS`."""
    name = "auto" if reader is None else str(reader).strip().lower()
    if name not in READERS:
        raise ConfigError(
            f"Unknown slide reader '{reader}'.{closest(str(reader), READERS)} Valid: {', '.join(READERS)}.",
            fix_with=("reader",),
        )
    return name


# ---- geometry shared by the TIFF-like backends -------------------------------------------------
def _bounded(level_dims: list[tuple[int, int]], downsamples: list[float], bounds: tuple[int, int, int, int],
             ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(shape, offset) per level, both (y, x), covering the bounds region (x, y, width, height) in level 0."""
    bx, by, bw, bh = bounds
    out = []
    for (width, height), ds in zip(level_dims, downsamples, strict=True):
        ox, oy = round(bx / ds), round(by / ds)
        shape = (min(round(bh / ds), height - oy), min(round(bw / ds), width - ox))
        out.append((shape, (oy, ox)))
    return out


def _bounds(props: dict[str, Any], prefix: str, width: int, height: int) -> tuple[int, int, int, int]:
    bx, by = (int(props.get(f"{prefix}.bounds-{k}") or 0) for k in "xy")
    bw = int(props.get(f"{prefix}.bounds-width") or width - bx)
    bh = int(props.get(f"{prefix}.bounds-height") or height - by)
    return bx, by, bw, bh


#: What to do with a slide whose tiles are too large: any read of a tile decodes all of it.
TILE_REMEDY = ("A slide is read tile by tile (a strip of an untiled TIFF counts as one tile) and each is decoded "
               "whole; re-save it tiled, e.g. vips tiffsave in.tif out.tif --tile --tile-width 512 "
               "--tile-height 512 --pyramid.")


def check_tiles(path: Path, backend: str, tiles: dict[str, tuple[int, int]]) -> None:
    """Refuse a slide whose tiles (the units its backend decodes whole), by level, exceed the pixel limit.

    Levels themselves may have any size (they are read tile by tile); a tile of a forged or untiled file can
    claim billions of pixels, and reading one pixel of it would decode them all.
    """
    for level, (height, width) in tiles.items():
        check_pixels(height, width, f"Each tile of level {level} of '{path}' ({backend})",
                     error=SlidePixelLimitError, remedy=TILE_REMEDY)


def _tiffslide_tiles(handle: Any, count: int) -> dict[str, tuple[int, int]]:
    """(height, width) of the chunks tiffslide decodes whole (TIFF tiles or strips) of each of ``count`` levels.

    A Leica SCN level is composed of several located series, each its own array of chunks.
    """
    group = handle.zarr_group
    composition = group.attrs.get("tiffslide.series-composition")
    series = [f"{name}/" for name in composition["located_series"]] if composition else [""]
    tiles = {}
    for prefix in series:
        for level in range(count):
            height, width = group[f"{prefix}{level}"].chunks[:2]
            tiles[f"{prefix}{level}"] = (int(height), int(width))
    return tiles


def _property_tiles(props: dict[str, Any], prefix: str, count: int) -> dict[str, tuple[int, int]]:
    """(height, width) of each level's tiles from ``<prefix>.level[i].tile-height/-width`` where given."""
    tiles = {}
    for i in range(count):
        height, width = (props.get(f"{prefix}.level[{i}].tile-{k}") for k in ("height", "width"))
        if height and width:
            tiles[str(i)] = (int(height), int(width))
    return tiles


def _file_token(path: Path, backend: str) -> str:
    stat = path.stat()
    return tokenize(str(path), stat.st_mtime_ns, stat.st_size, backend)


# ---- tiffslide -----------------------------------------------------------------------------------
def _ome_mpp(description: Any) -> float | None:
    """PhysicalSizeX of the first image in OME-XML (tiffslide does not read it), in micrometres."""
    if not isinstance(description, str) or "<OME" not in description:
        return None
    size = re.search(r'<Pixels[^>]*\bPhysicalSizeX="([^"]+)"', description)
    if size is None:
        return None
    unit = re.search(r'<Pixels[^>]*\bPhysicalSizeXUnit="([^"]+)"', description)
    factor = UNIT_TO_UM.get(unit.group(1) if unit else "µm")
    try:
        return float(size.group(1)) * factor if factor else None
    except ValueError:
        return None


def open_tiffslide(path: Path) -> dict[str, Any]:
    import tiffslide

    handle = tiffslide.TiffSlide(path)
    try:
        props = dict(handle.properties)
        level_dims = list(handle.level_dimensions)
        downsamples = [float(d) for d in handle.level_downsamples]
        check_tiles(path, "tiffslide", _tiffslide_tiles(handle, len(level_dims)))
    except Exception:
        handle.close()
        raise
    bounds = _bounds(props, "tiffslide", *level_dims[0])
    handles = ThreadLocalHandles(lambda: tiffslide.TiffSlide(path))
    handles.adopt(handle)
    token = _file_token(path, "tiffslide")
    readers, levels = [], []
    for i, (shape, offset) in enumerate(_bounded(level_dims, downsamples, bounds)):
        reader = TiffLevelReader(path, i, shape, offset, handles)
        readers.append(reader)
        levels.append(lazy_level(reader, props.get(f"tiffslide.level[{i}].tile-width"), f"pfmseg-tiff-{token}-{i}"))
    return {
        "levels": levels, "readers": readers, "downsamples": downsamples,
        "mpp": plausible_mpp(props.get("tiffslide.mpp-x") or _ome_mpp(props.get("tiff.ImageDescription")),
                             f"'{path}' metadata"),
        "bounds_offset": bounds[:2],
        "properties": {k: v for k, v in props.items()
                       if isinstance(v, (str, int, float)) and k != "tiffslide.comment"},
    }


# ---- OpenSlide -----------------------------------------------------------------------------------
def _openslide_target(path: Path) -> Path:
    """The file OpenSlide opens: ``path``, or for a DICOM folder one instance of it (OpenSlide finds the rest)."""
    if not path.is_dir():
        return path
    import openslide

    for entry in sorted(p for p in path.iterdir() if p.is_file()):
        if openslide.OpenSlide.detect_format(str(entry)) == "dicom":
            return entry
    raise SlideError(f"'{path}' is a folder without a DICOM WSI file OpenSlide recognises.")


def open_openslide_slide(path: Path) -> dict[str, Any]:
    target = _openslide_target(path)
    handle = open_openslide(target)
    try:
        props = dict(handle.properties)
        level_dims = [(int(w), int(h)) for w, h in handle.level_dimensions]
        downsamples = [float(d) for d in handle.level_downsamples]
        check_tiles(path, "openslide", _property_tiles(props, "openslide", len(level_dims)))
    except Exception:
        handle.close()
        raise
    bounds = _bounds(props, "openslide", *level_dims[0])
    handles = ThreadLocalHandles(lambda: open_openslide(target))
    handles.adopt(handle)
    token = _file_token(target, "openslide")
    readers, levels = [], []
    for i, (shape, offset) in enumerate(_bounded(level_dims, downsamples, bounds)):
        reader = OpenSlideLevelReader(target, i, shape, offset, handles, downsample=downsamples[i])
        tile = props.get(f"openslide.level[{i}].tile-width")
        readers.append(reader)
        levels.append(lazy_level(reader, int(tile) if tile else None, f"pfmseg-openslide-{token}-{i}"))
    return {
        "levels": levels, "readers": readers, "downsamples": downsamples,
        "mpp": plausible_mpp(props.get("openslide.mpp-x"), f"'{path}' metadata"),
        "bounds_offset": bounds[:2],
        "properties": {k: v for k, v in props.items() if k != "openslide.comment"},
    }


# ---- DICOM (wsidicom) -------------------------------------------------------------------------------
def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: Path, limit: int = 256) -> bool:
    """A folder holding DICOM files (``.dcm``, ``DICOMDIR`` or the DICM preamble), looking at ``limit`` entries."""
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        for n, entry in enumerate(entries):
            if n >= limit:
                break
            name = entry.name.lower()
            if entry.is_file() and (name.endswith(".dcm") or name == "dicomdir" or _has_dicom_magic(Path(entry.path))):
                return True
    return False


def dicom_series_files(path: Path) -> tuple[Path, ...]:
    """What wsidicom opens for ``path``: a folder as is; a file together with the other files of its series."""
    if path.is_dir():
        return (path,)
    import pydicom

    def series(file: Path) -> str | None:
        try:
            return str(pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                       .get("SeriesInstanceUID"))
        except Exception:
            return None

    uid = series(path)
    if uid is None:
        raise SlideError(f"'{path}' is not a DICOM file (no SeriesInstanceUID).")
    siblings = [p for p in sorted(path.parent.iterdir())
                if p.is_file() and p != path and (p.suffix.lower() == ".dcm" or _has_dicom_magic(p))]
    return (path, *(p for p in siblings if series(p) == uid))


def open_dicom_slide(path: Path) -> dict[str, Any]:
    files = dicom_series_files(path)
    handle = open_wsidicom(files)
    try:
        dicom_levels = sorted(handle.levels, key=lambda lvl: -lvl.size.width)
        if not dicom_levels:
            raise SlideError(f"'{path}' holds no DICOM WSI pyramid levels (VOLUME images).")
        width0, height0 = dicom_levels[0].size.width, dicom_levels[0].size.height
        try:
            mpp = plausible_mpp(handle.mpp.width, f"'{path}' pixel spacing")
        except Exception:  # no PixelSpacing in the series
            mpp = None
        tiles = [lvl.tile_size.width for lvl in dicom_levels]
        check_tiles(path, "dicom", {str(i): (int(lvl.tile_size.height), int(lvl.tile_size.width))
                                    for i, lvl in enumerate(dicom_levels)})
    except Exception:
        handle.close()
        raise
    handles = ThreadLocalHandles(lambda: open_wsidicom(files))
    handles.adopt(handle)
    stats = [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    token = tokenize(stats, "dicom")
    readers, levels, downsamples = [], [], []
    for i, lvl in enumerate(dicom_levels):
        width, height = lvl.size.width, lvl.size.height
        downsamples.append((width0 / width + height0 / height) / 2.0)  # as OpenSlide computes it
        reader = DicomLevelReader(files, i, (height, width), lvl.level, handles)
        readers.append(reader)
        levels.append(lazy_level(reader, tiles[i], f"pfmseg-dicom-{token}-{i}"))
    properties = {} if files[0].is_dir() else {"dicom.instances": len(files)}
    return {"levels": levels, "readers": readers, "downsamples": downsamples, "mpp": mpp,
            "bounds_offset": (0, 0), "properties": properties}


BACKENDS: dict[str, Backend] = {
    "tiffslide": Backend(
        "tiffslide", ("tiffslide",), "pip install tiffslide",
        "Aperio .svs, Hamamatsu .ndpi, generic/pyramidal .tif/.tiff, OME-TIFF, Leica .scn, .qptiff",
        open_tiffslide),
    "openslide": Backend(
        "openslide", ("openslide",), "pip install openslide-bin openslide-python",
        "MIRAX .mrxs, Hamamatsu .vms/.vmu/.ndpi, Leica .scn, Ventana .bif, Sakura .svslide, Zeiss .czi, "
        "Aperio .svs, Philips/Trestle/generic tiled .tif/.tiff, DICOM .dcm",
        open_openslide_slide),
    "dicom": Backend(
        "dicom", ("wsidicom",), "pip install wsidicom",
        "DICOM WSI: a folder holding one series, or one of its .dcm files",
        open_dicom_slide),
}


# ---- choosing a backend ------------------------------------------------------------------------
def sniff(path: Path) -> tuple[str, ...] | None:
    """Backends for a file or folder recognised by content (no or unknown suffix), else ``None``."""
    if path.is_dir():
        return DICOM_BACKENDS if is_dicom_folder(path) else None
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return DICOM_BACKENDS
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TIFF_BACKENDS
    if BACKENDS["openslide"].import_error() is None:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)):
            return ("openslide",)
    return None


def auto_backends(path: Path) -> tuple[str, ...] | None:
    """The backends ``reader="auto"`` tries for ``path``, in order (``None``: not a whole-slide file)."""
    if path.is_dir():
        return sniff(path)
    return AUTO_ORDER.get(path.suffix.lower()) or sniff(path)


def _probe(readers: list[Any]) -> None:
    """Decode one pixel of the coarsest level, so a corrupt file fails at open, not hours later."""
    last = readers[-1]
    height, width = last.shape[:2]
    if height and width:
        last[height // 2:height // 2 + 1, width // 2:width // 2 + 1]


def open_wsi(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Open ``path`` with the first of the backends ``names`` that reads it (and decodes a tile).

    Returns the Slide parts plus ``backend``; a :class:`SlideError` names every backend's failure,
    which backends are missing (with the pip command) and what each backend reads.
    """
    failures, missing = [], []
    for name in names:
        backend = BACKENDS[name]
        if backend.import_error() is not None:
            missing.append(backend)
            continue
        parts = None
        try:
            parts = backend.opener(path)
            _probe(parts["readers"])
        except PixelLimitError:  # what the file claims, not the backend: no other backend reads it better
            for reader in (parts or {}).get("readers", []):
                reader.close()
            raise
        except Exception as exc:
            for reader in (parts or {}).get("readers", []):
                reader.close()
            failures.append(f"{name} ({type(exc).__name__}: {exc})")
            log.debug("%s cannot read '%s': %s", name, path, exc)
            continue
        if name != names[0]:
            log.info("Opened '%s' with %s (%s).", path, name, "; ".join(failures) or "others not installed")
        parts["backend"] = name
        return parts
    kind = FORMAT_NAMES.get(path.suffix.lower(), "DICOM WSI folder" if path.is_dir() else "whole-slide file")
    if not failures:
        needed = " or ".join(f"{b.name} ({b.pip})" for b in missing)
        raise SlideError(f"'{path}' ({kind}) is read by {needed}, which is not installed; install it and retry.\n"
                         f"{describe_readers()}")
    absent = "".join(f" {b.name} is not installed ({b.pip})." for b in missing)
    hint = FORMAT_HINTS.get(path.suffix.lower(), "")
    raise SlideError(
        f"Cannot open '{path}' ({kind}): tried {'; '.join(failures)}.{absent} The file may be truncated, corrupt "
        f"or of another format.{hint}\n{describe_readers()}"
    )
