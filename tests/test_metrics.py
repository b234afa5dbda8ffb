"""Metrics against hand-computed confusion matrices, absent-class rules, and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pfmseg_engine.training.metrics import (
    SUMMARY,
    ConfusionMeter,
    bootstrap_intervals,
    confusion_matrix,
    metrics_from_confusion,
)

# rows = ground truth, columns = prediction; class 2 occurs once in the truth and is never predicted
CM = np.array([[5, 1, 0],
               [2, 3, 0],
               [1, 0, 0]])


def test_hand_computed_three_class_case():
    m = metrics_from_confusion(CM)
    iou = [5 / 9, 3 / 6, 0.0]
    dice = [10 / 14, 6 / 9, 0.0]
    precision = [5 / 8, 3 / 4, 0.0]  # never-predicted class 2 counts as 0
    recall = [5 / 6, 3 / 5, 0.0]
    assert m["mIoU"] == pytest.approx(np.mean(iou))
    assert m["Mean_Dice"] == pytest.approx(np.mean(dice))
    assert m["Mean_Precision"] == pytest.approx(np.mean(precision))
    assert m["Mean_Recall"] == pytest.approx(np.mean(recall))
    assert m["Mean_F1"] == pytest.approx(np.mean(dice))  # F1 == Dice per class on a pooled matrix
    assert m["Mean_F1"] < 0.5  # the seed's rule (drop class 2) would report 0.69
    assert m["Pixel_Accuracy"] == pytest.approx(8 / 12)
    assert m["Mean_Accuracy"] == pytest.approx(np.mean(recall))
    assert m["Frequency_Weighted_IoU"] == pytest.approx(6 / 12 * 5 / 9 + 5 / 12 * 3 / 6)
    for i in range(3):
        assert m[f"IoU_Class_{i}"] == pytest.approx(iou[i])
        assert m[f"Precision_Class_{i}"] == pytest.approx(precision[i])
        assert m[f"F1_Class_{i}"] == pytest.approx(dice[i])


def test_class_absent_everywhere_is_not_scored():
    cm = np.array([[4, 0, 0], [1, 3, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert math.isnan(m["IoU_Class_2"]) and math.isnan(m["F1_Class_2"])
    assert m["mIoU"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert m["Mean_Precision"] == pytest.approx((4 / 5 + 1.0) / 2)


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    cm = np.array([[3, 1], [0, 0]])
    m = metrics_from_confusion(cm)
    assert m["IoU_Class_1"] == 0.0 and m["Precision_Class_1"] == 0.0 and m["Recall_Class_1"] == 0.0
    assert m["mIoU"] == pytest.approx(3 / 4 / 2)
    assert m["Mean_Recall"] == pytest.approx(3 / 4 / 2)
    assert m["Mean_Accuracy"] == pytest.approx(3 / 4)  # FCN: only classes present in the truth
    assert math.isnan(m["Accuracy_Class_1"])


def test_empty_matrix_is_nan_not_a_crash():
    m = metrics_from_confusion(np.zeros((2, 2)))
    assert all(math.isnan(m[k]) for k in SUMMARY)


def test_confusion_matrix_skips_ignored_pixels():
    target = np.array([[0, 1, 255], [2, 2, 1]])
    pred = np.array([[0, 2, 1], [2, 0, 1]])
    cm = confusion_matrix(pred, target, num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    assert cm.sum() == 5


def test_perfect_prediction_scores_one():
    target = np.random.default_rng(0).integers(0, 4, (16, 16))
    m = metrics_from_confusion(confusion_matrix(target, target, 4))
    assert all(m[k] == pytest.approx(1.0) for k in SUMMARY)


def test_meter_pools_pixels_over_images():
    meter = ConfusionMeter(2)
    meter.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]))  # perfect
    meter.update(np.array([0] * 12), np.array([1] * 12))  # all wrong
    np.testing.assert_array_equal(meter.total, [[2, 0], [12, 2]])
    assert meter.compute()["Pixel_Accuracy"] == pytest.approx(4 / 16)


def test_bootstrap_matches_a_plain_loop_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    per_image = [rng.integers(0, 30, (3, 3)) for _ in range(6)]
    ci = bootstrap_intervals(per_image, n_bootstrap=200, seed=7)
    # reference: same draws, one resample at a time
    draws = np.random.default_rng(7).integers(0, 6, size=(200, 6))
    values = [metrics_from_confusion(np.sum([per_image[i] for i in row], axis=0))["mIoU"] for row in draws]
    assert ci["mIoU"] == pytest.approx((np.percentile(values, 2.5), np.percentile(values, 97.5)))
    point = metrics_from_confusion(np.sum(per_image, axis=0))
    for key in SUMMARY:
        low, high = ci[key]
        assert 0.0 <= low <= point[key] <= high <= 1.0
    assert ci == bootstrap_intervals(per_image, n_bootstrap=200, seed=7)


def test_bootstrap_of_identical_images_has_zero_width():
    cm = np.array([[5, 1], [2, 7]])
    low, high = bootstrap_intervals([cm] * 5, n_bootstrap=100)["Mean_Dice"]
    assert low == pytest.approx(high) == pytest.approx(metrics_from_confusion(cm)["Mean_Dice"])
