"""A small live plot of training loss and validation score, painted with QPainter.

Loss goes on the left axis (auto range), validation metrics on the right axis (0..1). A few hundred
points repaint in well under a millisecond, so updating after every batch never stalls the viewer
(a matplotlib canvas redraw takes tens of milliseconds and imports a second GUI backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget


@dataclass
class Series:
    label: str
    colour: str
    right_axis: bool = False
    points: list[tuple[float, float]] = field(default_factory=list)
    markers: bool = False


class CurvePlot(QWidget):
    """Line plot of named series over a shared x axis (epochs, fractional during an epoch)."""

    MARGIN = (34, 34, 8, 22)  # left, right, top, bottom

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.series: dict[str, Series] = {}
        self.x_label = "epoch"
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def add_series(self, key: str, label: str, colour: str, right_axis: bool = False, markers: bool = False) -> None:
        self.series[key] = Series(label, colour, right_axis, markers=markers)

    def append(self, key: str, x: float, y: float | None) -> None:
        if y is None or not math.isfinite(y):
            return
        self.series[key].points.append((float(x), float(y)))
        self.update()

    def clear(self) -> None:
        for series in self.series.values():
            series.points.clear()
        self.update()

    def values(self, key: str) -> list[tuple[float, float]]:
        return list(self.series[key].points)

    # --- painting ------------------------------------------------------------------------------------
    def _ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
        xs = [x for s in self.series.values() for x, _ in s.points]
        ys = [y for s in self.series.values() if not s.right_axis for _, y in s.points]
        x_range = (min(xs, default=0.0), max(max(xs, default=1.0), min(xs, default=0.0) + 1e-9))
        y_range = (min(0.0, min(ys, default=0.0)), max(ys, default=1.0) * 1.05 or 1.0)
        return x_range, y_range

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        left, right, top, bottom = self.MARGIN
        plot = QRectF(left, top, max(1, self.width() - left - right), max(1, self.height() - top - bottom))
        text = self.palette().windowText().color()
        painter.setPen(QPen(text, 1))
        painter.drawRect(plot)
        (x0, x1), (y0, y1) = self._ranges()

        def to_px(x: float, y: float, right_axis: bool) -> QPointF:
            lo, hi = (0.0, 1.0) if right_axis else (y0, y1)
            px = plot.left() + (x - x0) / (x1 - x0) * plot.width()
            py = plot.bottom() - (y - lo) / ((hi - lo) or 1.0) * plot.height()
            return QPointF(px, py)

        font = painter.font()
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
        painter.setFont(font)
        align_right = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        align_left = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
        painter.drawText(QRectF(0, top - 6, left - 3, 12), align_right, f"{y1:.2g}")
        painter.drawText(QRectF(0, plot.bottom() - 6, left - 3, 12), align_right, f"{y0:.2g}")
        painter.drawText(QRectF(plot.right() + 3, top - 6, right, 12), align_left, "1")
        painter.drawText(QRectF(plot.right() + 3, plot.bottom() - 6, right, 12), align_left, "0")
        painter.drawText(QRectF(plot.left(), plot.bottom() + 2, 60, 14), align_left, f"{x0:.3g}")
        painter.drawText(QRectF(plot.right() - 60, plot.bottom() + 2, 60, 14), align_right, f"{x1:.3g}")
        painter.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), 14), Qt.AlignmentFlag.AlignHCenter,
                         self.x_label)
        legend_y = top + 4
        for series in self.series.values():
            colour = QColor(series.colour)
            painter.setPen(QPen(colour, 1.6))
            if len(series.points) > 1:
                path = QPainterPath(to_px(*series.points[0], series.right_axis))
                for point in series.points[1:]:
                    path.lineTo(to_px(*point, series.right_axis))
                painter.drawPath(path)
            if series.markers or len(series.points) == 1:
                for point in series.points:
                    painter.drawEllipse(to_px(*point, series.right_axis), 2.5, 2.5)
            if series.points:
                painter.drawText(QRectF(plot.left() + 6, legend_y, plot.width() - 12, 12), align_left,
                                 f"{series.label}{' (right)' if series.right_axis else ''}")
                legend_y += 12
        painter.end()
