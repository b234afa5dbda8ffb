"""Live widget: paint, and the prediction of the visible field refreshes within seconds.

Turning Live on starts the session's :class:`~._live.LiveController`: a head trains on the slide's
stored backbone features of the painted pixels while the user paints the annotation layer (every
stroke's bounding box goes to the loop when the stroke ends), and the visible field is re-predicted
(a labels layer and an uncertainty image layer over the slide, per-class areas below). The camera's
field is the loop's view, so panning predicts (and stores features of) what the user looks at.
"Suggest" asks for the K regions where a label would help most and shows them as rectangles to step
through. Turning Live off keeps the head: "Save head…" writes it as a checkpoint, "Fine-tune fully"
makes it the session's model for the Train widget. The GUI thread only copies strokes and places
layers; torch is never imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFormLayout, QPushButton, QVBoxLayout, QWidget

from ._annotate_widget import is_slide_layer
from ._annotations import classes_of, is_annotation_layer
from ._layers import META, class_features, label_colormap, placement, prediction_metadata
from ._live import LiveOptions, live_controller, stroke_box
from ._qt_helpers import LayerCombo, button, dspin, group, row, save_file, spin, wrapped
from ._run_state import RunState
from ._session import session_for

#: how long the camera must rest before the loop hears of the new field (ms)
VIEW_DELAY_MS = 120


class LiveWidget(QWidget):
    """Live mode: the toggle, what the loop reports, saving the head, and suggested regions."""

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.controller = live_controller(self.session)
        #: further engine ``LiveSettings`` fields (benchmarks and tests tune the schedule here)
        self.extra_settings: dict[str, Any] = {}
        self.image = LayerCombo(napari_viewer, is_slide_layer)
        self.annotations = LayerCombo(napari_viewer, is_annotation_layer)
        self.window_px = spin(512, 32, 4096, 32, tip="model input window, px; features are stored per window")
        self.mpp = dspin(0.0, 0.0, 100.0, 0.25, 3, special="model's",
                         tip="resolution the head works at (µm/px); default: the Model widget's")
        self.uncertainty = QComboBox()
        self.uncertainty.addItems(["entropy", "margin"])
        self.uncertainty.setToolTip("per-pixel uncertainty shown and used to rank suggestions")
        self.toggle = QPushButton("Live")
        self.toggle.setCheckable(True)
        self.toggle.setToolTip("train while you paint and re-predict the visible field; off keeps the head")
        self.toggle.toggled.connect(self._on_toggled)
        self.run_state = RunState("%v / %m windows stored")
        self.areas = wrapped("")
        self.k = spin(8, 1, 200, tip="number of regions to suggest")
        self.jump = spin(1, 1, 1, tip="suggestion to show")
        self.suggestion_info = wrapped("")
        self.prediction_layer: Any = None
        self.uncertainty_layer: Any = None
        self.suggestion_layer: Any = None
        self.regions: tuple[Any, ...] = ()
        self.current = -1
        self.predictions = 0
        self.last_prediction: Any = None
        self._uncertainty: tuple[Any, dict[str, Any]] | None = None  # latest map, shown when its layer is
        self._watched: Any = None
        self._view_timer = QTimer(self)
        self._view_timer.setSingleShot(True)
        self._view_timer.setInterval(VIEW_DELAY_MS)
        self._view_timer.timeout.connect(self.send_view)
        self._stroke: tuple[int, int, int, int] | None = None
        self._stroke_timer = QTimer(self)
        self._stroke_timer.setSingleShot(True)
        self._stroke_timer.setInterval(0)
        self._stroke_timer.timeout.connect(self._send_stroke)

        form = QFormLayout()
        form.addRow("slide", self.image)
        form.addRow("annotations", self.annotations)
        form.addRow("window (px)", self.window_px)
        form.addRow("µm/px", self.mpp)
        form.addRow("uncertainty", self.uncertainty)
        head = row(button("Save head…", self._save_dialog,
                          "write the live head as a checkpoint (frozen strategy); stops live mode first"),
                   button("Fine-tune fully", self.controller.hand_off,
                          "make the live head the current model and fine-tune it with the Train widget"))
        suggest = QFormLayout()
        suggest.addRow("regions", self.k)
        suggest.addRow(row(button("Suggest", self.suggest, "where a label would help most: uncertain and unlike "
                                  "what is labelled"),
                           button("Previous", self.previous), button("Next", self.next)))
        suggest.addRow(row(self.jump, button("Jump to", lambda: self.show_region(self.jump.value() - 1))))
        suggest.addRow(self.suggestion_info)
        layout = QVBoxLayout(self)
        layout.addWidget(group("Live head", form))
        layout.addWidget(self.toggle)
        layout.addWidget(self.run_state)
        layout.addWidget(self.areas)
        layout.addWidget(head)
        layout.addWidget(group("Where to annotate next", suggest))
        layout.addStretch(1)

        c = self.controller
        self._connections = ((c.status, self._on_status), (c.ready, self._on_ready), (c.fill, self._on_fill),
                             (c.step, self._on_step), (c.prediction, self._on_prediction),
                             (c.suggestions, self._on_suggestions), (c.ended, self._on_ended),
                             (c.started, self._on_started))
        for signal, slot in self._connections:
            signal.connect(slot)
        camera = self._camera()
        camera.events.center.connect(self._schedule_view)
        camera.events.zoom.connect(self._schedule_view)
        self.destroyed.connect(lambda *_: self._disconnect(camera))
        self.annotations.layer_changed.connect(self._watch)
        self._watch(self.annotations.layer())
        self.toggle.setChecked(c.running)

    def _camera(self) -> Any:
        return self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera

    def _disconnect(self, camera: Any) -> None:
        for signal, slot in self._connections:
            signal.disconnect(slot)
        camera.events.center.disconnect(self._schedule_view)
        camera.events.zoom.disconnect(self._schedule_view)
        self._watch(None)

    def options(self) -> LiveOptions:
        return LiveOptions(window=self.window_px.value(), mpp=self.mpp.value() or None,
                           uncertainty=self.uncertainty.currentText(), settings=dict(self.extra_settings))

    # --- on and off ---------------------------------------------------------------------------------
    def start(self) -> Any:
        """Turn live mode on; returns the worker (None after an error notice)."""
        if not self.toggle.isChecked():
            self.toggle.setChecked(True)  # _on_toggled starts it
        return self.controller.worker

    def stop(self) -> None:
        """Turn live mode off (after the current step); the head is kept."""
        self.toggle.setChecked(False)

    def _on_toggled(self, on: bool) -> None:
        if on and not self.controller.running:
            if self.controller.start(self.image.layer(), self.annotations.layer(), self.options()) is None:
                blocked = self.toggle.blockSignals(True)
                self.toggle.setChecked(False)
                self.toggle.blockSignals(blocked)
        elif not on and self.controller.running:
            self.controller.stop()

    def _on_started(self) -> None:
        self.run_state.begin(f"Live on: {getattr(self.image.layer(), 'name', '')}")
        self.toggle.setChecked(True)

    def _on_ready(self, _loop: Any) -> None:
        self.send_view()
        layer = self.annotations.layer()
        if layer is not None:
            self.controller.send_labels(layer, self.image.layer())

    def _on_ended(self, how: str) -> None:
        if how == "stopped":
            self.run_state.finish("cancelled", self.controller_status())
        else:
            self.run_state.fail(how)
        blocked = self.toggle.blockSignals(True)
        self.toggle.setChecked(False)
        self.toggle.blockSignals(blocked)

    def controller_status(self) -> str:
        return f"Live off after {self.controller.steps} steps; the head is kept (Save head…, Fine-tune fully)."

    # --- strokes and view ---------------------------------------------------------------------------
    def _watch(self, layer: Any) -> None:
        if self._watched is not None:
            self._watched.events.paint.disconnect(self._on_paint)
            self._watched.events.data.disconnect(self._on_data)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_data)

    def _on_paint(self, event: Any) -> None:
        """A stroke ended: its bounding box goes to the loop.

        napari emits ``paint`` before it writes the stroke into the array, so the box is read on the next
        turn of the event loop (strokes in the meantime join the same box).
        """
        layer = self._watched
        if layer is None or not self.controller.running:
            return
        box = stroke_box(event.value, layer.data.shape)
        if box is None:
            return
        boxes = [box, *([self._stroke] if self._stroke is not None else [])]
        self._stroke = (min(b[0] for b in boxes), max(b[1] for b in boxes),
                        min(b[2] for b in boxes), max(b[3] for b in boxes))
        self._stroke_timer.start()

    def _send_stroke(self) -> None:
        box, self._stroke = self._stroke, None
        if box is not None and self._watched is not None and self.controller.running:
            self.controller.send_labels(self._watched, self.image.layer(), box)

    def _on_data(self, *_: Any) -> None:
        """The whole labels array was replaced: send all of it (what it no longer holds is erased)."""
        if self._watched is not None and self.controller.running:
            self.controller.send_labels(self._watched, self.image.layer())

    def _schedule_view(self, *_: Any) -> None:
        if self.controller.running:
            self._view_timer.start()

    def view_box(self) -> tuple[float, float, float, float] | None:
        """The visible field of the slide, (x, y, width, height) level-0 pixels (None: nothing visible)."""
        image = self.image.layer()
        if image is None:
            return None
        from ._slides import visible_box

        y0, y1, x0, x1 = visible_box(self.viewer, image)
        if y1 <= y0 or x1 <= x0:
            return None
        return x0, y0, x1 - x0, y1 - y0

    def send_view(self) -> None:
        self.controller.set_view(self.view_box())

    # --- what the loop reports ----------------------------------------------------------------------
    def _on_status(self, text: str) -> None:
        self.run_state.say(text)

    def _on_fill(self, event: Any) -> None:
        self.run_state.advance(event.done, event.total)
        self.run_state.say(f"storing features: {len(event.windows) / max(event.seconds, 1e-9):.1f} windows/s")

    def _on_step(self, event: Any) -> None:
        self.run_state.say(f"step {event.step}: loss {event.loss:.3f} on {event.labelled_pixels:,} labelled px")

    def _on_prediction(self, event: Any) -> None:
        image = self.image.layer()
        annotations = self.annotations.layer()
        if image is None:
            return
        names, colours = classes_of(annotations) if annotations is not None else (list(event.areas_mm2), [])
        unit = float(image.scale[-1])
        place = placement(unit, event.scale, (event.offset[1], event.offset[0]))
        origin = np.asarray(image.translate[-2:], float)
        place["translate"] = tuple(np.asarray(place["translate"]) + origin)
        units = tuple(image.units[-2:])
        added = False
        if self.uncertainty_layer is None or self.uncertainty_layer not in self.viewer.layers:
            self.uncertainty_layer = self.viewer.add_image(
                event.uncertainty, name=f"{image.name} live uncertainty", colormap="magma", contrast_limits=(0, 1),
                opacity=0.4, blending="additive", units=units, visible=False, **place)
            self.uncertainty_layer.events.visible.connect(self._show_uncertainty)
            added = True
        if self.prediction_layer is None or self.prediction_layer not in self.viewer.layers:
            from ._layers import default_colours

            colours = colours or default_colours(len(names))
            meta = prediction_metadata(None, names, {i + 1: c for i, c in enumerate(colours)}, event.scale,
                                       (event.offset[1], event.offset[0]), live=True)
            self.prediction_layer = self.viewer.add_labels(
                event.labels, name=f"{image.name} live prediction", opacity=0.5, units=units,
                colormap=label_colormap({i + 1: c for i, c in enumerate(colours)}),
                features=class_features(names, "no prediction"), metadata={META: meta}, **place)
            added = True
        else:
            self.prediction_layer.scale, self.prediction_layer.translate = place["scale"], place["translate"]
            self.prediction_layer.data = event.labels
        if added:
            self._keep_annotations_on_top(annotations)
        self._uncertainty = (event.uncertainty, place)
        self._show_uncertainty()
        self.predictions += 1
        self.last_prediction = event
        self.areas.setText(" · ".join(f"{name} {area:.4g} mm²" for name, area in event.areas_mm2.items()))
        latency = f", {event.latency:.2f} s after the stroke" if event.latency is not None else ""
        self.run_state.say(f"step {event.step}: prediction refreshed{latency}")

    def _show_uncertainty(self, *_: Any) -> None:
        """Put the latest uncertainty into its layer when the layer is shown (a hidden one is not redrawn)."""
        layer = self.uncertainty_layer
        if self._uncertainty is None or layer is None or layer not in self.viewer.layers or not layer.visible:
            return
        data, place = self._uncertainty
        self._uncertainty = None
        if layer.data is not data:
            layer.scale, layer.translate = place["scale"], place["translate"]
            layer.data = data

    def _keep_annotations_on_top(self, annotations: Any) -> None:
        """New layers go on top and become selected; painting must go on in the annotation layer."""
        if annotations is None or annotations not in self.viewer.layers:
            return
        layers = self.viewer.layers
        layers.move(layers.index(annotations), len(layers))
        layers.selection.active = annotations

    # --- suggestions --------------------------------------------------------------------------------
    def suggest(self) -> Any:
        """Ask for the K regions to annotate next (shown as a shapes layer when they arrive)."""
        return self.controller.request_suggestions(self.k.value())

    def _on_suggestions(self, regions: tuple[Any, ...]) -> None:
        image = self.image.layer()
        self.regions = tuple(regions)
        if image is None:
            return
        rectangles = [np.array([[r.y, r.x], [r.y + r.height, r.x + r.width]], float) for r in self.regions]
        unit = float(image.scale[-1])
        translate = tuple(np.asarray(image.translate[-2:], float) - unit / 2)  # level-0 pixel edges
        if self.suggestion_layer is not None and self.suggestion_layer in self.viewer.layers:
            self.viewer.layers.remove(self.suggestion_layer)
        self.suggestion_layer = self.viewer.add_shapes(
            rectangles, shape_type="rectangle", name=f"{image.name} suggestions", edge_color="#ffc800",
            face_color="transparent", edge_width=max(2.0, 0.01 * max((r.width for r in self.regions), default=0)),
            scale=(unit, unit), translate=translate, units=tuple(image.units[-2:]),
            features={"rank": [r.rank for r in self.regions], "uncertainty": [r.uncertainty for r in self.regions]})
        self._keep_annotations_on_top(self.annotations.layer())
        self.jump.setMaximum(max(1, len(self.regions)))
        if self.regions:
            self.show_region(0)
        else:
            self.suggestion_info.setText("No region to suggest: store features of more tissue (pan around).")

    def show_region(self, index: int) -> None:
        """Move the camera to suggestion ``index`` (0-based) and select its rectangle."""
        if not self.regions:
            return
        image = self.image.layer()
        index = index % len(self.regions)
        self.current = index
        region = self.regions[index]
        unit = float(image.scale[-1])
        origin = np.asarray(image.translate[-2:], float)
        centre = origin + unit * (np.asarray([region.y + region.height / 2, region.x + region.width / 2]) - 0.5)
        camera = self._camera()
        camera.center = tuple(float(c) for c in centre)
        from ._slides import canvas_size

        height, width = canvas_size(self.viewer)
        camera.zoom = 0.7 * min(height / (region.height * unit), width / (region.width * unit))
        if self.suggestion_layer is not None:
            self.suggestion_layer.selected_data = {index}
        blocked = self.jump.blockSignals(True)
        self.jump.setValue(index + 1)
        self.jump.blockSignals(blocked)
        self.suggestion_info.setText(f"Region {index + 1} of {len(self.regions)}: uncertainty "
                                     f"{region.uncertainty:.2f}, {region.width:.0f} × {region.height:.0f} px.")

    def next(self) -> None:
        self.show_region(self.current + 1)

    def previous(self) -> None:
        self.show_region(self.current - 1)

    # --- the head -----------------------------------------------------------------------------------
    def save_head(self, path: Any) -> Any:
        """Write the live head as a checkpoint at ``path`` (in a worker)."""
        return self.controller.save(path)

    def _save_dialog(self) -> None:
        path = save_file(self, "Save the live head", "pfmseg checkpoint (*.pt)", "live_head.pt")
        if path:
            self.save_head(path)
