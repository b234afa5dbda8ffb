"""Annotate widget: an annotation labels layer on a working resolution, its classes and pixel counts.

Painting happens with napari's own labels tools; this widget only creates the layer so that it lines
up with the slide at the chosen µm/px, edits the class names and colours (label k = class k-1,
0 = not annotated) and shows how many pixels each class has, which tells the annotator which class
needs more examples before training. The QuPath group imports QuPath's GeoJSON export as such a layer
(plus its outlines) and exports an annotation layer as QuPath objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QColorDialog,
    QComboBox,
    QFormLayout,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._annotations import classes_of, is_annotation_layer, new_annotation_layer, pixel_counts, set_classes
from ._layers import META, unit_label
from ._notify import notify_error, notify_info
from ._qt_helpers import LayerCombo, button, dspin, group, open_file, row, save_file, wrapped
from ._session import DEFAULT_CLASSES, session_for
from ._slides import require_slide_mpp
from ._torch_guard import guard_triton

#: Default working resolution keeps the annotation layer at most this many pixels per side.
MAX_SIDE = 4096


def is_slide_layer(layer: Any) -> bool:
    return getattr(layer, "rgb", False) and layer.__class__.__name__ == "Image"


class AnnotateWidget(QWidget):
    """Create annotation layers and manage their classes."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        guard_triton()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.image = LayerCombo(napari_viewer, is_slide_layer)
        self.slide_mpp = dspin(0.0, 0.0, 100.0, 0.05, 4, special="unknown",
                               tip="microns per pixel of the slide's full resolution (from the file when known)")
        self.target_mpp = dspin(2.0, 0.01, 100.0, 0.25, 3, tip="resolution of the annotation layer (µm/px)")
        self.layer_info = wrapped()
        self.annotations = LayerCombo(napari_viewer, is_annotation_layer)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["colour", "class", "pixels"])
        header, rows = self.table.horizontalHeader(), self.table.verticalHeader()
        if header is not None:
            header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        if rows is not None:
            rows.setVisible(False)
        self.totals = wrapped()
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(150)
        self._count_timer.timeout.connect(self.update_counts)
        self._watched: Any = None

        create = QFormLayout()
        create.addRow("slide", self.image)
        create.addRow("slide µm/px", self.slide_mpp)
        create.addRow("annotate at µm/px", self.target_mpp)
        create.addRow(self.layer_info)
        create.addRow(button("New annotation layer", self.create_layer,
                             "labels layer aligned with the slide at the chosen resolution"))
        classes = QVBoxLayout()
        classes.addWidget(self.annotations)
        classes.addWidget(self.table)
        classes.addWidget(row(button("Add class", self.add_class), button("Remove last class", self.remove_class)))
        classes.addWidget(self.totals)
        self.per_region = QCheckBox("one object per region")
        self.per_region.setToolTip("export each connected region as its own QuPath object (else one per class)")
        self.object_type = QComboBox()
        self.object_type.addItems(["annotation", "detection"])
        self.object_type.setToolTip("QuPath object type of exported regions (detections: many small objects)")
        self.min_area = dspin(0.0, 0.0, 1e9, 10.0, 1, tip="leave out regions smaller than this (µm²)")
        from pfmseg_engine.annotations.geojson import CELL_SHAPES, IGNORE_RULES, ImportOptions

        defaults = ImportOptions()
        self.cells = QComboBox()
        self.cells.addItems(list(CELL_SHAPES))
        self.cells.setCurrentText(defaults.cells)
        self.cells.setToolTip("which outline of a QuPath cell object is imported: its boundary or its nucleus")
        self.ignore_classes = QComboBox()
        self.ignore_classes.addItems(list(IGNORE_RULES))
        self.ignore_classes.setCurrentText(defaults.ignore_classes)
        self.ignore_classes.setToolTip("qupath: classes ending in * are trained and not measured, Region* is not "
                                       "imported; prefix: areas of classes starting with Ignore stay unannotated")
        qupath = QFormLayout()
        qupath.addRow(row(button("Import GeoJSON…", self._import_dialog,
                                 "QuPath 'Export objects as GeoJSON' -> an annotation layer (and outlines) on the "
                                 "slide, at the resolution above"),
                          button("Export GeoJSON…", self._export_dialog,
                                 "the annotation layer as QuPath objects (level-0 pixel coordinates)")))
        qupath.addRow("import cells as", self.cells)
        qupath.addRow("ignored classes", self.ignore_classes)
        qupath.addRow(row(self.per_region, self.object_type))
        qupath.addRow("min. region area (µm²)", self.min_area)
        layout = QVBoxLayout(self)
        layout.addWidget(group("Annotation layer", create))
        layout.addWidget(group("Classes (label k = class k-1, 0 = not annotated)", classes))
        layout.addWidget(group("QuPath", qupath))
        layout.addStretch(1)

        self.image.layer_changed.connect(self._on_image)
        self.target_mpp.valueChanged.connect(self._update_layer_info)
        self.slide_mpp.valueChanged.connect(self._update_layer_info)
        self.slide_mpp.editingFinished.connect(self.apply_slide_mpp)
        self.annotations.layer_changed.connect(self._on_annotations)
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.cellClicked.connect(self._on_cell_clicked)
        self._on_image(self.image.layer())
        self._on_annotations(self.annotations.layer())

    # --- creating ----------------------------------------------------------------------------------
    def _slide_mpp(self) -> float | None:
        return self.slide_mpp.value() or None

    def _on_image(self, layer: Any) -> None:
        if layer is None:
            self.layer_info.setText("Open a slide (File > Open, or File > Open Sample > pfmseg).")
            return
        from ._slides import entered_mpp_allowed, layer_mpp, level_arrays

        mpp = layer_mpp(layer)
        blocked = self.slide_mpp.blockSignals(True)
        self.slide_mpp.setValue(mpp or 0.0)
        self.slide_mpp.blockSignals(blocked)
        self.slide_mpp.setEnabled(entered_mpp_allowed(layer))
        if mpp:
            height, width = level_arrays(layer)[0].shape[:2]
            self.target_mpp.setValue(round(max(mpp, mpp * max(height, width) / MAX_SIDE), 3))
        self._update_layer_info()

    def apply_slide_mpp(self) -> bool:
        """Give the chosen slide the µm/px in the field when its file has none: the layer moves to µm and
        the value is remembered for the file. Returns whether the slide changed."""
        from ._slides import calibrate_slide, entered_mpp_allowed

        layer, mpp = self.image.layer(), self._slide_mpp()
        if layer is None or not mpp or not entered_mpp_allowed(layer):
            return False
        if layer.metadata.get(META, {}).get("mpp") == mpp:
            return False
        calibrate_slide(layer, mpp)
        notify_info(f"'{layer.name}' is now at {mpp:g} µm/px (remembered for this file).")
        self._update_layer_info()
        return True

    def _update_layer_info(self, *_: Any) -> None:
        layer = self.image.layer()
        mpp = self._slide_mpp()
        if layer is None:
            return
        if not mpp:
            self.layer_info.setText("This slide has no µm/px in its metadata: enter it above.")
            return
        from ._slides import level_arrays

        height, width = level_arrays(layer)[0].shape[:2]
        factor = max(1.0, self.target_mpp.value() / mpp)
        self.layer_info.setText(f"annotation layer ≈ {int(width / factor)} × {int(height / factor)} px "
                                f"({factor:.3g}× coarser than the slide)")

    def create_layer(self) -> Any:
        """Add an annotation labels layer over the chosen slide; returns it (None on error)."""
        try:
            image = self.image.layer()
            if image is None:
                from pfmseg_engine import ConfigError

                raise ConfigError("Open a slide first (File > Open, or File > Open Sample > pfmseg > demo slide).")
            self.apply_slide_mpp()
            mpp = self._slide_mpp()
            slide = self.session.slide_for(image, mpp)
            require_slide_mpp(slide, image)
            names, colours = self._classes_for_new_layer()
            data, kwargs = new_annotation_layer(image, slide, max(self.target_mpp.value(), slide.mpp), names, colours)
        except Exception as exc:
            notify_error(exc, "Creating the annotation layer")
            return None
        layer = self.viewer.add_labels(data, **kwargs)
        layer.selected_label = 1
        layer.mode = "paint"
        self.annotations.set_layer(layer)
        return layer

    # --- QuPath ---------------------------------------------------------------------------------------
    def import_geojson(self, path: str | Path) -> Any:
        """Add a QuPath GeoJSON over the chosen slide as an annotation layer (and an outline shapes layer).

        The layer is at the "annotate at µm/px" resolution, ready to paint and train on; returns it (None on
        error, which is shown as a notification naming the file, the feature and the fix).
        """
        try:
            image = self.image.layer()
            if image is None:
                from pfmseg_engine import ConfigError

                raise ConfigError("Open the slide the annotations were drawn on first (File > Open).")
            self.apply_slide_mpp()
            mpp = self._slide_mpp()
            slide = self.session.slide_for(image, mpp)
            require_slide_mpp(slide, image)
            from ._qupath import import_geojson

            options = {"cells": self.cells.currentText(), "ignore_classes": self.ignore_classes.currentText()}
            (data, kwargs), shapes = import_geojson(image, slide, path, max(self.target_mpp.value(), slide.mpp),
                                                    options=options)
        except Exception as exc:
            notify_error(exc, "Importing the GeoJSON")
            return None
        if shapes is not None:
            polygons, shape_kwargs = shapes
            self.viewer.add_shapes(polygons, **shape_kwargs)
        layer = self.viewer.add_labels(data, **kwargs)
        layer.selected_label = 1
        self.annotations.set_layer(layer)
        notify_info(f"Imported {Path(path).name}: classes {', '.join(kwargs['metadata'][META]['class_names'])}.")
        return layer

    def export_geojson(self, path: str | Path, layer: Any = None) -> Path | None:
        """Write the annotation layer (or ``layer``) as QuPath objects; returns the file (None on error)."""
        layer = layer if layer is not None else self.annotations.layer()
        try:
            if layer is None:
                from pfmseg_engine import ConfigError

                raise ConfigError("There is no annotation layer to export; create or import one first.")
            from ._qupath import export_layer

            written = export_layer(layer, path, image=self.image.layer(), per_region=self.per_region.isChecked(),
                                   object_type=self.object_type.currentText(), min_area_um2=self.min_area.value())
        except Exception as exc:
            notify_error(exc, "Exporting the GeoJSON")
            return None
        notify_info(f"Exported {layer.name} to {written} (open it in QuPath: File > Import objects).")
        return written

    def _import_dialog(self) -> None:
        path = open_file(self, "Import QuPath GeoJSON", "GeoJSON (*.geojson *.json)")
        if path:
            self.import_geojson(path)

    def _export_dialog(self) -> None:
        layer = self.annotations.layer()
        default = f"{layer.name}.geojson" if layer is not None else "annotations.geojson"
        path = save_file(self, "Export as QuPath GeoJSON", "GeoJSON (*.geojson)", default)
        if path:
            self.export_geojson(path)

    def _classes_for_new_layer(self) -> tuple[list[str], list[list[int]]]:
        current = self.annotations.layer()
        if current is not None:
            return classes_of(current)
        model = self.session.model
        names = list(model.config.class_names) if model is not None else list(DEFAULT_CLASSES)
        from ._layers import default_colours

        return names, default_colours(len(names))

    # --- classes -------------------------------------------------------------------------------------
    def _on_annotations(self, layer: Any) -> None:
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data, self._watched.events.set_data):
                event.disconnect(self._schedule_counts)
        self._watched = layer
        if layer is not None:
            for event in (layer.events.paint, layer.events.data, layer.events.set_data):
                event.connect(self._schedule_counts)
        self._fill_table()

    def _fill_table(self) -> None:
        layer = self.annotations.layer()
        blocked = self.table.blockSignals(True)
        self.table.setRowCount(0)
        if layer is not None:
            names, colours = classes_of(layer)
            self.table.setRowCount(len(names))
            for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
                swatch = QTableWidgetItem(str(i + 1))
                swatch.setBackground(QColor(*colour[:3]))
                swatch.setFlags(Qt.ItemFlag.ItemIsEnabled)
                swatch.setToolTip("click to change the colour")
                self.table.setItem(i, 0, swatch)
                self.table.setItem(i, 1, QTableWidgetItem(name))
                count = QTableWidgetItem("0")
                count.setFlags(Qt.ItemFlag.ItemIsEnabled)
                self.table.setItem(i, 2, count)
        self.table.blockSignals(blocked)
        self.update_counts()

    def class_names(self) -> list[str]:
        from pfmseg_engine.classes import default_class_names

        items = [self.table.item(i, 1) for i in range(self.table.rowCount())]
        defaults = default_class_names(len(items))
        return [(item.text().strip() if item is not None else "") or default
                for item, default in zip(items, defaults, strict=True)]

    def _apply_classes(self, names: list[str], colours: list[list[int]]) -> None:
        layer = self.annotations.layer()
        if layer is not None:
            set_classes(layer, names, colours)
            self._fill_table()

    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        layer = self.annotations.layer()
        if layer is None or item.column() != 1:
            return
        _, colours = classes_of(layer)
        names = self.class_names()
        if len(set(names)) != len(names):
            from pfmseg_engine import DataError

            notify_error(DataError(f"class names must differ, got {names}; choose another name."), "Renaming the class")
            self._fill_table()
            return
        set_classes(layer, names, colours)

    def _on_cell_clicked(self, index: int, column: int) -> None:
        layer = self.annotations.layer()
        if layer is None:
            return
        layer.selected_label = index + 1  # paint this class next
        if column == 0:
            names, colours = classes_of(layer)
            colour = QColorDialog.getColor(QColor(*colours[index][:3]), self, f"Colour of '{names[index]}'")
            if colour.isValid():
                colours[index] = [colour.red(), colour.green(), colour.blue()]
                self._apply_classes(names, colours)

    def add_class(self, name: str | None = None) -> None:
        layer = self.annotations.layer()
        if layer is None:
            return
        from pfmseg_engine.classes import default_class_names

        from ._layers import default_colours

        names, colours = classes_of(layer)
        names.append(name or default_class_names(len(names) + 1)[-1])
        colours.append(default_colours(len(names))[-1])
        self._apply_classes(names, colours)

    def remove_class(self) -> None:
        layer = self.annotations.layer()
        if layer is None:
            return
        names, colours = classes_of(layer)
        if len(names) <= 1:
            return
        if np.any(np.asarray(layer.data) == len(names)):
            from pfmseg_engine import DataError

            notify_error(DataError(f"class '{names[-1]}' still has annotated pixels; erase them first."),
                         "Removing the class")
            return
        self._apply_classes(names[:-1], colours[:-1])

    # --- counts --------------------------------------------------------------------------------------
    def _schedule_counts(self, *_: Any) -> None:
        self._count_timer.start()

    def counts(self) -> list[int]:
        layer = self.annotations.layer()
        return pixel_counts(layer.data, self.table.rowCount()) if layer is not None else []

    def update_counts(self) -> None:
        layer = self.annotations.layer()
        if layer is None:
            self.totals.setText("No annotation layer: create one above.")
            return
        counts = self.counts()
        blocked = self.table.blockSignals(True)
        for i, count in enumerate(counts):
            item = self.table.item(i, 2)
            if item is not None:
                item.setText(f"{count:,}")
        self.table.blockSignals(blocked)
        outside = int(np.count_nonzero(np.asarray(layer.data) > len(counts)))
        unit = layer.scale[-1] ** 2
        area = sum(counts) * unit
        units = unit_label(layer.units[-1]) if getattr(layer, "units", None) else "px"
        text = f"{sum(counts):,} annotated pixels ({area:,.0f} {units}²)."
        if outside:
            text += f" {outside:,} pixels use labels without a class: add classes."
        self.totals.setText(text)
