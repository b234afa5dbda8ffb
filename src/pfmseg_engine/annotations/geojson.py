"""QuPath GeoJSON in: features, classes and the checks that turn a bad file into one clear message.

QuPath's *File > Export objects as GeoJSON* writes a FeatureCollection (*Export as FeatureCollection*
ticked) or a plain list of features. Each feature has a ``geometry`` in level-0 pixel coordinates of
the image as QuPath shows it, an ``id`` (a UUID since v0.4; v0.2 put the object type there) and
``properties`` with ``objectType`` ("annotation", "detection", "cell", ...), ``classification``
(``name`` and ``color`` [r, g, b]; v0.4+ writes a derived class as ``names`` ["Tumor", "Positive"],
v0.2 as ``name`` "Positive" with a ``parentClass`` chain and packed ``colorRGB`` integers) and
``isLocked``; a cell also carries its nucleus as ``nucleusGeometry``. Reading is pure: nothing is
written, so a file that fails a check leaves nothing half-done behind.

What becomes labels (:class:`ImportOptions` declares every default, once):

* Areas: Polygon and MultiPolygon (holes kept), and the polygonal part of a GeometryCollection.
  Points and lines (Point, MultiPoint, LineString, MultiLineString: counting marks, calibration
  lines) cannot be rasterised into areas; they are left out with one warning per file that counts
  them by type, or refused with ``strict=True`` (a :class:`DataError` naming the first one).
* Class names are QuPath's: a derived class is its names joined with ": " ("Tumor: Positive"),
  whichever way the version wrote it.
* Ignored classes (``ignore_classes``): QuPath treats a class whose name ends in "*" (``Ignore*``,
  ``Artefact*``, ``Background*``) as an *ignored class*: its pixel classifier trains it like any other
  class (so glass or folds are learned) and only skips it when creating objects and measuring.
  "qupath" (default) does the same: such classes are trained, and the measurements and exports of
  the predictions leave them out; the standard ``Region*`` class, which QuPath uses to mark regions
  to annotate inside and never trains, is not trained or drawn either. "prefix" is the earlier rule
  of this project: a class whose name starts with "Ignore" is not trained, and its areas read as not
  annotated even where other annotations overlap them (``Region*`` is then an ordinary class).
* Cells (``cells``): a QuPath cell object trains on its cell boundary ("cell", default: the geometry
  QuPath itself exports and classifies) or on its ``nucleusGeometry`` ("nucleus": what the stain
  shows; QuPath's cell boundary is usually the nucleus grown by a fixed distance). A cell without a
  nucleus keeps its boundary (one warning counts them).
* Unclassified features carry no class and are skipped with a warning.

Coordinates: QuPath opens formats that have a scanned-area bounding box (MIRAX, Leica SCN, ... read by
OpenSlide) cropped to that box (``OpenslideImageServer`` applies ``openslide.bounds-*`` unless the
image was added with ``--no-crop``), which is exactly the frame of a :class:`~pfmseg_engine.slides.Slide`
(its levels cover the bounds region). ``frame="qupath"`` (default) therefore takes the coordinates as
they are; ``frame="file"`` means they are in the file's full level-0 frame (OpenSlide's own
``read_region`` frame, or QuPath with ``--no-crop``) and subtracts the slide's ``bounds_offset``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import ConfigError, DataError, reject_unknown_keys
from ..paths import check_input_path

log = logging.getLogger("pfmseg_engine.annotations")

#: Geometry types that describe areas (the only ones that can be rasterised to labels).
AREA_TYPES = ("Polygon", "MultiPolygon")
#: Coordinate frames of a GeoJSON file (see the module docstring).
FRAMES = ("qupath", "file")
#: How classes QuPath would ignore are read (see the module docstring).
IGNORE_RULES = ("qupath", "prefix")
#: Which outline of a QuPath cell object becomes its label.
CELL_SHAPES = ("cell", "nucleus")
#: QuPath's standard class for regions to annotate inside; its pixel classifier never trains it.
REGION_CLASS = "Region*"
#: The "prefix" rule: a class whose name starts with this (any case) is not trained.
IGNORE_PREFIX = "ignore"
#: QuPath joins the names of a derived class with this ("Tumor: Positive").
DERIVED_SEPARATOR = ": "

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class ImportOptions:
    """How QuPath GeoJSON becomes training labels; the one place these defaults are declared.

    ``strict``: refuse points and lines instead of leaving them out with one warning.
    ``ignore_classes``: "qupath" or "prefix" (see the module docstring).
    ``cells``: "cell" (a cell object's boundary) or "nucleus" (its ``nucleusGeometry``).
    """

    strict: bool = False
    ignore_classes: str = "qupath"
    cells: str = "cell"

    def __post_init__(self) -> None:
        for name, value, choices in (("ignore_classes", self.ignore_classes, IGNORE_RULES),
                                     ("cells", self.cells, CELL_SHAPES)):
            if value not in choices:
                raise ConfigError(f"Unknown GeoJSON import option {name}='{value}'; choose one of "
                                  f"{', '.join(choices)}.")

    @classmethod
    def of(cls, value: ImportOptions | Mapping[str, Any] | None = None) -> ImportOptions:
        """``value`` as options: None gives the defaults, a mapping names some of them (others default)."""
        if isinstance(value, ImportOptions):
            return value
        given = dict(value or {})
        reject_unknown_keys(given, [f.name for f in fields(cls)], "GeoJSON import option")
        return cls(**given)


def is_ignored_class(name: str | None) -> bool:
    """Whether ``name`` is one of QuPath's ignored classes (its name ends in "*": ``Ignore*``, ``Region*``, ...).

    The rule of QuPath's ``PathClassTools.isIgnoredClass``: such a class is never turned into objects or
    measured, whatever a classifier predicts.
    """
    return name is not None and name.strip().endswith("*")


def is_region_class(name: str | None) -> bool:
    """Whether ``name`` is QuPath's ``Region*`` class (regions that hold annotations, never trained)."""
    return name is not None and name.strip() == REGION_CLASS


def has_ignore_prefix(name: str | None) -> bool:
    """Whether ``name`` starts with "Ignore" (the "prefix" rule's classes that are not trained)."""
    return name is not None and name.strip().lower().startswith(IGNORE_PREFIX)


def class_use(name: str | None, rule: str) -> str:
    """How a class is trained under ``rule``: "train", "clear" (its areas read 0 over everything under
    them) or "drop" (not drawn at all)."""
    if not name:
        return "drop"
    if rule == "prefix":
        return "clear" if has_ignore_prefix(name) else "train"
    return "drop" if is_region_class(name) else "train"


@dataclass(frozen=True)
class Feature:
    """One area of a GeoJSON file: a valid shapely (Multi)Polygon in slide level-0 pixels (the slide's frame)."""

    geometry: Any
    class_name: str | None
    colour: Colour | None
    object_type: str
    index: int
    name: str | None = None
    object_id: str | None = None
    locked: bool = False

    @property
    def ignored(self) -> bool:
        """An area QuPath leaves out of analysis: an ignored class other than ``Region*`` (which marks where to
        analyse), so a tissue region of interest cuts these out and keeps region annotations."""
        return is_ignored_class(self.class_name) and not is_region_class(self.class_name)


@dataclass
class AnnotationFile:
    """The features of one GeoJSON file (or object), with what was repaired or skipped and why."""

    source: str
    features: list[Feature]
    repaired: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    #: geometry type -> how many were left out (points and lines; parts of GeometryCollections included)
    unsupported: dict[str, int] = field(default_factory=dict)

    def classes(self) -> dict[str, Colour | None]:
        """Class name -> colour (first seen) in order of first appearance (unclassified left out)."""
        found: dict[str, Colour | None] = {}
        for feature in self.features:
            name = feature.class_name
            if name is not None and (name not in found or found[name] is None):
                found[name] = feature.colour
        return found

    def first_seen(self) -> dict[str, str]:
        """Class name -> where it first occurs ("<file>, feature <index>"), for messages."""
        seen: dict[str, str] = {}
        for feature in self.features:
            if feature.class_name is not None and feature.class_name not in seen:
                seen[feature.class_name] = _where(self.source, feature.index)
        return seen

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(min x, min y, max x, max y) over every feature, or None when empty."""
        if not self.features:
            return None
        boxes = [f.geometry.bounds for f in self.features]
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))

    def unsupported_summary(self) -> str | None:
        """One sentence on the points and lines left out ("3 Point, 1 LineString"), or None when there were none."""
        if not self.unsupported:
            return None
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.unsupported.items(), key=lambda kv: -kv[1]))
        return (f"{self.source}: left out {sum(self.unsupported.values())} point/line geometries ({counts}); only "
                "areas (Polygon, MultiPolygon) become labels. Refuse them instead with strict mode (strict=True).")


# --- reading ------------------------------------------------------------------------------------------
def _colour(value: Any) -> Colour | None:
    """QuPath colours: [r, g, b] (v0.3+) or a packed (A)RGB integer (older versions, often negative)."""
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        try:
            return tuple(int(max(0, min(255, round(float(v))))) for v in value[:3])  # type: ignore[return-value]
        except (TypeError, ValueError):
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        packed = value & 0xFFFFFF
        return ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return None


def _class_name(classification: Mapping[str, Any]) -> str | None:
    """QuPath's name of a classification: ``names`` joined (v0.4+ derived classes), else ``name`` after its
    ``parentClass`` chain (v0.2 derived classes), both joined with ": " as QuPath's ``PathClass.toString``."""
    names = classification.get("names")
    current: Any = classification
    if isinstance(names, list) and names:
        parts = [str(n).strip() for n in names if n is not None and str(n).strip()]
    else:
        parts = []
        while isinstance(current, Mapping) and len(parts) < 64:  # a chain, never a cycle
            name = current.get("name")
            if name is None or not str(name).strip():
                break
            parts.insert(0, str(name).strip())
            current = current.get("parentClass")
    return DERIVED_SEPARATOR.join(parts) or None


def _classification(properties: Mapping[str, Any]) -> tuple[str | None, Colour | None]:
    classification = properties.get("classification")
    if isinstance(classification, str):
        return classification.strip() or None, None
    if not isinstance(classification, Mapping):
        return None, None
    return _class_name(classification), _colour(classification.get("color", classification.get("colorRGB")))


#: QuPath v0.2 wrote the object's Java type where v0.3+ writes ``objectType``.
LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
                "PathTileObject": "tile", "TMACoreObject": "tmaCore"}


