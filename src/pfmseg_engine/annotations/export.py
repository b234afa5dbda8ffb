"""Labels out as GeoJSON that QuPath imports: per class or per connected region, with holes, areas and ids.

Outlines follow pixel edges (4-connected regions, holes kept, collinear vertices dropped), so the area
QuPath computes from an exported polygon (the shoelace formula over its coordinates) is exactly the
region's pixel count, and rasterising the outline again (a pixel belongs where its centre lies inside)
gives the same labels. Coordinates are scaled to slide level-0 pixels.

A tile is traced in a few numpy passes, not region by region: every pixel side between two different
components is an edge, directed clockwise around its pixel; edges are linked end to start within their
component into rings (where two pixels of one component touch only at a corner, each ring turns around
the background's corner, so no ring touches itself and a hole meeting the outline at a corner stays a
separate ring: valid polygons for QuPath's JTS), rings are ordered by pointer doubling and straight-on
vertices dropped; the largest ring of a component is its outline, the others its holes.

Labels of any size: :func:`trace_regions` walks them tile by tile (a label store: chunk by chunk) and
traces each tile's regions. A piece that reaches the tile's right or bottom edge stays *open* on the
frontier between finished and pending tiles; pieces of the same class that touch across a tile edge are
joined (a union-find over the edge pixels), and a region is emitted, its pieces unioned exactly (integer
pixel-edge coordinates), as soon as no pixel of it lies on the frontier. Memory holds a tile, one row
and one column of frontier pixels and the open pieces, whatever the slide size; :func:`write_regions`
streams the features to the file as they come (per-class MultiPolygons are spooled per class).

Each feature is a QuPath object: a stable ``id`` (a UUID derived from what was exported - the labels'
identity, the class and the region's first pixel in raster order - so exporting again gives the same
ids), ``objectType`` "annotation" (editable regions) or "detection" (many small objects such as nuclei,
drawn fast), ``classification`` with name and colour, and ``measurements`` in QuPath's format (name ->
value): "pfmseg: area µm^2" (the pixel count in µm², or "pfmseg: area px^2" in level-0 pixels when the
resolution is unknown) and, per class, "pfmseg: regions". The prefix keeps them apart from QuPath's own
"Area µm^2", which QuPath computes from the outline (and which equals ours).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import ConfigError

OBJECT_TYPES = ("annotation", "detection")
MEASUREMENT_PREFIX = "pfmseg: "
#: UUID namespace of exported objects (their ids are uuid5 of this and what identifies the region)
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "pfmseg:geojson-export")
DEFAULT_TILE = 1024  # tile side when walking an in-memory array (a tile costs tens of bytes per pixel)


def signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def polygon_area(polygon: Sequence[np.ndarray]) -> float:
    """Area of an (outer ring, holes...) polygon in its own units squared (what QuPath computes)."""
    return abs(signed_area(polygon[0])) - sum(abs(signed_area(h)) for h in polygon[1:])


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices where the ring goes straight on (lossless for traced pixel outlines)."""
    closed = ring[:-1]
    step = np.diff(np.vstack([closed[-1:], closed, closed[:1]]), axis=0)
    before, after = step[:-1], step[1:]
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    keep = np.abs(cross) > 1e-9
    kept = closed[keep] if keep.any() else closed[:1]
    return np.vstack([kept, kept[:1]])


