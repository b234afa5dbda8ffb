"""How much of each class a slide holds: areas, shares of tissue, connected regions, nucleus counts.

:func:`measure_output` reads a label store (the OME-Zarr that ``infer`` writes, or labels saved from
napari) chunk by chunk at its full resolution, so memory is a few chunks whatever the slide size, and
the numbers are exact:

* area per class in pixels, µm² and mm² (pixel area from the store's resolution);
* share of tissue: the class's area over the tissue area, where tissue is every labelled pixel
  (label > 0; label 0 is outside the tissue mask) that is not a background class (``background``,
  ``glass``, ... : :data:`BACKGROUND_NAMES`, or an explicit list); background classes get no share;
* connected regions per class (4-connected, as the GeoJSON export traces them): each chunk is labelled
  on its own and regions that cross chunk borders are joined with a union-find over the border pixels
  (connected components of the graph of touching border labels), so a region spanning many chunks is
  counted once; regions smaller than ``min_region_um2`` are not counted (their area still is);
* for nucleus-like classes (a name containing "nuclei"/"nucleus", or an explicit list): the count and
  mean area of the (counted) regions. Touching nuclei of one class merge into one region, so counts are
  those of the label image, not of instance segmentation.

QuPath's ignored classes (a name ending in "*": ``Ignore*``, ``Artefact*``, ...; or an explicit list)
are trained and predicted like any class but, as in QuPath, never measured: they get no row and their
pixels are not tissue.

:func:`write_measurements` writes ``<name>_measurements.csv`` beside ``<name>.ome.zarr``;
:func:`cohort_measurements` / :func:`write_cohort_measurements` combine several slides into one table
with a row per slide.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import csvsafe

#: Class names that are not tissue (case-insensitive, whole name).
BACKGROUND_NAMES = ("background", "glass", "no tissue", "not tissue", "empty", "outside")
#: A class whose name contains one of these words counts and averages its regions as nuclei.
NUCLEUS_WORDS = ("nuclei", "nucleus")

COLUMNS = ("slide", "class", "label", "area_px", "area_um2", "area_mm2", "share_of_tissue", "regions", "count",
           "mean_area_um2", "tissue_area_mm2", "mpp")


def is_nucleus_class(name: str, nucleus_classes: Sequence[str] | None = None) -> bool:
    if nucleus_classes is not None:
        return name in nucleus_classes
    return any(re.search(rf"\b{word}\b", name, re.IGNORECASE) for word in NUCLEUS_WORDS)


def is_unmeasured_class(name: str, ignored_classes: Sequence[str] | None = None) -> bool:
    """Whether a class is left out of the measurements: ``ignored_classes``, else QuPath's rule (ends in "*")."""
    if ignored_classes is not None:
        return name in ignored_classes
    from .geojson import is_ignored_class

    return is_ignored_class(name)


def is_background_class(name: str, background_classes: Sequence[str] | None = None) -> bool:
    if background_classes is not None:
        return name in background_classes
    return name.strip().lower() in BACKGROUND_NAMES


def _structure() -> np.ndarray:
    return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


