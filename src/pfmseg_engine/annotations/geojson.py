"""QuPath GeoJSON in: features, classes and the checks that turn a bad file into one clear message.

QuPath's *File > Export objects as GeoJSON* writes a FeatureCollection (or, with "pretty" off in old
versions, a plain list of features). Each feature has a ``geometry`` (Polygon or MultiPolygon with
holes, in level-0 pixel coordinates of the image as QuPath shows it) and ``properties`` with
``objectType`` ("annotation", "detection", "cell", ...; v0.2 used ``id``) and ``classification``
(``name`` and ``color`` [r, g, b]; derived classes have ``names``). Reading is pure: nothing is written,
so a file that fails a check leaves nothing half-done behind.

Coordinates: QuPath opens formats that have a scanned-area bounding box (MIRAX, Leica SCN, ... read by
OpenSlide) cropped to that box (``OpenslideImageServer`` applies ``openslide.bounds-*`` unless the
image was added with ``--no-crop``), which is exactly the frame of a :class:`~pfmseg_engine.slides.Slide`
(its levels cover the bounds region). ``frame="qupath"`` (default) therefore takes the coordinates as
they are; ``frame="file"`` means they are in the file's full level-0 frame (OpenSlide's own
``read_region`` frame, or QuPath with ``--no-crop``) and subtracts the slide's ``bounds_offset``.

Classes: names starting with "Ignore" (QuPath's ``Ignore*`` convention) are not trained on; their
areas are cleared (label 0) even where other annotations overlap them. Unclassified features carry no
class and are skipped with a warning.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger("pfmseg_engine.annotations")

#: Geometry types that describe areas (the only ones that can be rasterised to labels).
AREA_TYPES = ("Polygon", "MultiPolygon")
#: QuPath's convention: a class whose name starts with this is excluded from training.
IGNORE_PREFIX = "ignore"
#: Coordinate frames of a GeoJSON file (see the module docstring).
FRAMES = ("qupath", "file")

Colour = tuple[int, int, int]


def is_ignore_class(name: str | None) -> bool:
    """Whether ``name`` is an "Ignore*" class (QuPath's convention for regions not to train on)."""
    return bool(name) and name.strip().lower().startswith(IGNORE_PREFIX)


@dataclass(frozen=True)
class Feature:
    """One area of a GeoJSON file: a valid shapely (Multi)Polygon in slide level-0 pixels (the slide's frame)."""

    geometry: Any
    class_name: str | None
    colour: Colour | None
    object_type: str
    index: int
    name: str | None = None

    @property
    def ignored(self) -> bool:
        return is_ignore_class(self.class_name)


@dataclass
class AnnotationFile:
    """The features of one GeoJSON file (or object), with what was repaired or skipped and why."""

    source: str
    features: list[Feature]
    repaired: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

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


def _classification(properties: Mapping[str, Any]) -> tuple[str | None, Colour | None]:
    classification = properties.get("classification")
    if isinstance(classification, str):
        return classification.strip() or None, None
    if not isinstance(classification, Mapping):
        return None, None
    name = classification.get("name")
    if not name and isinstance(classification.get("names"), list):  # derived classes: "Tumor: Positive"
        name = ": ".join(str(n) for n in classification["names"])
    colour = _colour(classification.get("color", classification.get("colorRGB")))
    return (str(name).strip() or None) if name else None, colour


def _object_type(feature: Mapping[str, Any], properties: Mapping[str, Any]) -> str:
    kind = properties.get("objectType") or properties.get("object_type") or properties.get("type")
    if not kind and isinstance(feature.get("id"), str) and feature["id"].startswith("Path"):
        kind = feature["id"]  # QuPath v0.2 stored the object type in "id"
    legacy = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
              "PathTileObject": "tile", "TMACoreObject": "tmaCore"}
    return legacy.get(str(kind), str(kind)) if kind else "annotation"


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