def _oriented(rings: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outer ring first with negative, holes with positive shoelace area (opposite windings, as GeoJSON
    asks; QuPath accepts either)."""
    outer, holes = rings[0], rings[1:]
    outer = outer if signed_area(outer) < 0 else outer[::-1]
    return [outer, *(h if signed_area(h) > 0 else h[::-1] for h in holes)]


# --- one tile ----------------------------------------------------------------------------------------------
def _components(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, values, firsts): 4-connected components of every nonzero value of a tile, numbered 1..n, with
    each one's label value and first pixel in raster order (flat index); index 0 is unused."""
    from scipy import ndimage

    ids = np.zeros(block.shape, np.int32)
    count = 0
    for value in np.unique(block):
        if value == 0:
            continue
        components, found = ndimage.label(block == value)
        inside = components > 0
        ids[inside] = components[inside] + count
        count += found
    flat = ids.ravel()
    values = np.zeros(count + 1, block.dtype)
    values[flat] = block.ravel()
    firsts = np.full(count + 1, flat.size, np.int64)
    np.minimum.at(firsts, flat, np.arange(flat.size, dtype=np.int64))
    return ids, values, firsts


def _boundary_edges(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every pixel side between two different components (or a component and nothing), directed clockwise
    around its pixel on screen (y down): top sides go right, right sides down, bottom left, left up."""
    padded = np.pad(ids, 1)
    sides = {0: padded[:-2, 1:-1], 1: padded[1:-1, 2:], 2: padded[2:, 1:-1], 3: padded[1:-1, :-2]}
    start = {0: (0, 0), 1: (1, 0), 2: (1, 1), 3: (0, 1)}  # (dx, dy) of the start corner from the pixel's
    parts: dict[str, list[np.ndarray]] = {"row": [], "col": [], "direction": [], "sx": [], "sy": []}
    for direction, neighbour in sides.items():
        rows, cols = (v.astype(np.int32) for v in np.nonzero((ids > 0) & (ids != neighbour)))
        dx, dy = start[direction]
        parts["row"].append(rows)
        parts["col"].append(cols)
        parts["direction"].append(np.full(len(rows), direction, np.int8))
        parts["sx"].append(cols + dx)
        parts["sy"].append(rows + dy)
    edges = {key: np.concatenate(value) for key, value in parts.items()}
    step = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)], np.int32)[edges["direction"]]
    edges["ex"], edges["ey"] = edges["sx"] + step[:, 0], edges["sy"] + step[:, 1]
    edges["id"] = ids[edges["row"], edges["col"]]
    edges["pixel"] = edges["row"] * ids.shape[1] + edges["col"]
    return edges


def _successors(edges: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The next edge of each edge along its component's boundary.

    Where two pixels of one component touch only at a corner, two of its edges end there and two start:
    each continues with the edge of the *other* pixel, so the rings turn around the background's corner
    and never touch themselves (a hole meeting the outline there stays a separate ring, as OGC asks).
    """
    corners = shape[1] + 1
    per_id = (shape[0] + 1) * corners  # keys: (component, corner) as one int64
    start = edges["id"].astype(np.int64) * per_id + edges["sy"] * corners + edges["sx"]
    end = edges["id"].astype(np.int64) * per_id + edges["ey"] * corners + edges["ex"]
    order = np.argsort(start, kind="stable").astype(np.int32)  # a tile has fewer than 2**31 edges
    ordered = start[order]
    at = np.searchsorted(ordered, end)
    successor = order[at]
    second = np.minimum(at + 1, len(order) - 1)
    pinch = (ordered[second] == end) & (second != at) & (edges["pixel"][successor] == edges["pixel"])
    successor[pinch] = order[second[pinch]]
    return successor


def _cycle_order(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ring, position) of every edge: the ring is named by its smallest edge index, positions count from it
    (pointer doubling, so a tile costs a few numpy passes however long its outlines are)."""
    n = len(successor)
    ring, jump = np.arange(n, dtype=successor.dtype), successor.copy()
    for _ in range(max(1, n.bit_length())):
        ring = np.minimum(ring, ring[jump])
        jump = jump[jump]
    last = successor == ring  # the edge before the ring's first: where the walk ends
    to_end = (~last).astype(successor.dtype)
    hop = np.where(last, np.arange(n, dtype=successor.dtype), successor)
    for _ in range(max(1, n.bit_length())):
        to_end = to_end + to_end[hop]
        hop = hop[hop]
    return ring, to_end[ring] - to_end


def _tile_polygons(ids: np.ndarray, y0: int, x0: int) -> dict[int, list[np.ndarray]]:
    """Pixel-edge polygon (outer ring, then holes; closed (x, y) rings in array coordinates, outer ring
    with negative and holes with positive shoelace area) of every component of a tile, by component id."""
    edges = _boundary_edges(ids)
    if not len(edges["id"]):
        return {}
    successor = _successors(edges, ids.shape)
    ring, position = _cycle_order(successor)
    previous = np.empty_like(successor)
    previous[successor] = np.arange(len(successor), dtype=successor.dtype)
    corner = edges["direction"][previous] != edges["direction"]  # straight-on vertices are dropped
    order = np.lexsort((-position, ring))  # backwards: outer rings anticlockwise on screen (< 0), holes > 0
    order = order[corner[order]]
    rings = ring[order]
    starts = np.flatnonzero(np.r_[True, rings[1:] != rings[:-1]])
    ends = np.r_[starts[1:], len(rings)]
    closed = np.insert(order, ends, order[starts])  # each ring's first vertex again at its end
    xy = np.stack([edges["sx"][closed] + x0, edges["sy"][closed] + y0], 1).astype(np.float64)
    starts, ends = starts + np.arange(len(starts)), ends + np.arange(1, len(ends) + 1)
    x, y = xy[:, 0], xy[:, 1]
    cross = np.r_[x[:-1] * y[1:] - x[1:] * y[:-1], 0.0]
    cross[ends - 1] = 0.0  # no term from one ring's last vertex to the next ring's first
    area = 0.5 * np.add.reduceat(cross, starts)
    owner = edges["id"][closed[starts]]
    polygons: dict[int, list[np.ndarray]] = {}
    for k in np.lexsort((area, owner)).tolist():  # each component's outer ring (most negative area) first
        polygons.setdefault(int(owner[k]), []).append(xy[starts[k]:ends[k]])
    return polygons


def _shapely_polygons(geometry: Any) -> list[list[np.ndarray]]:
    parts = getattr(geometry, "geoms", [geometry])
    return [_oriented([drop_collinear(np.asarray(r.coords)) for r in (p.exterior, *p.interiors)])
            for p in parts if not p.is_empty]


@dataclass
class Region:
    """One 4-connected region of one label value, traced along pixel edges."""

    value: int
    polygon: list[np.ndarray]  # outer ring, then holes: (x, y) pixel corners of the traced array
    pixels: int
    first: tuple[int, int]  # (y, x) of its first pixel in raster order


@dataclass
class _Piece:
    """A region, or the part of it traced so far (open while it reaches the frontier)."""

    value: int
    parts: list[list[np.ndarray]]
    pixels: int
    first: tuple[int, int]
    ids: list[int]
    frontier: int = 0  # frontier pixels (row and column entries) that belong to it

    def regions(self) -> list[Region]:
        if len(self.parts) == 1:
            return [Region(self.value, self.parts[0], self.pixels, self.first)]
        import shapely

        merged = shapely.union_all([shapely.Polygon(p[0], p[1:]) for p in self.parts])
        polygons = _shapely_polygons(merged)
        if len(polygons) == 1:  # always, for pieces joined across pixel edges
            return [Region(self.value, polygons[0], self.pixels, self.first)]
        return [Region(self.value, p, round(polygon_area(p)), _first_pixel(p)) for p in polygons]


def _first_pixel(polygon: Sequence[np.ndarray]) -> tuple[int, int]:
    """(y, x) of a pixel-edge polygon's first pixel in raster order: the leftmost corner on its top edge."""
    ring = polygon[0]
    top = ring[:, 1].min()
    return int(top), int(ring[ring[:, 1] == top, 0].min())


def _trace_tile(block: np.ndarray, y0: int, x0: int, next_id: int) -> tuple[list[np.ndarray], dict[int, _Piece]]:
    """Connected components of every label value of a tile, numbered from ``next_id``: (their ids along the
    tile's top row, left column, bottom row and right column (0: none), id -> piece)."""
    local, values, firsts = _components(block)
    count = len(values) - 1
    polygons = _tile_polygons(local, y0, x0)
    sizes = np.bincount(local.ravel(), minlength=count + 1)
    first_y, first_x = np.divmod(firsts, block.shape[1])
    pieces = {next_id + k - 1: _Piece(int(values[k]), [polygons[k]], int(sizes[k]),
                                      (y0 + int(first_y[k]), x0 + int(first_x[k])), [next_id + k - 1])
              for k in range(1, count + 1)}
    lines = [local[0], local[:, 0], local[-1], local[:, -1]]
    return [np.where(line > 0, line.astype(np.int64) + (next_id - 1), 0) for line in lines], pieces


# --- all tiles ---------------------------------------------------------------------------------------------
def _counts(ids: np.ndarray) -> Iterator[tuple[int, int]]:
    values, counts = np.unique(ids[ids > 0], return_counts=True)
    return zip(values.tolist(), counts.tolist(), strict=True)


class RegionTracer:
    """Regions of an (H, W) labels array fed tile by tile in raster order, joined across tile edges.

    :meth:`add` takes the next tile and returns the regions it completed; the frontier is the bottom row
    of the tiles done in each column and the right column of the last tile.
    """

    def __init__(self, shape: tuple[int, int], dtype: Any = np.int64):
        self.height, self.width = (int(v) for v in shape)
        self.top_ids = np.zeros(self.width, np.int64)  # frontier row: ids of the pixels above the next tile
        self.top_values = np.zeros(self.width, dtype)
        self.left_ids = np.zeros(0, np.int64)  # frontier column: ids of the pixels left of the next tile
        self.left_values = np.zeros(0, dtype)
        self.parent: dict[int, int] = {}
        self.pieces: dict[int, _Piece] = {}  # open pieces by root id
        self.next_id = 1

    def find(self, pid: int) -> int:
        root = pid
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[pid] != root:  # path compression
            self.parent[pid], pid = root, self.parent[pid]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if len(self.pieces[ra].ids) < len(self.pieces[rb].ids):
            ra, rb = rb, ra
        keep, gone = self.pieces[ra], self.pieces.pop(rb)
        self.parent[rb] = ra
        keep.parts += gone.parts
        keep.ids += gone.ids
        keep.pixels += gone.pixels
        keep.frontier += gone.frontier
        keep.first = min(keep.first, gone.first)

    def add(self, block: np.ndarray, y0: int, x0: int) -> list[Region]:
        """Trace the tile at (y0, x0) (tiles come row by row, left to right) and return the finished regions."""
        h, w = block.shape
        (top, left, bottom, right), new = _trace_tile(block, y0, x0, self.next_id)
        self.next_id += len(new)
        last_row, last_col = y0 + h >= self.height, x0 + w >= self.width
        bottom = bottom * (not last_row)  # the slide's edge is no frontier
        right = right * (not last_col)
        for pid, count in (*_counts(bottom), *_counts(right)):
            new[pid].frontier += count
        for pid in new:
            self.parent[pid] = pid
        self.pieces.update(new)
        candidates = set(new)
        old = [self.top_ids[x0:x0 + w]] + ([self.left_ids] if x0 > 0 else [])
        self._join(top, left, block, y0, x0)
        for pid, count in _counts(np.concatenate(old)):  # these frontier pixels are behind us now
            root = self.find(pid)
            self.pieces[root].frontier -= count
            candidates.add(root)
        self.top_ids[x0:x0 + w] = bottom
        self.top_values[x0:x0 + w] = block[-1] * (not last_row)
        self.left_ids = right
        self.left_values = block[:, -1] * (not last_col)
        return self._finished(candidates)

    def _join(self, top: np.ndarray, left: np.ndarray, block: np.ndarray, y0: int, x0: int) -> None:
        """Union this tile's pieces (ids along its top row and left column) with the open ones they touch."""
        pairs = []
        if y0 > 0:
            above = self.top_ids[x0:x0 + len(top)]
            same = (above > 0) & (self.top_values[x0:x0 + len(top)] == block[0])
            pairs.append(np.stack([above[same], top[same]], 1))
        if x0 > 0:
            same = (self.left_ids > 0) & (self.left_values == block[:, 0])
            pairs.append(np.stack([self.left_ids[same], left[same]], 1))
        if pairs:
            for a, b in np.unique(np.concatenate(pairs), axis=0).tolist():
                self.union(a, b)

    def _finished(self, candidates: Iterable[int]) -> list[Region]:
        done = []
        for root in {self.find(pid) for pid in candidates}:
            piece = self.pieces[root]
            if piece.frontier == 0:
                del self.pieces[root]
                for pid in piece.ids:
                    del self.parent[pid]
                done += piece.regions()
            else:  # still open: own its rings, so that the tile's arrays they view can go
                piece.parts = [[ring if ring.base is None else ring.copy() for ring in part] for part in piece.parts]
        return done


def tile_boxes(shape: tuple[int, int], tile: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of the tiles of an (H, W) array in raster order."""
    (height, width), (th, tw) = shape, tile
    return [(y, min(y + th, height), x, min(x + tw, width))
            for y in range(0, height, th) for x in range(0, width, tw)]


def trace_regions(labels: Any, *, tile: int | tuple[int, int] | None = None,
                  progress: Callable[[int], None] | None = None) -> Iterator[Region]:
    """Every 4-connected region of every nonzero value of ``labels`` (numpy, zarr, dask: anything sliceable),
    read one tile at a time (default: the array's chunks, else 1024 px squares), each region exactly once
    whatever the tiling. ``progress`` is called with 1 after each tile.
    """
    dims = tuple(int(v) for v in labels.shape)
    if len(dims) != 2:
        raise ConfigError(f"GeoJSON export takes an (H, W) labels array, got shape {dims}.")
    shape = (dims[0], dims[1])
    given: int | Sequence[int] | None = tile
    if given is None:
        chunks = getattr(labels, "chunks", None)
        given = tuple(int(c) for c in chunks) if chunks and all(isinstance(c, int) for c in chunks) else DEFAULT_TILE
    size = (int(given), int(given)) if isinstance(given, int) else cast("tuple[int, int]", tuple(int(t) for t in given))
    tracer = RegionTracer(shape, getattr(labels, "dtype", np.int64))
    for y0, y1, x0, x1 in tile_boxes(shape, size):
        yield from tracer.add(np.asarray(labels[y0:y1, x0:x1]), y0, x0)
        if progress is not None:
            progress(1)


def class_regions(mask: np.ndarray, min_area: float = 4.0) -> list[tuple[list[np.ndarray], int]]:
    """(polygon, pixel count) of every 4-connected component of a boolean mask with at least ``min_area``
    pixels (polygon: outer ring, then holes; (x, y) pixel-edge coordinates)."""
    regions = trace_regions(np.asarray(mask, dtype=np.uint8))
    return [(r.polygon, r.pixels) for r in sorted(regions, key=lambda r: r.first) if r.pixels >= min_area]


def class_polygons(mask: np.ndarray, min_area: float = 4.0) -> list[list[np.ndarray]]:
    """Polygons of a boolean mask's 4-connected components (see :func:`class_regions`)."""
    return [polygon for polygon, _ in class_regions(mask, min_area)]


# --- regions as QuPath features ----------------------------------------------------------------------------
def _measurements(area_px: float, mpp: float | None) -> dict[str, float]:
    if mpp:
        return {f"{MEASUREMENT_PREFIX}area µm^2": round(area_px * mpp * mpp, 4)}
    return {f"{MEASUREMENT_PREFIX}area px^2": round(area_px, 4)}


@dataclass(frozen=True)
class FeatureStyle:
    """How regions become QuPath features: classes, coordinate frame, object type, measurements and ids.

    ``scale`` is slide level-0 pixels per label pixel and ``offset`` the (x, y) level-0 pixel where label
    pixel (0, 0)'s corner lies; ``mpp`` the slide's level-0 micrometres per pixel (areas in µm²);
    ``identity`` names what is exported (a store, a layer) in the features' ids; regions of fewer than
    ``min_pixels`` label pixels are left out.
    """

    class_names: tuple[str, ...]
    colours: Mapping[int, Sequence[int]] = field(default_factory=dict)
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    mpp: float | None = None
    per_region: bool = False
    object_type: str = "annotation"
    measurements: bool = True
    identity: str = ""
    min_pixels: float = 4.0

    def __post_init__(self) -> None:
        if self.object_type not in OBJECT_TYPES:
            raise ConfigError(f"GeoJSON object type '{self.object_type}' is not one of {', '.join(OBJECT_TYPES)}.")

    def wanted(self, region: Region) -> bool:
        return 1 <= region.value <= len(self.class_names) and region.pixels >= self.min_pixels

    def properties(self, value: int) -> dict[str, Any]:
        from ..colors import class_palette

        colour = self.colours.get(value)
        if colour is None:
            colour = class_palette(len(self.class_names), None, self.class_names)[value - 1]
        name = self.class_names[value - 1]
        properties: dict[str, Any] = {"objectType": self.object_type,
                                      "classification": {"name": name, "color": [int(v) for v in list(colour)[:3]]}}
        if self.object_type == "annotation":
            properties.update(name=name, isLocked=False)
        return properties

    def coordinates(self, polygon: Sequence[np.ndarray]) -> list[list[list[float]]]:
        shift = (float(self.offset[0]), float(self.offset[1]))
        return [np.round(ring * self.scale + shift, 2).tolist() for ring in polygon]

    def feature_id(self, value: int, first: tuple[int, int] | None = None) -> str:
        """Same labels, class and first pixel (or the class feature: ``first=None``) -> the same UUID."""
        where = "class" if first is None else f"{first[0]},{first[1]}"
        return str(uuid.uuid5(ID_NAMESPACE, f"{self.identity}|{self.class_names[value - 1]}|{value}|{where}"))

    def area(self, pixels: float) -> float:
        """Label pixels -> level-0 px² (exact: the regions' pixel counts)."""
        return pixels * self.scale * self.scale

    def region_feature(self, region: Region) -> dict[str, Any]:
        properties = self.properties(region.value)
        if self.measurements:
            properties["measurements"] = _measurements(self.area(region.pixels), self.mpp)
        return {"type": "Feature", "id": self.feature_id(region.value, region.first),
                "geometry": {"type": "Polygon", "coordinates": self.coordinates(region.polygon)},
                "properties": properties}

    def class_feature(self, value: int, coordinates: Any, pixels: int, count: int) -> dict[str, Any]:
        properties = self.properties(value)
        if self.measurements:
            properties["measurements"] = {**_measurements(self.area(pixels), self.mpp),
                                          f"{MEASUREMENT_PREFIX}regions": float(count)}
        return {"type": "Feature", "id": self.feature_id(value),
                "geometry": {"type": "MultiPolygon", "coordinates": coordinates}, "properties": properties}


def regions_to_features(regions: Iterable[Region], style: FeatureStyle) -> Iterator[dict[str, Any]]:
    """Features of regions in memory: one per region, or one MultiPolygon per class (in class order)."""
    if style.per_region:
        yield from (style.region_feature(r) for r in regions if style.wanted(r))
        return
    by_class: dict[int, list[Region]] = {}
    for region in regions:
        if style.wanted(region):
            by_class.setdefault(region.value, []).append(region)
    for value in sorted(by_class):
        found = sorted(by_class[value], key=lambda r: r.first)
        yield style.class_feature(value, [style.coordinates(r.polygon) for r in found],
                                  sum(r.pixels for r in found), len(found))


class _FeatureFile:
    """A FeatureCollection written feature by feature to ``<path>.partial``, renamed when complete; an
    ``OSError`` while writing becomes a :class:`StorageError` naming the file, and nothing torn is left."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.tmp = path.with_name(path.name + ".partial")
        self.count = 0
        self.handle: Any = None

    def __enter__(self) -> _FeatureFile:
        from ..storage import writing

        with writing(self.path, self.what):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.tmp.open("w", encoding="utf-8")
        try:
            with writing(self.path, self.what):
                self.handle.write('{"type": "FeatureCollection", "features": [\n')
        except BaseException as error:
            self.__exit__(type(error), error, None)
            raise
        return self

    def add(self, text: str, rest: Iterable[str] = ()) -> None:
        """Append one feature's JSON text (``rest``: more pieces of the same feature)."""
        from ..storage import writing

        with writing(self.path, self.what):
            self.handle.write((",\n" if self.count else "") + text)
            for piece in rest:
                self.handle.write(piece)
        self.count += 1

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        from ..storage import writing

        try:
            if kind is None:
                with writing(self.path, self.what):
                    self.handle.write("\n]}\n")
                    self.handle.close()
                    self.tmp.replace(self.path)
        finally:
            if not self.handle.closed:
                with contextlib.suppress(OSError):  # the error that got us here is the one to report
                    self.handle.close()
            self.tmp.unlink(missing_ok=True)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def write_regions(regions: Iterable[Region], path: str | Path, style: FeatureStyle,
                  what: str = "the GeoJSON export") -> Path:
    """Stream regions to a GeoJSON FeatureCollection as they come (atomically, see :class:`_FeatureFile`).

    Per region, each feature is written when its region is; per class, each class's polygons go to a
    temporary spool file and the MultiPolygon features are written at the end, so memory never holds
    more than the regions in flight.
    """
    path = Path(path)
    with _FeatureFile(path, what) as out:
        if not style.per_region:
            _write_classes(regions, style, out)
            return path
        for region in regions:
            if style.wanted(region):
                out.add(_dumps(style.region_feature(region)))
    return path


def _write_classes(regions: Iterable[Region], style: FeatureStyle, out: _FeatureFile) -> None:
    from ..storage import writing

    totals: dict[int, list[int]] = {}  # value -> [pixels, regions]
    marker = "\x00coordinates\x00"
    with contextlib.ExitStack() as stack:
        spools: dict[int, Any] = {}
        for region in regions:
            if not style.wanted(region):
                continue
            with writing(out.path, out.what):
                if region.value not in spools:
                    spools[region.value] = stack.enter_context(tempfile.SpooledTemporaryFile(
                        max_size=1 << 20, mode="w+", encoding="utf-8", dir=str(out.path.parent)))
                    totals[region.value] = [0, 0]
                total = totals[region.value]
                spools[region.value].write(("," if total[1] else "") + _dumps(style.coordinates(region.polygon)))
            total[0] += region.pixels
            total[1] += 1
        for value in sorted(spools):
            head, _, tail = _dumps(style.class_feature(value, marker, *totals[value])).partition(_dumps(marker))
            spools[value].seek(0)
            out.add(head + "[", itertools.chain(_chunks(spools[value]), ["]" + tail]))


def _chunks(handle: Any, size: int = 1 << 20) -> Iterator[str]:
    while text := handle.read(size):
        yield text


def labels_identity(labels: np.ndarray) -> str:
    """An identity of an in-memory labels array for feature ids: its shape and a hash of its pixels."""
    import hashlib

    # numpy arrays are buffers; numpy's stubs for Python 3.10 do not declare it
    digest = hashlib.blake2b(np.ascontiguousarray(labels), digest_size=16).hexdigest()  # type: ignore[arg-type]
    return f"array:{labels.shape[0]}x{labels.shape[1]}:{digest}"


def _style(labels: np.ndarray, *, class_names: Sequence[str], colours: Mapping[int, Sequence[int]] | None = None,
           scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0), mpp: float | None = None,
           per_region: bool = False, object_type: str = "annotation", min_area_px: float = 4.0,
           measurements: bool = True, identity: str | None = None) -> FeatureStyle:
    return FeatureStyle(tuple(class_names), dict(colours or {}), float(scale), (float(offset[0]), float(offset[1])),
                        mpp, per_region, object_type, measurements,
                        identity if identity is not None else labels_identity(labels), float(min_area_px))


def labels_to_features(labels: np.ndarray, *, class_names: Sequence[str],
                       colours: Mapping[int, Sequence[int]] | None = None, scale: float = 1.0,
                       offset: tuple[float, float] = (0.0, 0.0), mpp: float | None = None,
                       per_region: bool = False, object_type: str = "annotation", min_area_px: float = 4.0,
                       measurements: bool = True, identity: str | None = None) -> list[dict[str, Any]]:
    """QuPath GeoJSON features of an (H, W) labels array (0 = nothing, k = ``class_names[k-1]``).

    One MultiPolygon feature per class, or with ``per_region`` one Polygon feature per connected region;
    regions smaller than ``min_area_px`` label pixels are left out; ``identity`` names the labels in the
    feature ids (default: a hash of the pixels). The rest as in :class:`FeatureStyle`.
    """
    labels = np.asarray(labels)
    style = _style(labels, class_names=class_names, colours=colours, scale=scale, offset=offset, mpp=mpp,
                   per_region=per_region, object_type=object_type, min_area_px=min_area_px,
                   measurements=measurements, identity=identity)
    return list(regions_to_features(trace_regions(labels), style))


def write_geojson(features: Sequence[dict[str, Any]], path: str | Path, what: str = "the GeoJSON export") -> Path:
    """Write a FeatureCollection atomically (a temporary file, then rename)."""
    path = Path(path)
    with _FeatureFile(path, what) as out:
        for feature in features:
            out.add(_dumps(feature))
    return path


def labels_to_geojson(labels: np.ndarray, path: str | Path, **options: Any) -> Path:
    """:func:`labels_to_features` streamed to ``path`` (napari: a labels layer as QuPath annotations)."""
    labels = np.asarray(labels)
    return write_regions(trace_regions(labels), path, _style(labels, **options))
