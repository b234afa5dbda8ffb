"""Sparse labels on the store's window grid, painted from any frame and read by the training thread.

The GUI paints strokes at whatever resolution its labels layer has; the head trains at the model's
resolution. :class:`LabelBuffer` resamples each update (nearest neighbour, by pixel centres) into the
windows it touches and keeps only windows that hold labels, so memory follows what was painted, not the
slide. Values follow napari's convention: 0 = not annotated, k = class k-1. An update replaces what
its rectangle covered (painting 0 erases). All methods are thread-safe.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from .store import StoreGeometry, Window


class LabelBuffer:
    """Labels per window (uint8, window x window) with a version that grows with every change."""

    def __init__(self, geometry: StoreGeometry, num_classes: int):
        self.geometry = geometry
        self.num_classes = int(num_classes)
        self._lock = threading.Lock()
        self._windows: dict[Window, np.ndarray] = {}
        self._changed: dict[Window, int] = {}
        self.version = 0

    def paint(self, labels: np.ndarray, offset: Sequence[float] = (0.0, 0.0), scale: float = 1.0) -> list[Window]:
        """Put ``labels`` (H, W) into the buffer; returns the windows it touched.

        ``offset`` = (x, y) level-0 pixel of the labels' pixel (0, 0) corner and ``scale`` level-0 pixels
        per labels pixel (as in :class:`~pfmseg_engine.annotations.export.FeatureStyle`).
        """
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise DataError(f"Labels must be a 2-D array, got shape {labels.shape}.")
        top = int(labels.max()) if labels.size else 0
        if top > self.num_classes:
            raise DataError(f"Label value {top} is beyond the {self.num_classes} classes of the live head "
                            f"(0 = not annotated, 1..{self.num_classes} = the classes); restart live mode with "
                            "the new class.")
        g = self.geometry
        d, scale = g.downsample, float(scale)
        ox, oy = float(offset[0]), float(offset[1])
        height, width = labels.shape
        # model pixels whose centre falls inside the labels' rectangle
        my0 = max(0, math.ceil(oy / d - 0.5))
        my1 = min(g.shape[0], math.ceil((oy + height * scale) / d - 0.5))
        mx0 = max(0, math.ceil(ox / d - 0.5))
        mx1 = min(g.shape[1], math.ceil((ox + width * scale) / d - 0.5))
        if my1 <= my0 or mx1 <= mx0:
            return []
        rows = np.clip(((np.arange(my0, my1) + 0.5) * d - oy) // scale, 0, height - 1).astype(np.int64)
        cols = np.clip(((np.arange(mx0, mx1) + 0.5) * d - ox) // scale, 0, width - 1).astype(np.int64)
        sampled = labels[rows[:, None], cols[None, :]].astype(np.uint8)
        touched = []
        w = g.window
        with self._lock:
            self.version += 1
            for r in range(my0 // w, (my1 - 1) // w + 1):
                for c in range(mx0 // w, (mx1 - 1) // w + 1):
                    y0, x0 = max(my0, r * w), max(mx0, c * w)
                    y1, x1 = min(my1, (r + 1) * w), min(mx1, (c + 1) * w)
                    part = sampled[y0 - my0:y1 - my0, x0 - mx0:x1 - mx0]
                    current = self._windows.get((r, c))
                    if current is None:
                        if not part.any():
                            continue
                        current = np.zeros((w, w), np.uint8)
                    current[y0 - r * w:y1 - r * w, x0 - c * w:x1 - c * w] = part
                    if current.any():
                        self._windows[(r, c)] = current
                        self._changed[(r, c)] = self.version
                    else:
                        self._windows.pop((r, c), None)
                        self._changed.pop((r, c), None)
                    touched.append((r, c))
        return touched

    def clear(self) -> None:
        with self._lock:
            self.version += 1
            self._windows.clear()
            self._changed.clear()

    def windows(self) -> list[Window]:
        """Windows holding labels, most recently changed first."""
        with self._lock:
            return sorted(self._windows, key=lambda w: -self._changed[w])

    def get(self, window: Window) -> np.ndarray | None:
        """A copy of one window's labels (None when it has none)."""
        with self._lock:
            found = self._windows.get(window)
            return None if found is None else found.copy()

    def changed_at(self, window: Window) -> int:
        with self._lock:
            return self._changed.get(window, 0)

    def pixel_counts(self) -> np.ndarray:
        """Labelled pixels per class (index 0: class 0)."""
        with self._lock:
            counts = np.zeros(self.num_classes + 1, np.int64)
            for labels in self._windows.values():
                counts += np.bincount(labels.ravel(), minlength=self.num_classes + 1)[:self.num_classes + 1]
        return counts[1:]


__all__ = ["LabelBuffer"]