class RegionCounter:
    """Connected regions of a label image fed chunk by chunk in row-major chunk order (exact across borders).

    Each chunk's regions get global ids; the last row of the previous chunk row and the last column of
    the previous chunk are kept, and touching pixels of the same class on either side of a border add
    an edge between their ids. :meth:`finish` joins the ids with a connected-components pass.
    """

    def __init__(self, width: int):
        self.width = int(width)
        self.classes: list[np.ndarray] = [np.zeros(1, np.uint8)]  # id 0: nothing
        self.sizes: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.count = 1
        self.edges: list[np.ndarray] = []
        self.bottom = np.zeros(self.width, np.int64)  # ids along the last row seen, per column
        self.bottom_values = np.zeros(self.width, np.uint8)  # and their label values
        self._right: tuple[np.ndarray, np.ndarray] | None = None
        self._row_y: int | None = None

    def add(self, y0: int, x0: int, block: np.ndarray) -> None:
        from scipy import ndimage

        ids = np.zeros(block.shape, np.int64)
        for value in np.unique(block):
            if value == 0:
                continue
            components, n = ndimage.label(block == value, structure=_structure())
            if n == 0:
                continue
            inside = components > 0
            ids[inside] = components[inside] + (self.count - 1)
            self.classes.append(np.full(n, value, np.uint8))
            self.sizes.append(np.bincount(components[inside], minlength=n + 1)[1:].astype(np.int64))
            self.count += n
        if self._row_y != y0:  # a new chunk row starts: no left neighbour
            self._row_y, self._right = y0, None
        w = block.shape[1]
        borders = []
        if y0 > 0:  # the chunk above: its last row against this chunk's first row
            borders.append((self.bottom[x0:x0 + w], self.bottom_values[x0:x0 + w], ids[0], block[0]))
        if self._right is not None and x0 > 0:  # the chunk to the left: its last column against the first
            borders.append((*self._right, ids[:, 0], block[:, 0]))
        for before, before_values, after, after_values in borders:
            touching = (before > 0) & (after > 0) & (before_values == after_values)
            if touching.any():
                self.edges.append(np.unique(np.stack([before[touching], after[touching]], 1), axis=0))
        self.bottom[x0:x0 + w] = ids[-1]
        self.bottom_values[x0:x0 + w] = block[-1]
        self._right = (ids[:, -1].copy(), np.asarray(block[:, -1], np.uint8).copy())

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(class value, size in pixels) of every region after joining across borders (id 0 excluded)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        classes, sizes = np.concatenate(self.classes), np.concatenate(self.sizes)
        n = self.count
        edges = np.concatenate(self.edges) if self.edges else np.zeros((0, 2), np.int64)
        graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
        groups, labels = connected_components(graph, directed=False)
        group_class = np.zeros(groups, np.uint8)
        group_class[labels] = classes
        group_size = np.bincount(labels, weights=sizes, minlength=groups).astype(np.int64)
        keep = np.ones(groups, bool)
        keep[labels[0]] = False  # the "nothing" id
        return group_class[keep], group_size[keep]