def _object_type(feature: Mapping[str, Any], properties: Mapping[str, Any]) -> str:
    kind = properties.get("objectType") or properties.get("object_type") or properties.get("type")
    if not kind and isinstance(feature.get("id"), str) and feature["id"] in LEGACY_TYPES:
        kind = feature["id"]
    return LEGACY_TYPES.get(str(kind), str(kind)) if kind else "annotation"


def _object_id(feature: Mapping[str, Any]) -> str | None:
    """The feature's ``id`` (QuPath v0.4+: the object's UUID); v0.2's object type names are not ids."""
    value = feature.get("id")
    if value is None or isinstance(value, (Mapping, list)) or str(value) in LEGACY_TYPES:
        return None
    return str(value)


def _features_of(data: Any, source: str) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        kind = data.get("type")
        if kind == "FeatureCollection" or "features" in data:
            features = data.get("features")
            if not isinstance(features, list):
                raise DataError(f"{source}: 'features' is not a list; export the objects again from QuPath "
                                "(File > Export objects as GeoJSON).")
            return features
        if kind == "Feature":
            return [data]
        if kind in AREA_TYPES:
            return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise DataError(f"{source} is not GeoJSON that QuPath writes (a FeatureCollection, a list of features or one "
                    "feature); export it with QuPath's File > Export objects as GeoJSON.")


