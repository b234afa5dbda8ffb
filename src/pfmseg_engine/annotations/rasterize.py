"""Polygons to sparse labels at a chosen resolution, one requested box at a time.

:class:`PolygonLabels` is a lazy (H, W) uint8 array (0 = not annotated, k = class k-1, napari's
convention) of a slide at ``downsample`` level-0 pixels per pixel: slicing it rasterises only the
polygons that touch the requested box (an STR-tree finds them, each is clipped to the box first), so a
whole-slide label image never exists in memory and the sparse patch sampler, the validation crops and
anything else that slices arrays read it like a numpy array.

A pixel belongs to a polygon when its *centre* lies inside (even-odd rule over the outline and its
holes; a centre exactly on a left or top edge is inside, on a right or bottom edge outside), so a
rectangle from x=96 to x=160 level-0 pixels covers exactly the pixels 96..159 at full resolution and
rasterising the same outline in adjacent tiles gives the same pixels as rasterising it at once.

:class:`StoreLabels` does the same for an OME-Zarr label store written by ``write_labels`` (napari
annotations saved by the plugin, or a prediction): nearest-neighbour resampling of its finest level
not coarser than the requested resolution, read box by box, class values remapped through a table.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive

if TYPE_CHECKING:
    import zarr


def _box(box: Sequence[float]) -> Box:
    y0, y1, x0, x1 = (int(v) for v in box)
    return (y0, y1, x0, x1)


def _slices(key: Any, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    if not isinstance(key, tuple):
        key = (key, slice(None))
    if len(key) != 2 or not all(isinstance(k, slice) for k in key):
        raise TypeError("lazy label arrays take two slices, e.g. labels[y0:y1, x0:x1]")
    (y0, y1, ys), (x0, x1, xs) = (k.indices(n) for k, n in zip(key, shape, strict=True))
    if ys != 1 or xs != 1:
        raise TypeError("lazy label arrays take slices with step 1")
    return y0, max(y0, y1), x0, max(x0, x1)


def _crossings(a: np.ndarray, b: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat index row * (width + 1) + col, edge) of every crossing of edges a->b with pixel-centre rows."""
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    first = np.maximum(np.ceil(ylo), 0).astype(np.int64)
    stop = np.minimum(np.ceil(yhi), height).astype(np.int64)
    count = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(a)), count)
    offsets = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    rows = first[edge] + offsets
    ax, ay, bx, by = a[edge, 0], a[edge, 1], b[edge, 0], b[edge, 1]
    x = ax + (rows - ay) * (bx - ax) / (by - ay)
    cols = np.clip(np.ceil(x), 0, width).astype(np.int64)
    return rows * (width + 1) + cols, edge


