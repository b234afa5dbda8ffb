"""Predict widget: predict the visible area, a drawn region or the whole slide; cancel; export.

Runs through the session's :class:`~._prediction.PredictionController`, which streams the engine's
chunks into a read-only labels layer. Exports use the engine's exporters on the finished OME-Zarr
output: a copy of the store, a pyramidal OME-TIFF, or GeoJSON polygons that QuPath imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from ._annotate_widget import is_slide_layer
from ._layers import META
from ._notify import notify_error, notify_info
from ._output_folder import OutputFolderRow
from ._prediction import RESOLUTION_LABEL, PredictSettings, export_prediction, prediction_controller
from ._qt_helpers import LayerCombo, button, dspin, group, row, save_file, spin, wrapped
from ._run_state import RunState
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
        from pfmseg_engine.jobs import PredictionSettings

        defaults = PredictionSettings()  # the form starts at the engine's defaults (the CLI's too)
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
        self.window_size = spin(0, 0, 8192, 16, tip="window side in pixels; 0: the model's input size")
        self.window_size.setSpecialValueText("model's")
        self.overlap = dspin(defaults.overlap, 0.0, 0.9, 0.05, 2, tip="overlap between neighbouring windows")
        self.batch = spin(defaults.batch_size, 1, 256, tip="windows per batch")
        self.chunk = spin(defaults.chunk, 64, 8192, 64, tip="output chunk side: results appear chunk by chunk")
        self.tissue = QCheckBox("tissue only (skip background)")
        self.tissue.setChecked(defaults.tissue)
        self.view_first = QCheckBox("whole slide: visible area first")
        self.view_first.setChecked(True)
        self.output = OutputFolderRow(self.session, self.image.layer)
        self.image.layer_changed.connect(self.output.refresh)
        self.run_state = RunState("%v / %m chunks")
        self.progress, self.status = self.run_state.progress, self.run_state.status
        self.measurements = wrapped("")
        self.measurements.setToolTip("area of each class in the finished prediction (the CSV beside the OME-Zarr)")
        self.save_measurements_button = button(
            "Save measurements…", self.save_measurements_dialog,
            "write the class areas of the last prediction as CSV where you choose (with a cohort table, one row "
            "per slide, when several slides were predicted)")
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
        form.addRow("window (px)", self.window_size)
        form.addRow("overlap", self.overlap)
        form.addRow("batch size", self.batch)
        form.addRow("chunk (px)", self.chunk)
        form.addRow(self.tissue)
        form.addRow(self.view_first)
        exports = QVBoxLayout()
        exports.addWidget(self.export_layer)
        exports.addWidget(self.per_region)
        exports.addWidget(row(QLabel("QuPath objects"), self.object_type, QLabel("min area (µm²)"), self.min_area))
        exports.addWidget(row(*(button(f"{kind.upper() if kind != 'geojson' else 'GeoJSON'}…",
                                       self._exporter(kind)) for kind in EXPORTS)))
        layout = QVBoxLayout(self)
        layout.addWidget(group("Prediction", form))
        layout.addWidget(self.output)
        layout.addWidget(row(self.predict_button, self.cancel_button))
        layout.addWidget(self.run_state)
        layout.addWidget(self.measurements)
        layout.addWidget(self.save_measurements_button)
        layout.addWidget(group("Export", exports))
        layout.addStretch(1)

        c = self.controller
        c.settings_source = self.settings
        c.progress.connect(self._on_progress)
        c.status.connect(self._on_status)
        c.started.connect(self._on_started)
        c.failed_to_start.connect(self._on_failed_to_start)
        c.finished.connect(self._on_finished)
        self.session.job_changed.connect(self._update_buttons)
        self.destroyed.connect(lambda *_: self._disconnect())
        self._update_buttons()

    def _disconnect(self) -> None:
        c = self.controller
        for signal, slot in ((c.progress, self._on_progress), (c.status, self._on_status),
                             (c.started, self._on_started), (c.failed_to_start, self._on_failed_to_start),
                             (c.finished, self._on_finished), (self.session.job_changed, self._update_buttons)):
            signal.disconnect(slot)

    def settings(self) -> PredictSettings:
        """The form as the plugin's choices plus the engine's ``PredictionSettings`` ("model's" fields: None)."""
        from pfmseg_engine.jobs import PredictionSettings

        prediction = PredictionSettings().with_overrides(
            target_mpp=self.target_mpp.value() or None, window=self.window_size.value() or None,
            overlap=self.overlap.value(), batch_size=self.batch.value(), chunk=self.chunk.value(),
            tissue=self.tissue.isChecked(), device=self.session.device)
        return PredictSettings(mode=self.mode.currentData(), view_first=self.view_first.isChecked(),
                               prediction=prediction)

    def set_mode(self, mode: str) -> None:
        self.mode.setCurrentIndex(list(MODE_LABELS).index(mode))

    def predict(self) -> Any:
        """Start a prediction with the form's settings; returns the worker (None if an error was shown)."""
        image = self.image.layer()
        if image is None:
            from pfmseg_engine import ConfigError

            self.run_state.fail(notify_error(ConfigError("Open a slide first (File > Open, or the demo sample)."),
                                             "Prediction"))
            return None
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

    def save_measurements(self, path: str | Path) -> list[Path]:
        """Write the last finished prediction's measurements CSV to ``path``; with finished predictions of
        more than one slide in the viewer, also their cohort table (a row per slide) as
        ``<path stem>_cohort.csv``. Returns the files written."""
        import shutil

        from pfmseg_engine import ConfigError
        from pfmseg_engine.annotations.measurements import write_cohort_measurements

        last = self.controller.last
        source = last.measurements if last is not None and last.status == "completed" else None
        if source is None or not Path(source).is_file():
            raise ConfigError("There are no measurements to save yet: let a prediction finish first.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = [Path(shutil.copyfile(source, path))]
        tables = finished_measurements(self.viewer)
        if len(tables) > 1:
            written.append(write_cohort_measurements(tables, path.with_name(f"{path.stem}_cohort.csv")))
        return written

    def save_measurements_dialog(self) -> None:
        last = self.controller.last
        default = ""
        if last is not None and last.path is not None:
            default = str(self.output.folder() / f"{Path(last.path).name.split('.')[0]}_measurements.csv")
        path = save_file(self, "Save measurements", "CSV (*.csv)", default)
        if not path:
            return
        try:
            written = self.save_measurements(path)
        except Exception as exc:
            notify_error(exc, "Saving measurements")
            return
        notify_info("Saved " + " and ".join(str(p) for p in written))

    # --- events ----------------------------------------------------------------------------------------
    def _on_started(self) -> None:
        self.measurements.setText("")
        self.run_state.begin(f"Predicting: {self.controller.subject}", "predicting")
        self._update_buttons()

    def _on_failed_to_start(self, message: str) -> None:
        self.run_state.fail(message)
        self._update_buttons()

    def _on_progress(self, done: int, total: int) -> None:
        self.run_state.advance(done, total)

    def _on_status(self, text: str) -> None:
        if text not in ("completed", "cancelled", "failed"):  # the end is shown by _on_finished
            self.run_state.say(text)
        self._update_buttons()

    def _on_finished(self, outcome: Any) -> None:
        self.measurements.setText(measurement_summary(outcome.measurements, outcome.measurement_rows))
        if outcome.status == "completed":
            self.run_state.finish("completed", f"Done: {outcome.path}")
            if outcome.layer is not None:
                self.export_layer.set_layer(outcome.layer)
        elif outcome.status == "cancelled":
            self.run_state.finish("cancelled", "Cancelled: finished chunks stay shown; predict again to resume.")
        else:
            self.run_state.fail(outcome.message or "Prediction failed.")
        self._update_buttons()

    def _update_buttons(self, *_: Any) -> None:
        self.predict_button.setEnabled(not self.session.job)
        self.cancel_button.setEnabled(self.controller.running)
        last = self.controller.last
        self.save_measurements_button.setEnabled(
            last is not None and last.status == "completed" and last.measurements is not None)

    def _exporter(self, kind: str) -> Callable[[], None]:
        return lambda: self._export_dialog(kind)

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


def finished_measurements(viewer: Any) -> list[Path]:
    """The measurements CSVs of every finished prediction layer in ``viewer`` (one per output, in layer order)."""
    from pfmseg_engine.annotations.measurements import measurements_path

    found: list[Path] = []
    for layer in viewer.layers:
        meta = layer.metadata.get(META, {})
        store = meta.get("store") if meta.get("kind") == "prediction" and meta.get("status") == "completed" else None
        if store:
            csv = measurements_path(store)
            if csv.is_file() and csv not in found:
                found.append(csv)
    return found


def measurement_summary(path: Path | None, measured: Sequence[dict[str, Any]]) -> str:
    """The finished prediction's class areas as dock text (the full table is the CSV beside the output)."""
    rows = [r for r in measured if r.get("class")]
    if not rows:
        return ""
    lines = []
    for r in rows:
        share = r.get("share_of_tissue")
        share = f", {float(share):.1%} of tissue" if share not in (None, "") else ""
        count = f", {int(float(r['count']))} objects" if r.get("count") not in (None, "") else ""
        lines.append(f"{r['class']}: {float(r['area_mm2']):.4g} mm²{share}{count}")
    return f"Measurements ({path or ''}):\n" + "\n".join(lines)
