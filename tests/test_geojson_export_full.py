"""GeoJSON export of whole label stores in QuPath's terms: every region at full resolution, read chunk by
chunk in bounded memory, joined exactly across chunk borders, outlined along pixel edges (QuPath's polygon
area equals the pixel count) and with ids that stay the same when exported again."""

from __future__ import annotations

import json
import tracemalloc
import uuid

import numpy as np
import pytest
import shapely
from scipy import ndimage

from pfmseg_engine.annotations.export import polygon_area
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.inference import LabelOutput, export_geojson
from pfmseg_engine.inference.geojson_export import pick_level
from pfmseg_engine.labelstore.omezarr import write_labels

MPP = 0.5


# --- helpers -----------------------------------------------------------------------------------------------
class Nuclei:
    """A lazily drawn (H, W) label image of 3 x 3 px nuclei (value 1) centred on ``centres``: write_labels
    reads it chunk by chunk, so the test never holds the dense image while writing the store."""

    def __init__(self, centres: np.ndarray, shape: tuple[int, int]):
        self.centres, self.shape, self.dtype = centres, shape, np.dtype(np.uint8)
        step = np.arange(-1, 2)
        self.dy, self.dx = (a.ravel() for a in np.meshgrid(step, step, indexing="ij"))

    def __getitem__(self, key):
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape, strict=True))
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        near = self.centres[(self.centres[:, 1] >= x0 - 1) & (self.centres[:, 1] <= x1)]
        ys, xs = (near[:, :1] + self.dy).ravel() - y0, (near[:, 1:] + self.dx).ravel() - x0
        inside = (ys >= 0) & (ys < out.shape[0]) & (xs >= 0) & (xs < out.shape[1])
        out[ys[inside], xs[inside]] = 1
        return out