def fill_edges(a: np.ndarray, b: np.ndarray, height: int, width: int, winding: bool = False) -> np.ndarray:
    """Boolean (height, width) mask of pixel centres inside the closed outlines made of edges ``a[i] -> b[i]``.

    Points are (x, y) in a frame where pixel (r, c) has its centre at (c, r). Each edge contributes one
    crossing per pixel row it spans (half-open in y), toggling the state from the first pixel centre at
    or right of the crossing. ``winding=False``: even-odd rule (one polygon with its holes, any
    orientation); ``winding=True``: non-zero winding (outlines counter-clockwise and holes clockwise in
    (x, y), see :func:`oriented`), so overlapping polygons unite instead of cancelling.
    """
    mask = np.zeros((height, width), bool)
    if height <= 0 or width <= 0 or not len(a):
        return mask
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    flat, edge = _crossings(a, b, height, width)
    if not len(flat):
        return mask
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    # every closed ring crosses each pixel row as often upwards as downwards (even-odd: an even number of
    # times), so a running total over the sorted crossings is back at zero at the end of every row
    if winding:
        state = np.cumsum(np.where(b[:, 1] > a[:, 1], 1, -1)[edge][order]) != 0
    else:
        state = (np.arange(1, len(flat) + 1) & 1).astype(bool)
    inside = np.flatnonzero(state[:-1])
    starts, stops = flat[inside], flat[inside + 1]  # same row: the row's last crossing closes every span
    lengths = stops - starts
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    total = int(lengths.sum())
    if total == 0:
        return mask
    if total * 8 < height * width:  # few pixels inside (small objects): address them directly
        pixels = np.repeat(starts, lengths) + (np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        rows, cols = np.divmod(pixels, width + 1)
        mask[rows, cols] = True
        return mask
    steps = np.zeros(height * (width + 1), np.int8)
    np.add.at(steps, starts, 1)
    np.add.at(steps, starts + lengths, -1)
    mask[:] = (np.cumsum(steps.reshape(height, width + 1), axis=1, dtype=np.int8) > 0)[:, :width]
    return mask


def fill_rings(rings: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of the pixel centres inside ``rings`` (even-odd rule).

    ``rings`` are (n, 2) arrays of (x, y) in a frame where pixel (r, c) has its centre at (c, r); an
    unclosed ring is closed.
    """
    starts, ends = [], []
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        if len(ring) < 3:
            continue
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        starts.append(ring[:-1])
        ends.append(ring[1:])
    if not starts:
        return np.zeros((max(height, 0), max(width, 0)), bool)
    return fill_edges(np.concatenate(starts), np.concatenate(ends), height, width)


def edges_of(geometries: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Every ring edge of many (Multi)Polygons at once: (start points, end points), vectorised in shapely."""
    import shapely

    parts = shapely.get_parts(np.asarray(geometries, dtype=object))
    rings = shapely.get_rings(parts)
    coords, index = shapely.get_coordinates(rings, return_index=True)
    same = index[1:] == index[:-1]
    return coords[:-1][same], coords[1:][same]


def oriented(geometry: Any) -> Any:
    """``geometry`` with outlines counter-clockwise and holes clockwise in (x, y) (for the winding rule)."""
    import shapely

    return shapely.orient_polygons(geometry, exterior_cw=False)


def geometry_rings(geometry: Any) -> list[np.ndarray]:
    """Every ring (outlines and holes) of a (Multi)Polygon as (n, 2) coordinate arrays."""
    polygons = getattr(geometry, "geoms", [geometry])
    rings = []
    for polygon in polygons:
        if polygon.is_empty or not hasattr(polygon, "exterior"):
            continue
        rings.append(np.asarray(polygon.exterior.coords))
        rings.extend(np.asarray(hole.coords) for hole in polygon.interiors)
    return rings


#: Objects at most this many pixels across are drawn together, per class (nuclei, cells).
SMALL = 64


def rasterize(geometries: Sequence[Any], values: Sequence[int], box: Box, out: np.ndarray | None = None,
              small: Sequence[bool] | None = None) -> np.ndarray:
    """Labels of the pixel box ``(y0, y1, x0, x1)`` from geometries already in pixel units (centres at integers).

    Geometries are drawn in order (a later one overwrites an earlier one where they overlap); value 0
    clears. A large one is clipped to the box and filled within its own bounding box; a run of
    consecutive ``small`` ones with the same value (oriented with :func:`oriented`) is filled in one
    vectorised pass with the winding rule, so thousands of nuclei cost what their area costs.
    """
    import shapely

    y0, y1, x0, x1 = box
    height, width = y1 - y0, x1 - x0
    if out is None:
        out = np.zeros((height, width), np.uint8)
    small = [False] * len(geometries) if small is None else list(small)
    i = 0
    while i < len(geometries):
        if small[i]:
            j = i
            while j < len(geometries) and small[j] and values[j] == values[i]:
                j += 1
            a, b = edges_of(geometries[i:j])
            inside = fill_edges(a - (x0, y0), b - (x0, y0), height, width, winding=True)
            out[inside] = values[i]
            i = j
            continue
        geometry, value = geometries[i], values[i]
        i += 1
        gx0, gy0, gx1, gy1 = geometry.bounds
        c0, c1 = max(x0, math.ceil(gx0)), min(x1, math.ceil(gx1))
        r0, r1 = max(y0, math.ceil(gy0)), min(y1, math.ceil(gy1))
        if c1 <= c0 or r1 <= r0:
            continue
        if gx0 < x0 - 1 or gy0 < y0 - 1 or gx1 > x1 + 1 or gy1 > y1 + 1:
            geometry = shapely.clip_by_rect(geometry, c0 - 1, r0 - 1, c1 + 1, r1 + 1)
        rings = [ring - (c0, r0) for ring in geometry_rings(geometry)]
        inside = fill_rings(rings, r1 - r0, c1 - c0)
        out[r0 - y0:r1 - y0, c0 - x0:c1 - x0][inside] = value
    return out


class LazyLabels(ABC):
    """What every lazy label source shares: reads by box or slice, and hold-out boxes read as 0.

    Subclasses hold ``shape``, ``excluded`` (boxes of this array's pixels) and ``read(box)``, which
    ends with :meth:`clear_excluded`.
    """

    shape: tuple[int, int]
    excluded: list[Box]

    @abstractmethod
    def read(self, box: Box) -> np.ndarray:
        """The labels of ``box`` (y0, y1, x0, x1) as uint8, held-out boxes cleared."""

    def clear_excluded(self, out: np.ndarray, box: Box) -> np.ndarray:
        """``out`` (the pixels of ``box``) with the held-out boxes set to 0 (not annotated)."""
        y0, y1, x0, x1 = box
        for ey0, ey1, ex0, ex1 in self.excluded:
            r0, r1, c0, c1 = max(y0, ey0), min(y1, ey1), max(x0, ex0), min(x1, ex1)
            if r1 > r0 and c1 > c0:
                out[r0 - y0:r1 - y0, c0 - x0:c1 - x0] = 0
        return out

    def with_excluded(self, boxes: Sequence[Box]) -> LazyLabels:
        """The same labels with ``boxes`` (pixels of this array) cleared: the training side of a hold-out."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__getstate__())
        clone.excluded = [*self.excluded, *(_box(b) for b in boxes)]
        return clone

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.read(_slices(key, self.shape))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.read((0, self.shape[0], 0, self.shape[1]))
        return whole.astype(dtype) if dtype is not None else whole


class PolygonLabels(LazyLabels):
    """A lazy (H, W) uint8 label array of polygons at ``downsample`` level-0 pixels per pixel.

    ``geometries`` are shapely (Multi)Polygons in slide level-0 pixels with their label ``values``
    (0 = clear: the classes the "prefix" ``ignore_classes`` rule does not train). Where areas of
    different classes overlap the smaller one wins (a small tumour island drawn inside a large stroma
    region stays tumour), whatever the drawing order; small objects (at most :data:`SMALL` pixels
    across: nuclei, cells) are drawn after the large areas, class by class; areas of value 0 clear
    everything under them. ``excluded`` boxes (validation hold-out, in this array's pixels)
    read as 0. Picklable (the tree is rebuilt where it is used), so data-loader workers can read it.
    """

    ndim = 2
    dtype = np.dtype(np.uint8)

    def __init__(self, geometries: Sequence[Any], values: Sequence[int], shape: tuple[int, int],
                 downsample: float, excluded: Sequence[Box] = (), name: str = "annotations"):
        import shapely

        if len(geometries) != len(values):
            raise ValueError("one label value per geometry")
        self.shape = (int(shape[0]), int(shape[1]))
        self.downsample = float(downsample)
        self.name = name
        d = self.downsample
        # level-0 (x, y) -> pixel units with pixel centres at integer coordinates
        scaled = [oriented(shapely.transform(g, lambda xy: xy / d - 0.5)) for g in geometries]
        areas = np.array([g.area for g in scaled], float)
        bounds = np.array([g.bounds for g in scaled], float).reshape(-1, 4)
        is_small = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]) <= SMALL
        # draw order: trained classes, large ones largest first, then small objects grouped by class; ignored
        # areas (value 0) last over everything
        order = sorted(range(len(scaled)), key=lambda i: (values[i] == 0, bool(is_small[i]),
                                                          values[i] if is_small[i] else -areas[i]))
        self.geometries = [scaled[i] for i in order]
        self.values = [int(values[i]) for i in order]
        self.small = [bool(is_small[i]) for i in order]
        self.excluded = [_box(b) for b in excluded]
        self._tree = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tree": None}

    @property
    def tree(self) -> Any:
        if self._tree is None:
            from shapely import STRtree

            self._tree = STRtree(self.geometries)
        return self._tree


    def hits(self, box: Box) -> np.ndarray:
        """Indices of geometries whose bounding boxes touch a pixel box (sorted in draw order)."""
        from shapely.geometry import box as make_box

        y0, y1, x0, x1 = box
        return np.sort(self.tree.query(make_box(x0 - 1, y0 - 1, x1 + 1, y1 + 1)))

    def read(self, box: Box) -> np.ndarray:
        y0, y1, x0, x1 = box
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        if out.size == 0:
            return out
        found = self.hits(box)
        if len(found):
            rasterize([self.geometries[i] for i in found], [self.values[i] for i in found], box, out,
                      small=[self.small[i] for i in found])
        return self.clear_excluded(out, box)

    def candidate_blocks(self, block: int) -> list[Box]:
        """The ``block``-sized squares of a grid over this array that a trained polygon's bounding box touches
        (a superset of the squares holding annotations; found from the tree, no raster), row by row."""
        import shapely

        height, width = self.shape
        rows, cols = math.ceil(height / block), math.ceil(width / block)
        boxes = [(r * block, min(height, (r + 1) * block), c * block, min(width, (c + 1) * block))
                 for r in range(rows) for c in range(cols)]
        if not boxes:
            return []
        shapes = shapely.box(*np.asarray([(x0 - 1, y0 - 1, x1 + 1, y1 + 1) for y0, y1, x0, x1 in boxes]).T)
        cell, geometry = self.tree.query(shapes)
        trained = np.asarray(self.values)[geometry] != 0 if len(geometry) else np.zeros(0, bool)
        return [boxes[i] for i in np.unique(cell[trained])]

    def annotated_cells(self, block: int) -> list[Box]:
        """The ``block``-sized squares of a grid over this array that hold a trained annotation, row by row.

        Found from the geometries: a square counts when a polygon of a trained class intersects it; where an
        ignored area or a hold-out touches the square, its pixels are checked too.
        """
        import shapely

        height, width = self.shape
        cells: set[int] = set()
        cols = math.ceil(width / block)
        for i, value in enumerate(self.values):
            if value == 0:
                continue
            gx0, gy0, gx1, gy1 = self.geometries[i].bounds
            r0, r1 = max(0, math.floor((gy0 + 0.5) / block)), min(math.ceil(height / block),
                                                                 math.floor((gy1 + 0.5) / block) + 1)
            c0, c1 = max(0, math.floor((gx0 + 0.5) / block)), min(cols, math.floor((gx1 + 0.5) / block) + 1)
            index = np.array([r * cols + c for r in range(r0, r1) for c in range(c0, c1)], np.int64)
            if not len(index):
                continue
            ys, xs = index // cols * block, index % cols * block
            shapes = shapely.box(xs - 0.5, ys - 0.5, np.minimum(width, xs + block) - 0.5,
                                 np.minimum(height, ys + block) - 0.5)
            cells.update(index[shapely.intersects(self.geometries[i], shapes)].tolist())
        boxes = [(k // cols * block, min(height, (k // cols + 1) * block), k % cols * block,
                  min(width, (k % cols + 1) * block)) for k in sorted(cells)]
        clearing = [g for g, v in zip(self.geometries, self.values, strict=True) if v == 0]
        checked = []
        for box in boxes:
            y0, y1, x0, x1 = box
            touched = any(ey0 < y1 and ey1 > y0 and ex0 < x1 and ex1 > x0 for ey0, ey1, ex0, ex1 in self.excluded)
            if not touched and clearing:
                cell = shapely.box(x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)
                touched = any(g.intersects(cell) for g in clearing)
            if not touched or self.read(box).any():  # ignored areas or hold-outs may cover a square whole
                checked.append(box)
        return checked


class StoreLabels(LazyLabels):
    """A label store (``write_labels`` / inference OME-Zarr) resampled to a slide grid, read lazily.

    The grid has ``shape`` pixels of ``downsample`` slide level-0 pixels; pixel centres are mapped into
    the finest store level not coarser than that (nearest neighbour), so a store written at the training
    resolution is read exactly. ``lut`` maps store label values to training labels (0 = not annotated).
    """

    ndim = 2
    dtype = np.dtype(np.uint8)

    def __init__(self, store: Any, shape: tuple[int, int], downsample: float, lut: Sequence[int] | None = None,
                 excluded: Sequence[Box] = ()):
        from ..labelstore.omezarr import LabelOutput

        self.path = str(store.path if isinstance(store, LabelOutput) else store)
        output = store if isinstance(store, LabelOutput) else LabelOutput(store)
        self.shape = (int(shape[0]), int(shape[1]))
        self.downsample = float(downsample)
        base = output.downsample
        self.level = max([k for k in range(len(output.levels)) if base * 2**k <= self.downsample * (1 + 1e-6)] or [0])
        self.store_downsample = base * 2**self.level
        self.store_shape = tuple(int(v) for v in output.levels[self.level].shape)
        self.offset = output.region_offset  # (y, x) level-0 px of the store's pixel (0, 0)
        table = np.zeros(256, np.uint8)
        if lut is None:
            table[:] = np.arange(256, dtype=np.uint8)
        else:
            table[:len(lut)] = np.asarray(lut, np.uint8)
        self.lut = table
        self.excluded = [_box(b) for b in excluded]
        self._array: zarr.Array | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> Any:
        if self._array is None:
            import zarr

            self._array = cast("zarr.Array", zarr.open_group(self.path, mode="r")[str(self.level)])
        return self._array


    def _index(self, start: int, stop: int, axis: int) -> np.ndarray:
        centres = (np.arange(start, stop) + 0.5) * self.downsample - self.offset[axis]
        return np.floor(centres / self.store_downsample).astype(np.int64)

    def read(self, box: Box) -> np.ndarray:
        y0, y1, x0, x1 = box
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        if out.size == 0:
            return out
        rows, cols = self._index(y0, y1, 0), self._index(x0, x1, 1)
        row_ok = (rows >= 0) & (rows < self.store_shape[0])
        col_ok = (cols >= 0) & (cols < self.store_shape[1])
        if row_ok.any() and col_ok.any():
            r0, r1 = int(rows[row_ok].min()), int(rows[row_ok].max()) + 1
            c0, c1 = int(cols[col_ok].min()), int(cols[col_ok].max()) + 1
            block = np.asarray(self.array[r0:r1, c0:c1])
            picked = block[np.ix_(rows[row_ok] - r0, cols[col_ok] - c0)]
            out[np.ix_(np.flatnonzero(row_ok), np.flatnonzero(col_ok))] = self.lut[picked]
        return self.clear_excluded(out, box)

    def annotated_cells(self, block: int, step: int = 4096) -> list[Box]:
        """The ``block``-sized grid squares holding annotations, scanning a few thousand pixels at a time."""
        height, width = self.shape
        step = block * max(1, step // block)
        boxes = []
        for y in range(0, height, step):
            for x in range(0, width, step):
                chunk = self.read((y, min(height, y + step), x, min(width, x + step)))
                if not chunk.any():
                    continue
                for by in range(y, min(height, y + step), block):
                    for bx in range(x, min(width, x + step), block):
                        if chunk[by - y:by - y + block, bx - x:bx - x + block].any():
                            boxes.append((by, min(height, by + block), bx, min(width, bx + block)))
        return sorted(boxes)
