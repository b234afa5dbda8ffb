"""Predict widget: predict the visible area, a drawn region or the whole slide; cancel; export.

Runs through the session's :class:`~._prediction.PredictionController`, which streams the engine's
chunks into a read-only labels layer. Exports use the engine's exporters on the finished OME-Zarr
output: a copy of the store, a pyramidal OME-TIFF, or GeoJSON polygons that QuPath imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QVBoxLayout,
    QWidget,
)

from ._annotate_widget import is_slide_layer
from ._layers import META
from ._notify import notify_error, notify_info
from ._prediction import RESOLUTION_LABEL, PredictSettings, export_prediction, prediction_controller
from ._qt_helpers import LayerCombo, button, dspin, group, open_folder, row, save_file, spin, wrapped
from ._session import session_for
from ._torch_guard import guard_triton

MODE_LABELS = {"view": "visible area", "region": "drawn region (shapes layer)", "slide": "whole slide"}
EXPORTS = {"zarr": ("OME-Zarr (*.zarr)", ".ome.zarr"), "tiff": ("Pyramidal OME-TIFF (*.ome.tif *.tif)", ".ome.tif"),
           "geojson": ("GeoJSON for QuPath (*.geojson)", ".geojson")}


def is_prediction_layer(layer: Any) -> bool:
    return layer.metadata.get(META, {}).get("kind") == "prediction"


class PredictWidget(QWidget):
    """Run and export whole-slide (or region) predictions."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        guard_triton()
        import pfmseg_engine.inference.slide  # noqa: F401  heavy import now, not in the worker
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.controller = prediction_controller(self.session)

        self.image = LayerCombo(napari_viewer, is_slide_layer)
        self.mode = QComboBox()
        for key, label in MODE_LABELS.items():
            self.mode.addItem(label, key)
        self.shapes = LayerCombo(napari_viewer, lambda layer: layer.__class__.__name__ == "Shapes", allow_none=True)
        self.target_mpp = dspin(0.0, 0.0, 100.0, 0.25, 3, special="model's",
                                tip="output resolution (µm/px); default: the resolution the model was trained at")
        self.window = spin(0, 0, 8192, 16, tip="window side in pixels; 0: the model's input size")
        self.window.setSpecialValueText("model's")
        self.overlap = dspin(0.25, 0.0, 0.9, 0.05, 2, tip="overlap between neighbouring windows")
        self.batch = spin(4, 1, 256, tip="windows per batch")
        self.chunk = spin(512, 64, 8192, 64, tip="output chunk side: results appear chunk by chunk")
        self.tissue = QCheckBox("tissue only (skip background)")
        self.tissue.setChecked(True)
        self.view_first = QCheckBox("whole slide: visible area first")
        self.view_first.setChecked(True)
        self.output = QLineEdit()
        self.output.setPlaceholderText(str(self.session.output_dir("predictions")))
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m chunks")
        self.status = wrapped("Idle.")
        self.measurements = wrapped("")
        self.measurements.setToolTip("area of each class in the finished prediction (the CSV beside the OME-Zarr)")
        self.export_layer = LayerCombo(napari_viewer, is_prediction_layer)
        self.per_region = QCheckBox("GeoJSON: one object per connected region")
        self.object_type = QComboBox()
        self.object_type.addItems(["annotation", "detection"])
        self.object_type.setToolTip("QuPath object type of the exported regions")
        self.min_area = dspin(0.0, 0.0, 1e9, 10.0, 1, tip="GeoJSON: drop regions smaller than this (µm²)")
        self.predict_button = button("Predict", self.predict)
        self.cancel_button = button("Cancel", self.controller.cancel, "stop after the current chunk (resumable)")

        form = QFormLayout()
        form.addRow("slide", self.image)
        form.addRow("what", self.mode)
        form.addRow("region layer", self.shapes)
        form.addRow(RESOLUTION_LABEL, self.target_mpp)
        form.addRow("window (px)", self.window)
        form.addRow("overlap", self.overlap)
        form.addRow("batch size", self.batch)
        form.addRow("chunk (px)", self.chunk)
        form.addRow(self.tissue)
        form.addRow(self.view_first)
        form.addRow("output folder", row(self.output, button("…", self._browse_output)))
        exports = QVBoxLayout()
        exports.addWidget(self.export_layer)
        exports.addWidget(self.per_region)
        exports.addWidget(row(QLabel("QuPath objects"), self.object_type, QLabel("min area (µm²)"), self.min_area))
        exports.addWidget(row(*(button(f"{kind.upper() if kind != 'geojson' else 'GeoJSON'}…",
                                       lambda k=kind: self._export_dialog(k)) for kind in EXPORTS)))
        layout = QVBoxLayout(self)
        layout.addWidget(group("Prediction", form))
        layout.addWidget(row(self.predict_button, self.cancel_button))
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.measurements)
        layout.addWidget(group("Export", exports))
        layout.addStretch(1)

        c = self.controller
        c.settings_source = self.settings
        c.progress.connect(self._on_progress)
        c.status.connect(self._on_status)
        c.finished.connect(self._on_finished)
        self.session.job_changed.connect(self._update_buttons)
        self.destroyed.connect(lambda *_: self._disconnect())
        self._update_buttons()

    def _disconnect(self) -> None:
        c = self.controller
        for signal, slot in ((c.progress, self._on_progress), (c.status, self._on_status),
                             (c.finished, self._on_finished), (self.session.job_changed, self._update_buttons)):
            signal.disconnect(slot)

    def settings(self) -> PredictSettings:
        return PredictSettings(
            mode=self.mode.currentData(), target_mpp=self.target_mpp.value() or None,
            window=self.window.value() or None, overlap=self.overlap.value(), batch_size=self.batch.value(),
            chunk=self.chunk.value(), tissue=self.tissue.isChecked(), view_first=self.view_first.isChecked(),
            output_dir=self.output.text().strip() or None)

    def set_mode(self, mode: str) -> None:
        self.mode.setCurrentIndex(list(MODE_LABELS).index(mode))

    def predict(self) -> Any:
        """Start a prediction with the form's settings; returns the worker (None if an error was shown)."""
        image = self.image.layer()
        if image is None:
            from pfmseg_engine import ConfigError

            notify_error(ConfigError("Open a slide first (File > Open, or the demo sample)."), "Prediction")
            return None
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        return self.controller.start(image, self.settings(), self.shapes.layer())

    def export(self, layer: Any, path: str | Path, kind: str) -> Path | None:
        """Export a finished prediction layer (``zarr``, ``tiff`` or ``geojson``)."""
        options = {"per_region": self.per_region.isChecked(), "object_type": self.object_type.currentText(),
                   "min_area_um2": self.min_area.value()} if kind == "geojson" else {}
        try:
            written = export_prediction(layer, path, kind, **options)
        except Exception as exc:
            notify_error(exc, "Export")
            return None
        notify_info(f"Exported {layer.name} to {written}")
        return written

    # --- events ----------------------------------------------------------------------------------------
    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)

    def _on_status(self, text: str) -> None:
        self.status.setText(text[:1].upper() + text[1:] + ("…" if text.endswith("ing") else "."))
        self._update_buttons()

    def _on_finished(self, outcome: Any) -> None:
        self.measurements.setText(measurement_summary(outcome.extra.get("measurements") or {}))
        if outcome.status == "completed":
            self.status.setText(f"Done: {outcome.path}")
            if outcome.layer is not None:
                self.export_layer.set_layer(outcome.layer)
        elif outcome.status == "cancelled":
            self.status.setText("Cancelled: finished chunks stay shown; predict again to resume.")
        else:
            self.status.setText(outcome.message or "Failed.")
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        self.predict_button.setEnabled(not self.session.job)
        self.cancel_button.setEnabled(self.controller.running)

    def _browse_output(self) -> None:
        folder = open_folder(self, "Output folder")
        if folder:
            self.output.setText(folder)

    def _export_dialog(self, kind: str) -> None:
        layer = self.export_layer.layer()
        if layer is None:
            from pfmseg_engine import ConfigError

            notify_error(ConfigError("There is no finished prediction layer to export; run a prediction first."),
                         "Export")
            return
        filters, suffix = EXPORTS[kind]
        path = save_file(self, f"Export {layer.name}", filters, f"{layer.name.split(' ')[0]}{suffix}")
        if path:
            self.export(layer, path, kind)


def measurement_summary(measured: dict[str, Any]) -> str:
    """The finished prediction's class areas as dock text (the full table is the CSV beside the output)."""
    rows = [r for r in measured.get("rows", ()) if r.get("class")]
    if not rows:
        return ""
    lines = []
    for r in rows:
        share = r.get("share_of_tissue")
        share = f", {float(share):.1%} of tissue" if share not in (None, "") else ""
        count = f", {int(float(r['count']))} objects" if r.get("count") not in (None, "") else ""
        lines.append(f"{r['class']}: {float(r['area_mm2']):.4g} mm²{share}{count}")
    return "Measurements (" + str(measured.get("path", "")) + "):\n" + "\n".join(lines)
