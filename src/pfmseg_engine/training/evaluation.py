"""Scoring a trained checkpoint on a seed JSON split: pooled metrics, bootstrap CIs, per-image scores.

The intervals resample the images' groups (the dataset's ``group`` per image, else the TCGA patient in
the image's name, else the image alone) with the same bootstrap ``compare`` uses for a single seed
(:mod:`pfmseg_engine.training.statistics`): tiles of one slide or patient move together, so the interval
is not made narrower by counting correlated tiles as independent evidence.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import csvsafe
from ..classes import default_class_names
from ..errors import DataError
from ..metrics import PER_CLASS, SUMMARY, ConfusionMeter, metrics_from_confusion
from .statistics import hierarchical_intervals, resolve_groups
from .validation import iterate_predictions


@dataclass
class EvaluationReport:
    """Metrics of one split, with 95% (by default) bootstrap intervals over ``resampling`` (its groups of images)."""

    split: str
    class_names: tuple[str, ...]
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    confusion: np.ndarray | None = None
    resampling: str = "images"

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "class_names": list(self.class_names),
            "metrics": self.metrics,
            "confidence_intervals": {k: list(v) for k, v in self.intervals.items()},
            "ci_resampling": self.resampling,
            "per_image": self.per_image,
            "images_without_mask": self.skipped,
            "confusion_matrix": self.confusion.tolist() if self.confusion is not None else None,
        }

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """``metrics.json`` (everything) and ``metrics.csv`` (metric, value, ci_low, ci_high) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / "metrics.json", directory / "metrics.csv"
        json_path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        buffer = io.StringIO()
        writer = csvsafe.writer(buffer, lineterminator="\n")
        writer.writerow(["metric", "value", "ci_low", "ci_high"])
        for key, value in self.metrics.items():
            low, high = self.intervals.get(key, (math.nan, math.nan))
            writer.writerow([self.display_name(key), value, low, high])
        csv_path.write_text(buffer.getvalue(), encoding="utf-8")
        if self.per_image:
            buffer = io.StringIO()
            rows = csvsafe.DictWriter(buffer, fieldnames=list(self.per_image[0]), lineterminator="\n")
            rows.writeheader()
            rows.writerows(self.per_image)
            (directory / "per_image.csv").write_text(buffer.getvalue(), encoding="utf-8")
        return json_path, csv_path

    def display_name(self, key: str) -> str:
        """``IoU_Class_1`` -> ``IoU_Class_1 (nucleus)``."""
        if "_Class_" in key:
            index = int(key.rsplit("_", 1)[1])
            if index < len(self.class_names):
                return f"{key} ({self.class_names[index]})"
        return key

    def table(self) -> str:
        """Summary metrics with intervals, then a per-class table."""
        lines = [f"CI: bootstrap over {self.resampling}", "", f"{'metric':<24} {'value':>8}   95% CI", "-" * 48]
        for key in SUMMARY:
            low, high = self.intervals.get(key, (math.nan, math.nan))
            lines.append(f"{key:<24} {self.metrics[key]:>8.4f}   [{low:.4f}, {high:.4f}]")
        width = max(12, *(len(n) for n in self.class_names))
        lines += ["", f"{'class':<{width}} " + " ".join(f"{m:>9}" for m in PER_CLASS), "-" * (width + 10 * 6)]
        for i, name in enumerate(self.class_names):
            values = " ".join(f"{self.metrics[f'{m}_Class_{i}']:>9.4f}" for m in PER_CLASS)
            lines.append(f"{name:<{width}} {values}")
        return "\n".join(lines)


def evaluate_model(model: Any, dataset: Any, *, split: str, window: int, mode: str = "windowslide",
                   overlap: float = 0.25, batch_size: int = 4, device: Any = None, n_bootstrap: int = 1000,
                   seed: int = 0, on_image: Any = None) -> EvaluationReport:
    """Predict every image of ``dataset`` (a :class:`~pfmseg_engine.data.SegmentationDataset`) and score it."""
    with_mask = [i for i in range(dataset.num_images()) if dataset.samples[i].mask_path is not None]
    skipped = [dataset.name(i) for i in range(dataset.num_images()) if i not in set(with_mask)]
    if not with_mask:
        raise DataError(f"No image of split '{split}' has a mask, so there is nothing to score; "
                        "use 'infer' to only predict.")
    meter = ConfusionMeter(dataset.num_classes, dataset.ignore_index)
    per_image, names, explicit = [], [], []
    for index, image, mask, probs in iterate_predictions(model, dataset, window=window, mode=mode, overlap=overlap,
                                                         batch_size=batch_size, device=device, indices=with_mask):
        assert mask is not None  # ``with_mask``: only images that have one
        prediction = probs.argmax(0)
        cm = meter.update(prediction, mask)
        scores = metrics_from_confusion(cm)
        names.append(dataset.name(index))
        explicit.append(getattr(dataset.samples[index], "group", None))
        per_image.append({"image": names[-1], **{k: scores[k] for k in SUMMARY}})
        if on_image is not None:
            on_image(index, image, mask, prediction)
    grouping = resolve_groups(names, explicit)
    for record, unit in zip(per_image, grouping.ids, strict=True):
        record["group"] = grouping.labels[unit]
    intervals = hierarchical_intervals(np.asarray(meter.per_image)[None], grouping, n_bootstrap, seed=seed)
    class_names = tuple(getattr(model, "class_names", ()) or default_class_names(dataset.num_classes))
    return EvaluationReport(split, class_names, meter.compute(), intervals, per_image, skipped, meter.total,
                            grouping.describe())