def measure_output(store: str | Path, *, nucleus_classes: Sequence[str] | None = None,
                   background_classes: Sequence[str] | None = None, min_region_um2: float = 0.0,
                   slide: str | None = None, ignored_classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per measured class of a label store (see the module docstring for every column's meaning).

    ``ignored_classes``: classes left out (None: QuPath's ignored classes, names ending in "*"; [] keeps all).
    """
    from ..errors import DataError
    from ..labelstore.omezarr import LabelOutput

    output = LabelOutput(store)
    names = output.class_names
    level = output.levels[0]
    height, width = (int(v) for v in level.shape)
    chunk_h, chunk_w = (int(v) for v in getattr(level, "chunks", (1024, 1024)))
    mpp = output.mpp
    pixel_um2 = mpp * mpp
    counts = np.zeros(256, np.int64)
    counter = RegionCounter(width)
    for y in range(0, height, chunk_h):
        for x in range(0, width, chunk_w):
            block = np.asarray(level[y:y + chunk_h, x:x + chunk_w])
            counts += np.bincount(block.ravel(), minlength=256)[:256]
            counter.add(y, x, block)
    if counts[len(names) + 1:].any():
        top = int(np.flatnonzero(counts)[-1])
        raise DataError(f"'{output.path}' holds label {top} but only {len(names)} classes are named; it is not a "
                        "complete pfmseg label store.")
    region_class, region_size = counter.finish()
    min_px = float(min_region_um2) / pixel_um2 if min_region_um2 else 0.0
    counted = region_size >= max(min_px, 1)
    unmeasured = {k for k, n in enumerate(names, start=1) if is_unmeasured_class(n, ignored_classes)}
    background = {k for k, n in enumerate(names, start=1) if is_background_class(n, background_classes)} | unmeasured
    tissue_px = int(sum(counts[k] for k in range(1, len(names) + 1) if k not in background))
    name = slide or output.path.name.removesuffix(".ome.zarr").removesuffix(".zarr")
    rows = []
    for k, class_name in enumerate(names, start=1):
        if k in unmeasured:
            continue
        area = int(counts[k])
        mine = (region_class == k) & counted
        regions = int(mine.sum())
        nucleus = is_nucleus_class(class_name, nucleus_classes)
        share = "" if k in background or not tissue_px else area / tissue_px
        mean = float(region_size[mine].mean()) * pixel_um2 if nucleus and regions else ""
        rows.append({"slide": name, "class": class_name, "label": k, "area_px": area,
                     "area_um2": area * pixel_um2, "area_mm2": area * pixel_um2 / 1e6, "share_of_tissue": share,
                     "regions": regions, "count": regions if nucleus else "", "mean_area_um2": mean,
                     "tissue_area_mm2": tissue_px * pixel_um2 / 1e6, "mpp": mpp})
    return rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else COLUMNS))
    buffer = io.StringIO()
    writer = csvsafe.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c, "")) for c in columns])
    return buffer.getvalue()


def _atomic_write(path: Path, text: str) -> Path:
    from ..storage import writing

    tmp = path.with_name(path.name + ".partial")
    with writing(path, "the measurements"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(text, encoding="utf-8")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)
    return path


def measurements_path(store: str | Path) -> Path:
    """``<name>_measurements.csv`` beside ``<name>.ome.zarr``."""
    store = Path(store)
    name = store.name.removesuffix(".ome.zarr").removesuffix(".zarr").removesuffix(".partial")
    return store.with_name(f"{name}_measurements.csv")


def write_measurements(store: str | Path, path: str | Path | None = None, **options: Any) -> Path:
    """Measure a label store (:func:`measure_output`, same options) and write the CSV atomically."""
    rows = measure_output(store, **options)
    return _atomic_write(Path(path) if path else measurements_path(store), rows_to_csv(rows, COLUMNS))


def read_measurements(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a per-slide measurements CSV (numbers as floats, empty cells as "")."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for written_key, written_value in row.items():
                key, value = csvsafe.restore(written_key), csvsafe.restore(written_value)  # names as given
                try:
                    parsed[key] = float(value) if value not in ("", None) and key not in ("slide", "class") else value
                except ValueError:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def cohort_measurements(items: Iterable[str | Path | Sequence[dict[str, Any]]], **options: Any
                        ) -> list[dict[str, Any]]:
    """One row per slide of several slides' measurements (stores, per-slide CSVs or rows).

    Columns: slide, tissue_area_mm2, then per class ``<class> area_mm2``, ``<class> share_of_tissue``,
    ``<class> regions`` and, for nucleus-like classes, ``<class> count`` and ``<class> mean_area_um2``;
    classes are the union over slides (in order of first appearance), a class absent from a slide is 0.
    """
    per_slide = []
    for item in items:
        if isinstance(item, (str, Path)):
            path = Path(item)
            per_slide.append(read_measurements(path) if path.suffix == ".csv" else measure_output(path, **options))
        else:
            per_slide.append(list(item))
    classes: list[str] = []
    nucleus: set[str] = set()
    for rows in per_slide:
        for row in rows:
            if row["class"] not in classes:
                classes.append(row["class"])
            if row.get("count") not in ("", None):
                nucleus.add(row["class"])
    table = []
    for rows in per_slide:
        if not rows:
            continue
        by_class = {row["class"]: row for row in rows}
        out: dict[str, Any] = {"slide": rows[0]["slide"], "tissue_area_mm2": rows[0]["tissue_area_mm2"]}
        for name in classes:
            row = by_class.get(name, {})
            out[f"{name} area_mm2"] = row.get("area_mm2", 0.0)
            out[f"{name} share_of_tissue"] = row.get("share_of_tissue", 0.0 if not row else "")
            out[f"{name} regions"] = row.get("regions", 0)
            if name in nucleus:
                out[f"{name} count"] = row.get("count", 0)
                out[f"{name} mean_area_um2"] = row.get("mean_area_um2", "")
        table.append(out)
    return table


def write_cohort_measurements(items: Iterable[str | Path | Sequence[dict[str, Any]]], path: str | Path,
                              **options: Any) -> Path:
    """:func:`cohort_measurements` written as one CSV (a row per slide)."""
    rows = cohort_measurements(items, **options)
    return _atomic_write(Path(path), rows_to_csv(rows))