def read_geojson(source: str | Path | Mapping[str, Any] | list[Any], *, frame: str = "qupath",
                 bounds_offset: tuple[float, float] = (0, 0), on_unsupported: str = "error",
                 class_map: Mapping[str, str] | None = None, name: str | None = None,
                 keep_unclassified: bool = False) -> AnnotationFile:
    """Read QuPath GeoJSON (a path, or already parsed data) into valid shapely geometries.

    * Polygon and MultiPolygon (holes kept) are read; a self-intersecting or otherwise invalid one is
      repaired with shapely's ``make_valid`` (its polygonal part kept) and a warning names it.
    * Another geometry type (Point, LineString, ...) raises a :class:`DataError` naming the file, the
      feature index and the fix, unless ``on_unsupported="skip"`` (then it is skipped with a warning).
    * ``frame``: "qupath" (coordinates as QuPath shows the image, i.e. cropped to the scanned bounds,
      the frame of our slides) or "file" (the file's full level-0 frame: ``bounds_offset`` (x, y) is
      subtracted).
    * ``class_map`` renames classes on the way in (``{"Tumour": "Tumor"}``).
    * Unclassified features are skipped with a warning (they carry no class to train), unless
      ``keep_unclassified`` (regions of interest, tissue masks).
    """
    import shapely
    from shapely.geometry import shape

    if frame not in FRAMES:
        raise DataError(f"Unknown coordinate frame '{frame}'; choose one of {', '.join(FRAMES)}.")
    if on_unsupported not in ("error", "skip"):
        raise DataError(f"on_unsupported must be 'error' or 'skip', got '{on_unsupported}'.")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        label = name or str(path)
        if not path.is_file():
            raise DataError(f"Annotation file '{path}' does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{label} is not valid JSON ({exc}); export it again with QuPath's File > Export "
                            "objects as GeoJSON.") from exc
    else:
        data, label = source, name or "GeoJSON"
    dx, dy = (float(bounds_offset[0]), float(bounds_offset[1])) if frame == "file" else (0.0, 0.0)
    rename = dict(class_map or {})
    result = AnnotationFile(source=label, features=[])
    for index, raw in enumerate(_features_of(data, label)):
        if not isinstance(raw, Mapping):
            raise DataError(f"{_where(label, index)} is not a GeoJSON feature (an object with 'geometry'); "
                            "remove it or export the objects again from QuPath.")
        geometry = raw.get("geometry") if raw.get("type", "Feature") == "Feature" else raw
        properties = raw.get("properties") or {}
        kind = geometry.get("type") if isinstance(geometry, Mapping) else None
        if kind not in AREA_TYPES:
            what = f"a {kind} geometry" if kind else "no geometry"
            message = (f"{_where(label, index)} has {what}; only areas (Polygon, MultiPolygon) can become labels. "
                       "Fix: in QuPath convert points/lines to areas (e.g. Objects > Annotations > Expand "
                       "annotations) or delete them before exporting")
            if on_unsupported == "skip":
                log.warning("%s; skipped.", message)
                result.skipped.append((index, f"{kind} geometry"))
                continue
            raise DataError(message + " (or skip such features: on_unsupported='skip', CLI --skip_unsupported).")
        try:
            geom = shape(geometry)
        except Exception as exc:
            raise DataError(f"{_where(label, index)}: the {kind} coordinates cannot be read ({exc}); each ring "
                            "must be a list of [x, y] pairs. Fix or delete this feature in QuPath and export "
                            "again.") from exc
        if geom.is_empty:
            result.skipped.append((index, "empty geometry"))
            log.warning("%s has an empty geometry; skipped.", _where(label, index))
            continue
        if not geom.is_valid:
            reason = shapely.is_valid_reason(geom)
            geom = _polygonal(shapely.make_valid(geom))
            result.repaired.append(index)
            log.warning("%s was not a valid polygon (%s); repaired with make_valid. Check its outline in QuPath.",
                        _where(label, index), reason)
            if geom.is_empty:
                result.skipped.append((index, "no area after repair"))
                continue
        if dx or dy:
            geom = shapely.transform(geom, lambda xy, d=(dx, dy): xy - d)
        class_name, colour = _classification(properties)
        class_name = rename.get(class_name, class_name) if class_name else None
        result.features.append(Feature(geometry=geom, class_name=class_name, colour=colour,
                                       object_type=_object_type(raw, properties), index=index,
                                       name=properties.get("name")))
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
                kept.append(Feature(clipped, feature.class_name, feature.colour, feature.object_type, feature.index,
                                    feature.name))
            else:
                annotations.skipped.append((feature.index, "outside the slide"))
            continue
        raise DataError(
            f"{_where(annotations.source, feature.index)} lies at {extent} but {slide} is {width:.0f} x {height:.0f} "
            "level-0 px. Fix: pair each GeoJSON with the slide it was drawn on; if the file is in the scanner's "
            "full frame (OpenSlide without cropping, QuPath --no-crop) read it with frame='file' (CLI "
            "--annotation_frame file); or clip features to the slide (clip=True, CLI --clip_annotations)."
        )
    annotations.features = kept
    return annotations