def nucleus_centres(height: int, width: int, chunk: int, step: int = 48) -> np.ndarray:
    """A grid of nuclei plus nuclei centred on every chunk border (straddling 2 chunks) and every chunk corner
    (straddling 4); any two centres are at least 4 px apart in x or y, so no two nuclei touch."""
    found = {(step // 2 + step * i, step // 2 + step * j) for i in range(height // step) for j in range(width // step)}
    found |= {(step * i, x) for i in range(1, height // step) for x in range(chunk, width, chunk)}
    found |= {(y, step * j) for y in range(chunk, height, chunk) for j in range(1, width // step)}
    found |= {(y, x) for y in range(chunk, height, chunk) for x in range(chunk, width, chunk)}
    return np.array(sorted(found))


def features_of(path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def shape_of(feature: dict):
    return shapely.geometry.shape(feature["geometry"])


def qupath_area(geometry: dict) -> float:
    """The area QuPath computes: the shoelace formula over the exported coordinates (outline minus holes)."""
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return sum(polygon_area([np.asarray(ring, float) for ring in polygon]) for polygon in polygons)


def pixels_inside(geometry, shape: tuple[int, int]) -> np.ndarray:
    """Which pixels of an (H, W) image have their centre inside the geometry (how QuPath rasterises)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return shapely.contains_xy(geometry, xs + 0.5, ys + 0.5)


def assert_one_feature_per_region(features: list[dict], labels: np.ndarray, names: list[str]) -> None:
    """Each 4-connected region of each class is exactly one exported Polygon covering exactly its pixels."""
    expected = {}
    for value, name in enumerate(names, start=1):
        components, count = ndimage.label(labels == value)
        for k in range(1, count + 1):
            expected[(name, *np.argwhere(components == k)[0])] = components == k
    assert len(features) == len(expected)
    for feature in features:
        geometry = shape_of(feature)
        assert feature["geometry"]["type"] == "Polygon" and geometry.is_valid
        inside = pixels_inside(geometry, labels.shape)
        first = tuple(np.argwhere(inside)[0])
        region = expected.pop((feature["properties"]["classification"]["name"], *first))
        assert np.array_equal(inside, region)
        assert qupath_area(feature["geometry"]) == region.sum()  # exact, not within 1 %
        assert feature["properties"]["measurements"] == {"pfmseg: area µm^2": pytest.approx(region.sum() * MPP**2)}
    assert not expected


# --- whole-slide width: every nucleus once, memory of a few chunks -----------------------------------------
def test_a_40k_wide_store_exports_every_nucleus_once_in_the_memory_of_a_few_chunks(tmp_path):
    height, width, chunk = 512, 40_960, 256
    centres = nucleus_centres(height, width, chunk)
    store = write_labels(tmp_path / "wide.ome.zarr", Nuclei(centres, (height, width)), class_names=["Nucleus"],
                         mpp=MPP, chunk=chunk)
    assert LabelOutput(store).levels[0].shape == (height, width)
    tiny = write_labels(tmp_path / "tiny.ome.zarr", np.ones((4, 4), np.uint8), class_names=["Nucleus"], mpp=MPP)
    export_geojson(tiny, tmp_path / "tiny.geojson")  # imports and caches out of the measurement

    tracemalloc.start()
    try:
        path = export_geojson(store, tmp_path / "wide.geojson", per_region=True, object_type="detection")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    features = features_of(path)
    found = np.array(sorted(tuple(np.asarray(shape_of(f).centroid.coords[0])[::-1] - 0.5) for f in features))
    assert len(features) == len(centres) > 10_000
    assert np.abs(found - centres).max() < 1e-9  # every nucleus exactly once, straddling ones included
    assert all(qupath_area(f["geometry"]) == 9 for f in features)
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    # a tile's working arrays (tens of bytes per pixel of a chunk) plus the frontier row across the slide
    budget = 64 * chunk * chunk + 32 * width
    dense = height * width  # the level as uint8, before any labelling of it
    assert budget < dense / 3
    assert peak < budget, f"peak {peak / 1e6:.1f} MB, budget {budget / 1e6:.1f} MB"
    # the stored labels themselves agree with the nuclei drawn (a check of the test's own store)
    assert ndimage.label(LabelOutput(store).levels[0][:])[1] == len(centres)


# --- regions across 1 to 4 chunk borders ---------------------------------------------------------------------
def border_shapes() -> np.ndarray:
    """64 x 64 labels, chunk borders every 16 px: rings and holes across borders and corners, a U joined only
    in the next chunk row, a bar across 3 borders, a hole touching its outline at a corner, diagonal
    neighbours that stay apart, an island of another class in a hole."""
    labels = np.zeros((64, 64), np.uint8)
    labels[24:41, 24:41] = 1  # a ring around the 4-chunk corner (32, 32), its hole across the same corner
    labels[29:36, 29:36] = 0
    labels[31:34, 31:34] = 2  # an island of class 2 in the hole
    labels[2:16, 2:5] = 1  # a U: two arms in chunk (0, 0), joined by its base in chunk (1, 0)
    labels[2:16, 9:12] = 1
    labels[16:19, 2:12] = 1
    labels[50:53, :] = 2  # a bar across 3 vertical borders
    labels[44:49, 44:49] = 1  # a square with a hole (46, 46) that touches its outline at a corner only
    labels[46, 46] = 0
    labels[45, 45] = 0
    labels[44, 44] = 0
    labels[15, 30] = labels[16, 31] = 2  # diagonal neighbours across a border: two regions
    labels[0:8, 56:64] = 2  # at the store's edge: across no frontier
    labels[8:10, 14:18] = 2  # straddles one border
    return labels


@pytest.mark.parametrize("tile", [16, 7, None])
def test_regions_across_chunk_borders_are_each_one_polygon_with_their_holes(tmp_path, tile):
    labels = border_shapes()
    store = write_labels(tmp_path / "b.ome.zarr", labels, class_names=["a", "b"], mpp=MPP, chunk=16)
    path = export_geojson(store, tmp_path / "b.geojson", per_region=True, min_area=1, tile=tile)
    features = features_of(path)
    assert_one_feature_per_region(features, labels, ["a", "b"])
    ring = next(f for f in features if shape_of(f).bounds == (24.0, 24.0, 41.0, 41.0))
    assert len(ring["geometry"]["coordinates"]) == 2  # outline + hole, one polygon across 4 chunks
    assert len(ring["geometry"]["coordinates"][0]) == 5  # collinear vertices at the chunk borders dropped


@pytest.mark.parametrize("seed", [0, 1])
def test_every_exported_polygon_has_the_area_of_its_pixels(tmp_path, seed):
    rng = np.random.default_rng(seed)
    labels = ndimage.median_filter(rng.integers(0, 4, (150, 230)).astype(np.uint8), 5)
    labels[rng.random(labels.shape) < 0.02] = 3  # specks and diagonal touches
    store = write_labels(tmp_path / "r.ome.zarr", labels, class_names=["a", "b", "c"], mpp=MPP, chunk=32)
    regions = export_geojson(store, tmp_path / "r.geojson", per_region=True, min_area=1, tile=23)
    assert_one_feature_per_region(features_of(regions), labels, ["a", "b", "c"])

    classes = export_geojson(store, tmp_path / "c.geojson", min_area=1, tile=23)
    by_name = {f["properties"]["classification"]["name"]: f for f in features_of(classes)}
    for value, name in enumerate(["a", "b", "c"], start=1):
        feature = by_name[name]
        assert feature["geometry"]["type"] == "MultiPolygon"
        assert qupath_area(feature["geometry"]) == (labels == value).sum()
        assert np.array_equal(pixels_inside(shape_of(feature), labels.shape), labels == value)
        assert feature["properties"]["measurements"] == {
            "pfmseg: area µm^2": pytest.approx((labels == value).sum() * MPP**2),
            "pfmseg: regions": float(ndimage.label(labels == value)[1])}


def test_a_coarser_level_scales_to_level_0_pixels_and_keeps_the_area(tmp_path):
    labels = np.zeros((128, 128), np.uint8)
    labels[32:96, 16:80] = 1
    store = write_labels(tmp_path / "s.ome.zarr", labels, class_names=["a"], mpp=MPP, slide_mpp=0.25, chunk=32)
    [full] = features_of(export_geojson(store, tmp_path / "0.geojson"))
    [coarse] = features_of(export_geojson(store, tmp_path / "1.geojson", mpp=1.0))  # level 1: 1 µm/px
    for feature in (full, coarse):  # slide level-0 pixels (0.25 µm) whatever the level traced
        assert shape_of(feature).bounds == (32.0, 64.0, 160.0, 192.0)
        assert qupath_area(feature["geometry"]) * 0.25**2 == feature["properties"]["measurements"][
            "pfmseg: area µm^2"] == 64 * 64 * MPP**2


# --- ids ---------------------------------------------------------------------------------------------------
def test_ids_are_uuids_stable_across_exports_and_tilings_and_unique(tmp_path):
    labels = border_shapes()
    store = write_labels(tmp_path / "i.ome.zarr", labels, class_names=["a", "b"], mpp=MPP, chunk=16)
    first = features_of(export_geojson(store, tmp_path / "1.geojson", per_region=True, min_area=1))
    export_geojson(store, tmp_path / "2.geojson", per_region=True, min_area=1)
    tiled = features_of(export_geojson(store, tmp_path / "3.geojson", per_region=True, min_area=1, tile=7))
    ids = [f["id"] for f in first]
    assert len(set(ids)) == len(ids) == len(first)
    assert all(str(uuid.UUID(i)) == i for i in ids)
    assert (tmp_path / "1.geojson").read_bytes() == (tmp_path / "2.geojson").read_bytes()
    same = {f["id"]: shapely.normalize(shape_of(f)) for f in first}
    assert {f["id"]: shapely.normalize(shape_of(f)) for f in tiled} == same  # ids name regions, not tiles

    classes = features_of(export_geojson(store, tmp_path / "c.geojson"))
    class_ids = [f["id"] for f in classes]
    assert len(set(class_ids)) == 2 and not set(class_ids) & set(ids)
    assert class_ids == [f["id"] for f in features_of(export_geojson(store, tmp_path / "d.geojson"))]
    other = write_labels(tmp_path / "other.ome.zarr", labels, class_names=["x", "b"], mpp=MPP, chunk=16)
    assert {f["id"] for f in features_of(export_geojson(other, tmp_path / "o.geojson"))}.isdisjoint(class_ids)


# --- choosing the resolution -------------------------------------------------------------------------------
def test_the_traced_level_is_full_resolution_unless_named(tmp_path):
    store = write_labels(tmp_path / "p.ome.zarr", np.ones((300, 8200), np.uint8), class_names=["a"], mpp=MPP,
                         chunk=256)
    output = LabelOutput(store)
    assert len(output.levels) > 3
    assert pick_level(output) == 0  # no longer the finest level under 8192 px
    assert pick_level(output, level=2) == 2 and pick_level(output, mpp=1.0) == 1 and pick_level(output, mpp=1.5) == 1
    assert pick_level(output, mpp=0.1) == 0 and pick_level(output, max_side=8192) == 1
    with pytest.raises(ConfigError, match="levels are 0"):
        pick_level(output, level=len(output.levels))
    with pytest.raises(ConfigError, match="one of level, mpp and max_side"):
        pick_level(output, level=1, mpp=1.0)


def test_cli_names_the_resolution_of_the_geojson_export():
    from pfmseg_engine.cli import build_parser
    from pfmseg_engine.commands.infer import geojson_options

    base = ["infer", "--slide", "a.svs", "--checkpoint", "c.pt", "--output_dir", "out"]
    options = geojson_options(build_parser().parse_args(base))
    assert options["level"] is None and options["mpp"] is None and options["progress"]
    assert geojson_options(build_parser().parse_args([*base, "--geojson_level", "2"]))["level"] == 2
    assert geojson_options(build_parser().parse_args([*base, "--geojson_mpp", "2"]))["mpp"] == 2.0
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--geojson_level", "1", "--geojson_mpp", "2"])