def _where(source: str, index: int) -> str:
    return f"{source}, feature {index}"


def _load(source: str | Path | Mapping[str, Any] | list[Any], name: str | None) -> tuple[Any, str]:
    """(parsed data, the name used in messages) of a path or of data already parsed."""
    if not isinstance(source, (str, Path)):
        return source, name or "GeoJSON"
    path = Path(source).expanduser()
    label = name or str(path)
    check_input_path(path, "Annotation file", error=DataError)  # missing, a folder, a pipe, a link loop
    try:
        return json.loads(path.read_text(encoding="utf-8")), label
    except RecursionError as exc:  # Python's JSON reader recurses once per level of nesting
        raise DataError(f"{label} nests its JSON lists or objects thousands of levels deep, deeper than any GeoJSON "
                        "geometry; it is not a QuPath export. Export the objects again with QuPath's File > Export "
                        "objects as GeoJSON.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{label} is not valid JSON ({exc}); export it again with QuPath's File > Export "
                        "objects as GeoJSON.") from exc


def _geometry_of(feature: Mapping[str, Any], properties: Mapping[str, Any], object_type: str, cells: str
                 ) -> tuple[Any, bool]:
    """(the GeoJSON geometry that becomes the label, False for a cell that has no nucleus to use).

    A cell's nucleus is the feature's ``nucleusGeometry`` member (QuPath writes it beside ``geometry``;
    read from ``properties`` too, where other tools put it).
    """
    geometry = feature.get("geometry") if feature.get("type", "Feature") == "Feature" else feature
    if object_type != "cell" or cells != "nucleus":
        return geometry, True
    nucleus = feature.get("nucleusGeometry", properties.get("nucleusGeometry"))
    return (nucleus, True) if isinstance(nucleus, Mapping) else (geometry, False)


