"""Annotations in and measurements out: QuPath GeoJSON, sparse labels at any resolution, per-class statistics.

* :func:`read_geojson` / :func:`load_annotations` - QuPath's "Export objects as GeoJSON" (or a label store
  saved by the napari plugin) with checks that name the file, the feature and the fix, read in QuPath's
  terms (:class:`ImportOptions`: points and lines left out with a warning, ``*`` classes trained but
  not measured, cells by their boundary or nucleus, derived classes named "Tumor: Positive").
* :class:`PolygonLabels` / :class:`StoreLabels` - lazy label arrays of a slide at a training resolution,
  rasterised box by box (never a whole-slide raster in memory).
* :func:`labels_to_features` / :func:`labels_to_geojson` - labels out as QuPath objects (per class or per
  region, annotation or detection, holes and areas kept).
* :func:`measure_output` / :func:`write_measurements` / :func:`write_cohort_measurements` - area per class,
  share of tissue, connected regions and nucleus counts of a label store, chunk by chunk.

Names are re-exported lazily; nothing here imports torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("AnnotationFile", "ClassTable", "Feature", "ImportOptions", "check_within", "class_table",
                     "is_ignored_class", "read_geojson"), "geojson"),
    **dict.fromkeys(("PolygonLabels", "StoreLabels", "fill_rings", "rasterize"), "rasterize"),
    **dict.fromkeys(("AnnotationSource", "class_table_of", "load_annotations"), "sources"),
    **dict.fromkeys(("class_polygons", "labels_to_features", "labels_to_geojson", "write_geojson"), "export"),
    **dict.fromkeys(("cohort_measurements", "measure_output", "measurements_path", "read_measurements",
                     "write_cohort_measurements", "write_measurements"), "measurements"),
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
