"""Small Qt building blocks shared by the widgets (layer pickers, forms, file dialogs)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers that satisfy ``accept``, kept in sync with the layer list."""

    layer_changed = Signal(object)

    def __init__(self, viewer: Any, accept: Callable[[Any], bool], parent: QWidget | None = None,
                 allow_none: bool = False):
        super().__init__(parent)
        self.viewer = viewer
        self.accept = accept
        self.allow_none = allow_none
        self._layers: list[Any] = []
        self._watched: weakref.WeakSet = weakref.WeakSet()
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self.refresh)
        self.currentIndexChanged.connect(lambda _: self.layer_changed.emit(self.layer()))
        self.destroyed.connect(lambda *_: self._disconnect(events))
        self.refresh()

    def _disconnect(self, events: Any) -> None:
        for event in (events.inserted, events.removed, events.reordered):
            event.disconnect(self.refresh)
        for layer in list(self._watched):
            layer.events.name.disconnect(self._rename)

    def refresh(self, *_: Any) -> None:
        current = self.layer()
        layers = [layer for layer in self.viewer.layers if self.accept(layer)]
        for layer in layers:  # follow renames
            if layer not in self._watched:
                self._watched.add(layer)
                layer.events.name.connect(self._rename)
        blocked = self.blockSignals(True)
        self.clear()
        self._layers = ([None] if self.allow_none else []) + layers
        for layer in self._layers:
            self.addItem("(none)" if layer is None else layer.name)
        if current in self._layers:
            self.setCurrentIndex(self._layers.index(current))
        elif layers:
            self.setCurrentIndex(self._layers.index(layers[-1]))
        self.blockSignals(blocked)
        if self.layer() is not current:
            self.layer_changed.emit(self.layer())

    def _rename(self, *_: Any) -> None:
        for i, layer in enumerate(self._layers):
            if layer is not None:
                self.setItemText(i, layer.name)

    def layer(self) -> Any:
        index = self.currentIndex()
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def set_layer(self, layer: Any) -> None:
        self.refresh()
        if layer in self._layers:
            self.setCurrentIndex(self._layers.index(layer))


def spin(value: int, low: int, high: int, step: int = 1, tip: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def dspin(value: float, low: float, high: float, step: float, decimals: int = 3, tip: str = "",
          special: str = "") -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    if special:
        box.setSpecialValueText(special)
    return box


def button(text: str, slot: Callable[[], Any], tip: str = "") -> QPushButton:
    widget = QPushButton(text)
    widget.setToolTip(tip)
    widget.clicked.connect(lambda *_: slot())
    return widget


def row(*widgets: QWidget) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return holder


def group(title: str, layout: Any) -> QGroupBox:
    box = QGroupBox(title)
    box.setLayout(layout)
    return box


def wrapped(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def open_file(parent: QWidget, title: str, filters: str) -> str:
    path, _ = QFileDialog.getOpenFileName(parent, title, "", filters)
    return path


def save_file(parent: QWidget, title: str, filters: str, default: str = "") -> str:
    path, _ = QFileDialog.getSaveFileName(parent, title, default, filters)
    return path


def open_folder(parent: QWidget, title: str) -> str:
    return QFileDialog.getExistingDirectory(parent, title)