def _bad_coordinate(geometry: Mapping[str, Any]) -> str | None:
    """What is wrong with the first coordinate of a GeoJSON geometry that is not a finite number, or None.

    Python's JSON reader accepts ``NaN`` and ``Infinity``, and GEOS stops with an exception on them
    (or silently "repairs" the polygon away), so they are found here, before any geometry is built.
    Rings are checked as arrays; a ring that fails is walked value by value to name the culprit.
    The walk is a loop, not a recursion, so no nesting depth can exhaust the stack. Structural faults
    (a ring that is not a list of pairs) are left to the geometry constructor's message.
    """
    pending: list[Any] = [geometry]
    while pending:
        item = pending.pop()
        if isinstance(item, Mapping):
            parts = item.get("geometries") if item.get("type") == "GeometryCollection" else [item.get("coordinates")]
            pending.extend(reversed(parts if isinstance(parts, list) else []))
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
            if item[0] and not isinstance(item[0][0], (list, tuple)) and _finite_ring(item):
                continue
            pending.extend(reversed(item))
        elif isinstance(item, (list, tuple)):  # one position: [x, y] (or [x, y, z])
            for value in item:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    return f"{value!r}, which is not a number"
                if not math.isfinite(value):
                    return f"{value}, which is not a finite number"
    return None


def _finite_ring(ring: Sequence[Any]) -> bool:
    """Whether ``ring`` (a list of positions) converts to a float array of finite numbers."""
    try:
        values = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return False
    return values.ndim == 2 and bool(np.isfinite(values).all())


@contextlib.contextmanager
def _geometry_errors(where: str) -> Iterator[None]:
    """Turn a GEOS failure while building or repairing a feature's geometry into a DataError naming it."""
    from shapely.errors import GEOSException

    try:
        yield
    except GEOSException as exc:
        raise DataError(f"{where}: its geometry cannot be built ({exc}). Fix or delete this feature in QuPath and "
                        "export again.") from exc


def _shape(geometry: Any, where: str) -> tuple[Any, list[str]]:
    """(the polygonal part of a GeoJSON geometry or None, the types of its parts that are not areas)."""
    import shapely
    from shapely.geometry import shape

    kind = geometry.get("type") if isinstance(geometry, Mapping) else None
    if kind not in (*AREA_TYPES, "GeometryCollection"):
        return None, [str(kind) if kind else "no geometry"]
    bad = _bad_coordinate(geometry)
    if bad:
        raise DataError(f"{where}: the {kind} has the coordinate {bad}; every coordinate must be a finite number "
                        "of level-0 pixels. Fix or delete this feature in QuPath and export again.")
    try:
        geom = shape(geometry)
    except Exception as exc:
        raise DataError(f"{where}: the {kind} coordinates cannot be read ({exc}); each ring must be a list of [x, y] "
                        "pairs. Fix or delete this feature in QuPath and export again.") from exc
    if kind in AREA_TYPES:
        return geom, []
    parts = list(shapely.get_parts(geom))
    while any(p.geom_type == "GeometryCollection" for p in parts):  # nested collections
        parts = [q for p in parts for q in (shapely.get_parts(p) if p.geom_type == "GeometryCollection" else [p])]
    areas = [p for p in parts if p.geom_type in AREA_TYPES]
    others = [p.geom_type for p in parts if p.geom_type not in AREA_TYPES]
    return (shapely.union_all(areas) if areas else None), others