# --- classes across files ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassTable:
    """The classes training uses: label k means ``names[k-1]``; "Ignore*" classes map to 0 (not annotated)."""

    names: tuple[str, ...]
    colours: tuple[Colour, ...]
    ignored: tuple[str, ...] = ()

    def label_of(self, name: str | None) -> int:
        if name is None or is_ignore_class(name):
            return 0
        return self.names.index(name) + 1

    def lut(self, names: Sequence[str]) -> list[int]:
        """Label value lookup for a store with classes ``names`` (index k = store label k; 0 stays 0)."""
        return [0, *(self.label_of(n) for n in names)]


def _similar(a: str, b: str) -> bool:
    a, b = a.strip().lower(), b.strip().lower()
    return a == b or (min(len(a), len(b)) >= 4 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.85)


def class_table(sources: Iterable[tuple[str, Mapping[str, Colour | None], Mapping[str, str]]], *,
                class_names: Sequence[str] | None = None, class_colours: Sequence[Sequence[int]] | None = None
                ) -> ClassTable:
    """One class table for several annotation sources, consistent across slides.

    ``sources`` are (source name, {class: colour} in order of appearance, {class: where it first occurs,
    e.g. "a.geojson, feature 3"}).
    With ``class_names`` (a model's or the config's classes) every trained class must be one of them;
    otherwise the classes are the union in order of first appearance, and a class missing from some
    sources is fine. A class that exists in only one source while a near-identical name ("Tumour" /
    "Tumor", "stroma" / "Stroma") is used elsewhere is almost always a typo: a :class:`DataError` names
    the source, the feature and the fix. A class with different colours in different files keeps the
    first colour (a warning says so).
    """
    from ..colors import class_palette

    sources = list(sources)
    seen: dict[str, Colour | None] = {}
    where: dict[str, list[str]] = {}
    first: dict[tuple[str, str], str] = {}
    ignored: list[str] = []
    for source, classes, indices in sources:
        for name, colour in classes.items():
            if is_ignore_class(name):
                if name not in ignored:
                    ignored.append(name)
                continue
            where.setdefault(name, []).append(source)
            first[(source, name)] = indices.get(name, source)
            if name not in seen or seen[name] is None:
                seen[name] = colour
            elif colour is not None and tuple(colour) != tuple(seen[name]):
                log.warning("Class '%s' has colour %s in %s but %s earlier; keeping %s.", name, list(colour), source,
                            list(seen[name]), list(seen[name]))
    if class_names is not None:
        allowed = list(class_names)
        for name, files in where.items():
            if name not in allowed:
                source = files[0]
                hint = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
                guess = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise DataError(
                    f"{first[(source, name)]} has class '{name}'{guess}, which is not one of the "
                    f"model's classes {allowed}. Fix: rename it in QuPath, map it (class_map={{'{name}': ...}}, CLI "
                    f"--class_map '{name}=NEW'), or add it to dataset.class_names and train a new model."
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
                        f"it (class_map={{'{name}': '{twins[0]}'}}, CLI --class_map '{name}={twins[0]}')."
                    )
        names = list(seen)
    if not names:
        files = ", ".join(s for s, _, _ in sources) or "the annotations"
        raise DataError(f"No classified areas in {files}: every feature is unclassified or an Ignore* class. Set "
                        "classes on the annotations in QuPath and export them again.")
    palette = class_palette(len(names), None, names).tolist()
    colours = []
    for i, name in enumerate(names):
        given = class_colours[i] if class_colours is not None and i < len(class_colours) else None
        colour = given or seen.get(name) or palette[i]
        colours.append(tuple(int(c) for c in list(colour)[:3]))
    return ClassTable(names=tuple(names), colours=tuple(colours), ignored=tuple(ignored))
