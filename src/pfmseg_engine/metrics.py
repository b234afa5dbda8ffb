"""Segmentation metrics from confusion matrices, with bootstrap confidence intervals over images.

Conventions. ``cm[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p``; pixels whose
target is ``ignore_index`` are never counted. For class ``c``: ``TP = cm[c, c]``,
``FP = column sum - TP``, ``FN = row sum - TP``, ``GT = row sum`` (ground-truth pixels) and
``PRED = column sum`` (predicted pixels).

A class is **scored** when it occurs in the ground truth or in the prediction (``GT + PRED > 0``).
Per-class values of unscored classes are NaN and they are left out of every class mean: there is
nothing to score. For a scored class every ratio whose denominator is zero counts as **0**; in
particular a class present in the ground truth but never predicted has precision 0 and F1 0 and is
*kept* in those means (the seed's Mean F1 dropped every class without a true positive, inflating
the score; its Mean Precision dropped classes never predicted).

* ``IoU_c = TP / (TP + FP + FN)``; ``mIoU`` = mean over scored classes.
* ``Dice_c = 2TP / (2TP + FP + FN)``; ``Mean_Dice`` = mean over scored classes.
* ``Precision_c = TP / (TP + FP)`` (0 if never predicted); ``Mean_Precision`` over scored classes.
* ``Recall_c = TP / (TP + FN)`` (0 if absent from the ground truth but predicted); ``Mean_Recall``
  is the seed's: the mean over classes present in the ground truth only. A class that is predicted
  but absent from the truth has no recall to speak of (its false positives lower its precision),
  so it is left out rather than averaged in as 0; ``Mean_Recall`` therefore equals
  ``Mean_Accuracy``. It is a per-class (macro) mean, not the pooled recall ``sum(TP) / sum(GT)``,
  which equals ``Pixel_Accuracy`` and is dominated by the largest class.
* ``F1_c = 2 P R / (P + R)`` (0 if P + R = 0); ``Mean_F1`` over scored classes. On a pooled matrix
  F1_c equals Dice_c; both are reported because both names are in use.
* ``Pixel_Accuracy = sum(TP) / sum(cm)``.
* ``Mean_Accuracy`` = mean of ``TP / GT`` over classes present in the ground truth (FCN definition).
* ``Frequency_Weighted_IoU = sum_c (GT_c / sum GT) * IoU_c`` over classes present in the ground truth.

With no valid pixel at all every value is NaN. Metrics of a dataset are computed from the matrix
summed over images (pixel-pooled), not as a mean of per-image scores. Confidence intervals
resample *images* with replacement, sum their matrices and take percentiles of the metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import DataError

SUMMARY = ("mIoU", "Mean_Dice", "Pixel_Accuracy", "Mean_Accuracy", "Frequency_Weighted_IoU",
           "Mean_Precision", "Mean_Recall", "Mean_F1")
PER_CLASS = ("IoU", "Dice", "Precision", "Recall", "F1", "Accuracy")
MONITOR_METRICS = SUMMARY


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 matrix of one prediction; rows are ground truth, columns prediction."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise DataError(f"Prediction {pred.shape} and target {target.shape} differ in shape.")
    valid = target != ignore_index
    t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise DataError(f"Targets contain values outside 0..{num_classes - 1} and {ignore_index}.")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise DataError(f"Predictions contain values outside 0..{num_classes - 1}.")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    count = mask.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, np.where(mask, values, 0.0).sum(-1) / np.maximum(count, 1), np.nan)


def compute_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics of one matrix (C, C) or of a stack (..., C, C), as arrays (see module docstring)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    gt, predicted = cm.sum(-1), cm.sum(-2)
    fp, fn = predicted - tp, gt - tp
    scored, present = (gt + predicted) > 0, gt > 0
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    per_class = {
        "IoU": _div(tp, tp + fp + fn),
        "Dice": _div(2 * tp, 2 * tp + fp + fn),
        "Precision": precision,
        "Recall": recall,
        "F1": _div(2 * precision * recall, precision + recall),
    }
    accuracy = np.where(present, _div(tp, gt), np.nan)
    total = cm.sum((-2, -1))
    out: dict[str, np.ndarray] = {
        "mIoU": _masked_mean(per_class["IoU"], scored),
        "Mean_Dice": _masked_mean(per_class["Dice"], scored),
        "Pixel_Accuracy": np.where(total > 0, tp.sum(-1) / np.maximum(total, 1), np.nan),
        "Mean_Accuracy": _masked_mean(np.nan_to_num(accuracy), present),
        "Frequency_Weighted_IoU": np.where(
            total > 0, (_div(gt, gt.sum(-1, keepdims=True)) * per_class["IoU"]).sum(-1), np.nan),
        "Mean_Precision": _masked_mean(precision, scored),
        "Mean_Recall": _masked_mean(recall, present),  # the seed's: classes in the ground truth only
        "Mean_F1": _masked_mean(per_class["F1"], scored),
    }
    for name, values in per_class.items():
        out[name] = np.where(scored, values, np.nan)
    out["Accuracy"] = accuracy
    return out


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Flat dict of floats: the summary metrics plus ``<Metric>_Class_<i>`` for every class."""
    arrays = compute_metrics(cm)
    flat = {name: float(arrays[name]) for name in SUMMARY}
    for name in PER_CLASS:
        for i, value in enumerate(arrays[name]):
            flat[f"{name}_Class_{i}"] = float(value)
    return flat


def bootstrap_intervals(per_image: Sequence[np.ndarray] | np.ndarray, n_bootstrap: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every metric, resampling images with replacement ``n_bootstrap`` times.

    Each resample sums the chosen images' matrices (same pooling as the point estimate). Keys match
    :func:`metrics_from_confusion`. Resamples where a metric is undefined (NaN) are left out.
    """
    cms = np.asarray(per_image, dtype=np.float64)
    if cms.ndim != 3 or len(cms) == 0:
        raise ValueError("bootstrap_intervals needs a non-empty stack of per-image confusion matrices.")
    rng = np.random.default_rng(seed)
    n = len(cms)
    draws = rng.integers(0, n, size=(n_bootstrap, n))
    counts = np.zeros((n_bootstrap, n))
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], draws), 1.0)
    arrays = compute_metrics(np.einsum("bn,nij->bij", counts, cms))
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2

    def interval(values: np.ndarray) -> tuple[float, float]:
        values = values[~np.isnan(values)]
        if values.size == 0:
            return (float("nan"), float("nan"))
        return (float(np.percentile(values, lo_q)), float(np.percentile(values, hi_q)))

    out = {name: interval(arrays[name]) for name in SUMMARY}
    for name in PER_CLASS:
        for i in range(cms.shape[-1]):
            out[f"{name}_Class_{i}"] = interval(arrays[name][:, i])
    return out


class ConfusionMeter:
    """Accumulates one confusion matrix per image (for pooled metrics and image-level bootstrap)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.per_image: list[np.ndarray] = []

    def update(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.per_image.append(cm)
        return cm

    @property
    def total(self) -> np.ndarray:
        if not self.per_image:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return np.sum(self.per_image, axis=0)

    def compute(self) -> dict[str, float]:
        return metrics_from_confusion(self.total)

    def intervals(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
                  ) -> dict[str, tuple[float, float]]:
        return bootstrap_intervals(self.per_image, n_bootstrap, confidence, seed)