def _refusal(where: str, kinds: Sequence[str], collection: bool) -> DataError:
    kind = kinds[0]
    what = "no geometry" if kind == "no geometry" else (
        f"a GeometryCollection holding a {kind}" if collection else f"a {kind} geometry")
    return DataError(f"{where} has {what}; only areas (Polygon, MultiPolygon) can become labels. Fix: in QuPath "
                     "convert points/lines to areas (e.g. Objects > Annotations > Expand annotations) or delete them "
                     "before exporting, or read without strict mode (strict=False) to leave them out with a "
                     "warning.", fix_with=("strict=False",))


def _repaired(geom: Any, where: str) -> Any:
    import shapely

    reason = shapely.is_valid_reason(geom)
    log.warning("%s was not a valid polygon (%s); repaired with make_valid. Check its outline in QuPath.", where,
                reason)
    return _polygonal(shapely.make_valid(geom))


def read_geojson(source: str | Path | Mapping[str, Any] | list[Any], *, frame: str = "qupath",
                 bounds_offset: tuple[float, float] = (0, 0), options: ImportOptions | Mapping[str, Any] | None = None,
                 class_map: Mapping[str, str] | None = None, name: str | None = None,
                 keep_unclassified: bool = False) -> AnnotationFile:
    """Read QuPath GeoJSON (a path, or already parsed data) into valid shapely geometries.

    * Areas are read (see the module docstring); a self-intersecting or otherwise invalid one is
      repaired with shapely's ``make_valid`` (its polygonal part kept) and a warning names it.
    * Points and lines are left out with one warning that counts them by type (also in
      ``AnnotationFile.unsupported``), or raise a :class:`DataError` naming the file, the feature and the
      fix with ``options.strict``; ``options.cells`` picks a cell object's outline.
    * ``frame``: "qupath" (coordinates as QuPath shows the image, i.e. cropped to the scanned bounds,
      the frame of our slides) or "file" (the file's full level-0 frame: ``bounds_offset`` (x, y) is
      subtracted).
    * ``class_map`` renames classes on the way in (``{"Tumour": "Tumor"}``).
    * Unclassified features are skipped with a warning (they carry no class to train), unless
      ``keep_unclassified`` (regions of interest, tissue masks).
    * A file no QuPath export looks like (coordinates that are not finite numbers, e.g. ``NaN`` or
      ``Infinity``; JSON nested thousands of levels deep; a geometry GEOS cannot build) raises a
      :class:`DataError` naming the file and the feature, never a raw exception.
    """
    import shapely

    if frame not in FRAMES:
        raise DataError(f"Unknown coordinate frame '{frame}'; choose one of {', '.join(FRAMES)}.")
    options = ImportOptions.of(options)
    data, label = _load(source, name)
    dx, dy = (float(bounds_offset[0]), float(bounds_offset[1])) if frame == "file" else (0.0, 0.0)
    rename = dict(class_map or {})
    result = AnnotationFile(source=label, features=[])
    unsupported: Counter[str] = Counter()
    bare_cells: list[int] = []
    for index, raw in enumerate(_features_of(data, label)):
        where = _where(label, index)
        if not isinstance(raw, Mapping):
            raise DataError(f"{where} is not a GeoJSON feature (an object with 'geometry'); remove it or export the "
                            "objects again from QuPath.")
        properties = raw.get("properties") or {}
        object_type = _object_type(raw, properties)
        geometry, has_nucleus = _geometry_of(raw, properties, object_type, options.cells)
        if not has_nucleus:
            bare_cells.append(index)
        with _geometry_errors(where):
            geom, others = _shape(geometry, where)
            if others:
                kind = geometry.get("type") if isinstance(geometry, Mapping) else None
                if options.strict:
                    raise _refusal(where, others, kind == "GeometryCollection")
                unsupported.update(others)
                if geom is None:
                    result.skipped.append((index, f"{kind or others[0]} geometry"))
                    continue
            if geom is None or geom.is_empty:
                result.skipped.append((index, "empty geometry"))
                log.warning("%s has an empty geometry; skipped.", where)
                continue
            if not geom.is_valid:
                geom = _repaired(geom, where)
                result.repaired.append(index)
                if geom.is_empty:
                    result.skipped.append((index, "no area after repair"))
                    continue
            if dx or dy:
                geom = shapely.transform(geom, lambda xy, d=(dx, dy): xy - d)
        class_name, colour = _classification(properties)
        class_name = rename.get(class_name, class_name) if class_name else None
        result.features.append(Feature(geometry=geom, class_name=class_name, colour=colour, object_type=object_type,
                                       index=index, name=properties.get("name"), object_id=_object_id(raw),
                                       locked=bool(properties.get("isLocked", False))))
    result.unsupported = dict(unsupported)
    if unsupported:
        log.warning("%s", result.unsupported_summary(), extra={"fix_with": ("strict=True",)})
    if bare_cells:
        log.warning("%s: %d cell(s) have no nucleusGeometry (first: feature %d); their cell boundary is used.", label,
                    len(bare_cells), bare_cells[0])
    unclassified = [f.index for f in result.features if f.class_name is None]
    if unclassified and not keep_unclassified:
        log.warning("%s: %d unclassified feature(s) (first: feature %d) carry no class and are not used; set a "
                    "class in QuPath to train on them.", label, len(unclassified), unclassified[0])
        result.skipped.extend((i, "unclassified") for i in unclassified)
        result.features = [f for f in result.features if f.class_name is not None]
    return result


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry (make_valid may return a collection with lines or points)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    if not parts:
        return Polygon()
    return shapely.union_all(parts)


