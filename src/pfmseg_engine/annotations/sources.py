"""Annotation sources of a slide (QuPath GeoJSON or a pfmseg label store) as lazy labels at a resolution.

:func:`load_annotations` opens either kind and checks it (GeoJSON: geometry types, repairs, extent
against the slide); :func:`class_table_of` builds the one class table of several sources; and
:meth:`AnnotationSource.labels` gives the lazy (H, W) label array of the slide at a
:class:`~pfmseg_engine.slides.ResolutionPlan` (0 = not annotated, k = class k-1), which the sparse
patch sampler reads box by box.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..errors import ConfigError, DataError
from ..labelstore.detect import is_zarr
from .geojson import AnnotationFile, ClassTable, Colour, ImportOptions, check_within, class_table, read_geojson
from .rasterize import PolygonLabels, StoreLabels

if TYPE_CHECKING:
    from ..labelstore.omezarr import LabelOutput


class LabelGrid(Protocol):
    """The grid labels are wanted on: (height, width) and level-0 pixels per pixel (a resolution plan)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def downsample(self) -> float: ...

GEOJSON_SUFFIXES = (".geojson", ".json")


@dataclass
class AnnotationSource:
    """The annotations of one slide: a GeoJSON file's features, or a label store (``write_labels``), with the
    import options they were read with (the class table follows their ``ignore_classes`` rule)."""

    name: str
    file: AnnotationFile | None = None
    store: LabelOutput | None = None
    options: ImportOptions = field(default_factory=ImportOptions)

    @property
    def kind(self) -> str:
        return "geojson" if self.file is not None else "store"

    @property
    def _store(self) -> LabelOutput:
        if self.store is None:
            raise ConfigError(f"Annotation source '{self.name}' holds neither a GeoJSON file nor a label store; "
                              "open annotations with load_annotations.")
        return self.store

    def classes(self) -> dict[str, Colour | None]:
        if self.file is not None:
            return self.file.classes()
        colours = self._store.colours()
        return {n: cast(Colour, tuple(colours[k][:3])) if k in colours else None
                for k, n in enumerate(self._store.class_names, start=1)}

    def first_seen(self) -> dict[str, str]:
        if self.file is not None:
            return self.file.first_seen()
        return {n: f"{self.name}, label {k}" for k, n in enumerate(self._store.class_names, start=1)}

    def labels(self, table: ClassTable, plan: LabelGrid) -> PolygonLabels | StoreLabels:
        """Lazy labels of the slide at ``plan`` (shape, level-0 pixels per pixel) in ``table``'s classes."""
        if self.file is not None:
            features = [f for f in self.file.features if not table.drops(f.class_name)]
            return PolygonLabels([f.geometry for f in features], [table.label_of(f.class_name) for f in features],
                                 plan.shape, plan.downsample, name=self.name)
        return StoreLabels(self._store, plan.shape, plan.downsample, lut=table.lut(self._store.class_names))


def load_annotations(path: str | Path, *, slide: Any = None, frame: str = "qupath",
                     options: ImportOptions | Mapping[str, Any] | None = None,
                     class_map: Mapping[str, str] | None = None, clip: bool = False) -> AnnotationSource:
    """Open a QuPath GeoJSON file or a pfmseg label store; with ``slide``, check the extent against it.

    ``options`` (:class:`~.geojson.ImportOptions`, or a mapping naming some of them) say how QuPath's
    points, ignored classes and cells are read; None reads with the defaults.
    """
    from ..labelstore.omezarr import LabelOutput

    options = ImportOptions.of(options)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Annotations '{path}' do not exist; give a QuPath GeoJSON export or a label store saved by "
                        "the napari plugin (.ome.zarr).")
    if is_zarr(path):  # a zarr folder: ours, or refused below with what to do
        try:
            store = LabelOutput(path)
        except Exception as exc:
            raise DataError(f"'{path}' is not a pfmseg label store ({exc}); save annotation layers from napari with "
                            "File > Save Selected Layers (OME-Zarr labels).") from exc
        if not store.class_names:
            raise DataError(f"'{path}' names no classes (pfmseg metadata 'class_names'); save it again from the napari "
                            "plugin or with write_labels(class_names=...).")
        if class_map:
            store.pfmseg = {**store.pfmseg, "class_names": [class_map.get(n, n) for n in store.class_names]}
        return AnnotationSource(name=str(path), store=store, options=options)
    if path.suffix.lower() not in GEOJSON_SUFFIXES:
        raise DataError(f"'{path}' is neither GeoJSON ({', '.join(GEOJSON_SUFFIXES)}) nor a label store folder; "
                        "export annotations from QuPath with File > Export objects as GeoJSON.")
    offset = slide.bounds_offset if slide is not None else (0, 0)
    annotations = read_geojson(path, frame=frame, bounds_offset=offset, options=options, class_map=class_map)
    if slide is not None:
        width, height = slide.dimensions
        check_within(annotations, width, height, slide=f"slide '{slide.name}'", clip=clip)
    return AnnotationSource(name=str(path), file=annotations, options=options)


def class_table_of(sources: Sequence[AnnotationSource], class_names: Sequence[str] | None = None,
                   class_colours: Sequence[Sequence[int]] | None = None) -> ClassTable:
    """The class table of several sources (see :func:`~.geojson.class_table`), under the ``ignore_classes`` rule
    they were read with (one rule for all: a class cannot be trained on one slide and cleared on another)."""
    rules = {s.options.ignore_classes for s in sources}
    if len(rules) > 1:
        raise ConfigError("The annotations were read with different ignore_classes rules "
                          f"({', '.join(sorted(rules))}); read every slide's annotations with the same import options.")
    table = class_table([(s.name, s.classes(), s.first_seen()) for s in sources], class_names=class_names,
                        class_colours=class_colours, ignore_classes=rules.pop() if rules else None)
    for source in sources:
        if source.file is not None and not source.file.features:
            raise DataError(f"{source.name} holds no classified areas; annotate and classify regions in QuPath, "
                            "then export again.")
    return table
