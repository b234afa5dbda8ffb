"""The per-epoch metrics history and its files: CSV, JSON and a training-curve plot."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

from .. import csvsafe
from ..storage import writing

CURVE_METRICS = ("mIoU", "Mean_Dice")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, "the training history"):
        try:
            tmp.write_text(text, encoding="utf-8")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)


class History:
    """Rows of ``{"epoch", "train_loss", "val_loss", "lr", "seconds", <metrics>...}``, one per epoch."""

    def __init__(self, rows: list[dict[str, Any]] | None = None):
        self.rows: list[dict[str, Any]] = list(rows or [])

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def column(self, key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in self.rows]

    def write(self, directory: Path) -> None:
        """Write ``history.csv`` and ``history.json`` (atomically, so readers never see half a file)."""
        with writing(directory, "the training history"):
            directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "history.json", json.dumps(self.rows, indent=1, allow_nan=True))
        keys: list[str] = []
        for row in self.rows:
            keys.extend(k for k in row if k not in keys)
        buffer = io.StringIO()
        writer = csvsafe.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(directory / "history.csv", buffer.getvalue())

    def plot(self, path: Path) -> None:
        """Loss curves (left) and validation mIoU / mean Dice (right) as a PNG."""
        fig = self.figure()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        with writing(path, "the training curve"):
            try:
                fig.savefig(tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)

    def figure(self):
        """The training-curve figure: both panels on one shared axis of whole epochs.

        The axis spans every epoch trained (half an epoch of margin each side), so a run with a single
        validation point still shows it at its epoch instead of on a zoomed-in fractional axis.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        epochs = [r["epoch"] for r in self.rows]
        fig = Figure(figsize=(10, 4), dpi=100)
        ax_loss, ax_metric = fig.subplots(1, 2, sharex=True)
        ax_loss.plot(epochs, self.column("train_loss"), label="train loss")
        val = [(e, v) for e, v in zip(epochs, self.column("val_loss"), strict=True) if not math.isnan(v)]
        if val:
            ax_loss.plot(*zip(*val, strict=True), marker="o", label="val loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        for name in CURVE_METRICS:
            points = [(e, v) for e, v in zip(epochs, self.column(name), strict=True) if not math.isnan(v)]
            if points:
                ax_metric.plot(*zip(*points, strict=True), marker="o", label=name)
        ax_metric.set_xlabel("epoch")
        ax_metric.set_ylabel("validation metric")
        ax_metric.set_ylim(0, 1)
        if ax_metric.lines:
            ax_metric.legend()
        for ax in (ax_loss, ax_metric):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs:
            ax_loss.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        fig.tight_layout()
        return fig