# --- checks against a slide ------------------------------------------------------------------------------
def check_within(annotations: AnnotationFile, width: float, height: float, *, slide: str = "the slide",
                 tolerance: float = 1.0, clip: bool = False) -> AnnotationFile:
    """Make sure every feature lies on a ``width`` x ``height`` slide (level-0 pixels, our slide frame).

    A feature reaching more than ``tolerance`` pixels outside raises a :class:`DataError` naming the
    file, the feature index, its extent and the fix; with ``clip=True`` it is clipped to the slide
    instead (a warning says so) and dropped when nothing is left.
    """
    import shapely

    kept = []
    for feature in annotations.features:
        x0, y0, x1, y1 = feature.geometry.bounds
        if x0 >= -tolerance and y0 >= -tolerance and x1 <= width + tolerance and y1 <= height + tolerance:
            kept.append(feature)
            continue
        extent = f"x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}"
        if clip:
            clipped = _polygonal(shapely.clip_by_rect(feature.geometry, 0, 0, width, height))
            log.warning("%s (%s) reaches outside %s (%d x %d px); clipped to the slide.",
                        _where(annotations.source, feature.index), extent, slide, width, height)
            if not clipped.is_empty and clipped.area > 0:
                kept.append(replace(feature, geometry=clipped))
            else:
                annotations.skipped.append((feature.index, "outside the slide"))
            continue
        raise DataError(
            f"{_where(annotations.source, feature.index)} lies at {extent} but {slide} is {width:.0f} x {height:.0f} "
            "level-0 px. Fix: pair each GeoJSON with the slide it was drawn on; if the file is in the scanner's "
            "full frame (OpenSlide without cropping, QuPath --no-crop) read it with frame='file'; or clip "
            "features to the slide (clip=True).",
            fix_with=("frame='file'", "clip=True"),
        )
    annotations.features = kept
    return annotations


# --- classes across files ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassTable:
    """The classes training uses: label k means ``names[k-1]``.

    ``rule`` is the ``ignore_classes`` rule the table was built with; ``ignored`` lists the classes of
    the annotations that it does not train (``Region*`` under "qupath"; "Ignore..." under "prefix",
    whose areas read 0).
    """

    names: tuple[str, ...]
    colours: tuple[Colour, ...]
    ignored: tuple[str, ...] = ()
    rule: str = ImportOptions.ignore_classes

    def label_of(self, name: str | None) -> int:
        """The training label of class ``name``; 0 for a class that is not trained (or no class)."""
        if class_use(name, self.rule) != "train":
            return 0
        return self.names.index(name) + 1

    def drops(self, name: str | None) -> bool:
        """Whether areas of class ``name`` are not drawn at all (rather than drawn, or drawn as 0 to clear)."""
        return class_use(name, self.rule) == "drop"

    def lut(self, names: Sequence[str]) -> list[int]:
        """Label value lookup for a store with classes ``names`` (index k = store label k; 0 stays 0)."""
        return [0, *(self.label_of(n) for n in names)]


def _similar(a: str, b: str) -> bool:
    """Whether two class names look like spellings of one name ("Tumour" / "Tumor").

    Derived classes are compared name by name: "Tumor: 1+" and "Tumor: 2+", or "Tumor: Positive" and
    "Tumor: Positive: 2+", are different classes of QuPath's, not typos.
    """
    a_parts, b_parts = a.split(DERIVED_SEPARATOR), b.split(DERIVED_SEPARATOR)
    if len(a_parts) != len(b_parts):
        return False
    return all(_similar_name(x, y) for x, y in zip(a_parts, b_parts, strict=True))


