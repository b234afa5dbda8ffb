"""Cohort inputs: slide files, globs, folders and manifest CSVs, turned into one :class:`SlideJob` each.

``collect_slides(["a.svs", "cohort/", "more/*.ndpi", "manifest.csv"])`` accepts, mixed freely:

* a slide file (any format :func:`~pfmseg_engine.slides.open_slide` reads), a zarr store or a DICOM
  series folder;
* a folder: the slide files directly inside it (by the suffixes ``open_slide`` reads), plus zarr
  stores and DICOM series folders inside it; hidden files are skipped;
* a glob (``*``, ``?``, ``[...]``; ``**`` descends into sub-folders): every match, as above;
* a manifest, a ``.csv`` with a ``slide_path`` column and optional per-slide ``mpp``, ``name``,
  ``region`` ("x y w h" or "x,y,w,h" in level-0 pixels) and ``target_mpp`` columns (other columns are
  ignored, so a clinical table can serve as manifest). Relative paths resolve against the manifest's
  folder; empty cells mean "not given".

Nothing is opened while listing (only ``stat``, and manifests are read): an entry that is not a
regular file (a named pipe, a device, a dangling link or a symbolic link loop named like a slide) is
listed like any slide and refused with one line when its task opens it, so it fails alone and the
cohort goes on.

Paths become absolute (workers on other machines need them so). A slide given twice (same file and
region) is kept once, with a warning; two different slides that would write the same output name are
an error that says how to tell them apart.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, SlideError
from ..labelstore.detect import is_zarr
from ..paths import check_input_path

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide_path", "mpp", "name", "region", "target_mpp", "tissue_roi")
GLOB_CHARS = re.compile(r"[*?\[]")

Region = tuple[float, float, float, float]


@dataclass(frozen=True)
class SlideJob:
    """One slide of a cohort and its own settings (None: the run's default).

    ``path``: the slide (absolute); ``mpp``: level-0 microns per pixel, for slides without it;
    ``name``: output name (default: the slide's, plus the region); ``region``: (x, y, width, height)
    in level-0 pixels; ``target_mpp``: resolution to predict at; ``tissue_roi``: the slide's own tissue
    mask or region of interest (a QuPath GeoJSON, label store or mask image); ``source``: where it was listed.
    """

    path: str
    mpp: float | None = None
    name: str | None = None
    region: Region | None = None
    target_mpp: float | None = None
    tissue_roi: str | None = None
    source: str | None = None

    @property
    def label(self) -> str:
        """How people call this slide in messages: its name, else its file name (plus the region)."""
        if self.name:
            return self.name
        label = Path(self.path).name
        if self.region:
            label += " [" + " ".join(f"{v:g}" for v in self.region) + "]"
        return label

    def output_stem(self) -> str:
        """The output's name as far as it is known before planning (regions add their position)."""
        from ..slides.formats import slide_name

        if self.name:
            return self.name
        stem = slide_name(Path(self.path))
        if self.region:  # as plan_slide names it when the region lies on whole output pixels
            x, y, w, h = self.region
            stem += f"_x{x:g}_y{y:g}_{w:g}x{h:g}"
        return stem


def parse_region(value: str | Sequence[float] | None, where: str = "region") -> Region | None:
    """(x, y, w, h) from "x y w h", "x,y,w,h" or a sequence of four numbers; None for empty."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        parts = [p for p in re.split(r"[,;\s]+", value.strip()) if p]
    else:
        parts = list(value)
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers) or numbers[2] <= 0 or numbers[3] <= 0 \
            or numbers[0] < 0 or numbers[1] < 0:
        raise ConfigError(f"{where}: '{value}' is not a region; write four numbers 'x y w h' (or 'x,y,w,h') in "
                          "level-0 pixels, with x, y >= 0 and a positive width and height.")
    return numbers


def _positive(value: str | None, column: str, where: str) -> float | None:
    if value is None or not str(value).strip():
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{where}: {column} '{value}' is not a positive number of microns per pixel.")
    return number


def read_manifest(path: str | Path) -> list[SlideJob]:
    """The slides a manifest CSV lists (see the module docstring), paths resolved against its folder."""
    path = check_input_path(Path(path).expanduser().absolute(), "Manifest", error=ConfigError)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
            if "slide_path" not in fields:
                found = ", ".join(f for f in fields if f) or "none"
                raise ConfigError(
                    f"Manifest '{path}' has no 'slide_path' column (columns: {found}). A manifest is a CSV with "
                    f"a header row: slide_path and optional {', '.join(MANIFEST_COLUMNS[1:])}.")
            rows = [{(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else v
                     for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise ConfigError(f"Cannot read manifest '{path}': {exc.strerror or exc}.") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"Manifest '{path}' is not a readable CSV file ({exc}).") from exc
    jobs = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"Manifest '{path}' line {line}"
        slide = row.get("slide_path") or ""
        if not slide:
            if any(row.values()):
                raise ConfigError(f"{where}: the slide_path cell is empty.")
            continue
        slide_path = Path(slide).expanduser()
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        name = row.get("name") or None
        if name and (os.sep in name or "/" in name or name in (".", "..")):
            raise ConfigError(f"{where}: name '{name}' must be a plain file name (no folders).")
        roi = (row.get("tissue_roi") or "").strip() or None
        if roi is not None and not Path(roi).expanduser().is_absolute():
            roi = str(path.parent / roi)
        jobs.append(SlideJob(path=str(slide_path), mpp=_positive(row.get("mpp"), "mpp", where), name=name,
                             region=parse_region(row.get("region"), where),
                             target_mpp=_positive(row.get("target_mpp"), "target_mpp", where),
                             tissue_roi=roi, source=f"{path.name}:{line}"))
    if not jobs:
        raise ConfigError(f"Manifest '{path}' lists no slides.")
    return jobs


def is_slide_folder(path: Path) -> bool:
    """A folder that is one slide: a zarr store, or a DICOM series (holds .dcm files)."""
    if path.suffix.lower() == ".zarr" or is_zarr(path):
        return True
    try:
        return any(child.suffix.lower() == ".dcm" for child in path.iterdir())
    except OSError:
        return False


def folder_slides(folder: Path) -> list[Path]:
    """The slides directly inside ``folder`` (files by suffix, zarr stores, DICOM series folders), sorted."""
    from ..slides.formats import SUFFIXES

    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if is_slide_folder(child):
                found.append(child)
        elif child.suffix.lower() in SUFFIXES and child.suffix.lower() != ".dcm":
            found.append(child)
    return found


def _listed(path: Path) -> bool:
    """Whether ``path`` names something, be it only a link: a dangling or looping link is still a listed
    slide, kept so that it fails alone (with what it is) when it is opened, not the whole collection."""
    return path.exists() or path.is_symlink()


def _expand(item: str) -> list[SlideJob]:
    """The slides one input names (without the run's defaults)."""
    path = Path(item).expanduser()
    if path.suffix.lower() == ".csv" and not path.is_dir() and _listed(path):
        return read_manifest(path)  # refuses a manifest that is not a regular file, before opening it
    if path.is_dir() and not is_slide_folder(path):
        slides = folder_slides(path)
        if not slides:
            from ..slides.formats import SUFFIXES

            raise ConfigError(f"Folder '{path}' holds no slides (looked for {', '.join(sorted(SUFFIXES))}, zarr "
                              "stores and DICOM series folders).")
        return [SlideJob(path=str(p.absolute()), source=str(path)) for p in slides]
    if _listed(path):
        return [SlideJob(path=str(path.absolute()), source=item)]
    if GLOB_CHARS.search(item):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise ConfigError(f"'{item}' matches no file; check the pattern (quote it so the shell leaves it alone).")
        return [job for match in matches for job in _expand(match)]
    raise SlideError(f"Slide '{item}' does not exist.")


def collect_slides(items: Iterable[str | Path | SlideJob], *, mpp: float | None = None,
                   region: Sequence[float] | None = None, target_mpp: float | None = None,
                   tissue_roi: str | Path | None = None) -> list[SlideJob]:
    """Every slide the ``items`` name (files, globs, folders, manifests or :class:`SlideJob`), in order.

    ``mpp``, ``region``, ``target_mpp`` and ``tissue_roi`` are the defaults for slides whose manifest
    row does not give them. Duplicates (same file and region) are kept once, where first listed, with a warning; a
    manifest row's settings fill in what the other listing lacks (a slide in a folder and in a
    manifest gets the manifest's mpp). Two slides that would write the same output name raise a
    :class:`ConfigError`.
    """
    region = parse_region(region, "region") if region is not None else None
    jobs: list[SlideJob] = []
    for item in items:
        jobs += [item] if isinstance(item, SlideJob) else _expand(str(item))
    return unique_jobs([SlideJob(path=job.path, mpp=job.mpp if job.mpp is not None else mpp, name=job.name,
                                 region=job.region if job.region is not None else region,
                                 target_mpp=job.target_mpp if job.target_mpp is not None else target_mpp,
                                 tissue_roi=job.tissue_roi if job.tissue_roi is not None else
                                 (str(tissue_roi) if tissue_roi is not None else None),
                                 source=job.source) for job in merge_duplicates(jobs)])


def merge_duplicates(jobs: Sequence[SlideJob]) -> list[SlideJob]:
    """``jobs`` with each (file, region) once, where first listed, settings merged (warned about)."""
    kept: dict[tuple[str, Region | None], SlideJob] = {}
    for job in jobs:
        key = (os.path.realpath(job.path), job.region)
        first = kept.get(key)
        if first is None:
            kept[key] = job
            continue
        log.warning("Slide '%s' is listed more than once (%s and %s); predicting it once.", job.path,
                    first.source or first.path, job.source or job.path)
        merged = {}
        for field in ("mpp", "name", "target_mpp", "tissue_roi"):
            old, new = getattr(first, field), getattr(job, field)
            if old is None and new is not None:
                merged[field] = new
            elif new is not None and new != old:
                log.warning("Slide '%s': %s %s (%s) differs from %s (%s); using the first.", job.path, field, old,
                            first.source or first.path, new, job.source or job.path)
        if merged:
            kept[key] = dataclasses.replace(first, **merged)
    return list(kept.values())


def unique_jobs(jobs: Sequence[SlideJob]) -> list[SlideJob]:
    """``jobs`` without repeats (see :func:`merge_duplicates`); a ConfigError when two slides claim one
    output name."""
    names: dict[str, SlideJob] = {}
    kept = merge_duplicates(jobs)
    for job in kept:
        stem = job.output_stem()
        if stem in names:
            other = names[stem]
            raise ConfigError(
                f"Slides '{other.path}' and '{job.path}' would both write '{stem}.ome.zarr'. Give them different "
                "names (a 'name' column in a manifest) or predict them into separate output folders.")
        names[stem] = job
    return kept


__all__ = ["MANIFEST_COLUMNS", "SlideJob", "collect_slides", "folder_slides", "merge_duplicates", "parse_region",
           "read_manifest", "unique_jobs"]