def _similar_name(a: str, b: str) -> bool:
    a, b = a.strip().lower(), b.strip().lower()
    return a == b or (min(len(a), len(b)) >= 4 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.85)


def class_table(sources: Iterable[tuple[str, Mapping[str, Colour | None], Mapping[str, str]]], *,
                class_names: Sequence[str] | None = None, class_colours: Sequence[Sequence[int]] | None = None,
                ignore_classes: str | None = None) -> ClassTable:
    """One class table for several annotation sources, consistent across slides.

    ``sources`` are (source name, {class: colour} in order of appearance, {class: where it first occurs,
    e.g. "a.geojson, feature 3"}).
    With ``class_names`` (a model's or the config's classes) every trained class must be one of them;
    otherwise the classes are the union in order of first appearance, and a class missing from some
    sources is fine. A class that exists in only one source while a near-identical name ("Tumour" /
    "Tumor", "stroma" / "Stroma") is used elsewhere is almost always a typo: a :class:`DataError` names
    the source, the feature and the fix. A class with different colours in different files keeps the
    first colour (a warning says so). ``ignore_classes`` is the rule for classes QuPath ignores
    (:class:`ImportOptions`; None: its default): a class it does not train is listed in ``ignored``.
    """
    from ..colors import class_palette

    rule = ImportOptions(ignore_classes=ignore_classes or ImportOptions.ignore_classes).ignore_classes  # validated
    sources = list(sources)
    seen: dict[str, Colour | None] = {}
    where: dict[str, list[str]] = {}
    first: dict[tuple[str, str], str] = {}
    ignored: list[str] = []
    for source, classes, indices in sources:
        for name, colour in classes.items():
            if class_use(name, rule) != "train":
                if name not in ignored:
                    ignored.append(name)
                continue
            where.setdefault(name, []).append(source)
            first[(source, name)] = indices.get(name, source)
            known = seen.get(name)
            if known is None:
                seen[name] = colour
            elif colour is not None and tuple(colour) != tuple(known):
                log.warning("Class '%s' has colour %s in %s but %s earlier; keeping %s.", name, list(colour), source,
                            list(known), list(known))
    if class_names is not None:
        allowed = list(class_names)
        for name, files in where.items():
            if name not in allowed:
                source = files[0]
                hint = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
                guess = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise DataError(
                    f"{first[(source, name)]} has class '{name}'{guess}, which is not one of the "
                    f"model's classes {allowed}. Fix: rename it in QuPath, map it (class_map={{'{name}': ...}}), "
                    "or add it to dataset.class_names and train a new model.",
                    fix_with=("class_map",),
                )
        names = allowed
    else:
        if len(sources) > 1:
            for name, files in reversed(where.items()):  # the later spelling is the odd one out
                if len(files) != 1:
                    continue
                twins = [other for other, others in where.items()
                         if other != name and _similar(name, other) and set(others) - set(files)]
                if twins:
                    source = files[0]
                    raise DataError(
                        f"{first[(source, name)]} has class '{name}', found only in this file, while "
                        f"the other files use '{twins[0]}'. Fix: rename it in QuPath so the class names agree, or map "
                        f"it (class_map={{'{name}': '{twins[0]}'}}).",
                        fix_with=("class_map",),
                    )
        names = list(seen)
    if not names:
        listed = ", ".join(s for s, _, _ in sources) or "the annotations"
        raise DataError(f"No classified areas in {listed}: every feature is unclassified or of a class that is not "
                        f"trained ({', '.join(ignored) or 'none'}; ignore_classes='{rule}'). Set classes on the "
                        "annotations in QuPath and export them again.")
    palette = class_palette(len(names), None, names).tolist()
    colours: list[Colour] = []
    for i, name in enumerate(names):
        given = class_colours[i] if class_colours is not None and i < len(class_colours) else None
        chosen: Sequence[int] = given or seen.get(name) or palette[i]
        colours.append(cast(Colour, tuple(int(c) for c in list(chosen)[:3])))
    return ClassTable(names=tuple(names), colours=tuple(colours), ignored=tuple(ignored), rule=rule)
