"""Metrics against hand-computed confusion matrices, absent-class rules, and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfmseg_engine.metrics import (
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


def test_class_predicted_but_absent_from_truth_counts_as_zero_except_in_mean_recall():
    cm = np.array([[3, 1], [0, 0]])
    m = metrics_from_confusion(cm)
    assert m["IoU_Class_1"] == 0.0 and m["Precision_Class_1"] == 0.0 and m["Recall_Class_1"] == 0.0
    assert m["mIoU"] == pytest.approx(3 / 4 / 2)
    assert m["Mean_Recall"] == pytest.approx(3 / 4)  # the seed's: only classes present in the truth
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


# --- the seed's utils/metrics.py SegmentationMetrics, transcribed (computations on its confusion matrix) ---
class SeedSegmentationMetrics:
    def __init__(self, confusion_matrix):
        self.confusion_matrix = torch.as_tensor(confusion_matrix, dtype=torch.int64)
        self.num_classes = self.confusion_matrix.shape[0]

    def compute_iou(self):
        tp = torch.diag(self.confusion_matrix).float()
        fp = self.confusion_matrix.sum(dim=0) - tp
        fn = self.confusion_matrix.sum(dim=1) - tp
        denominator = tp + fp + fn
        iou = tp / (denominator + 1e-8)
        valid_classes = (denominator > 0)
        iou = iou * valid_classes.float()
        mean_iou = iou[valid_classes].mean() if valid_classes.any() else torch.tensor(0.0)
        return iou, mean_iou

    def compute_pixel_accuracy(self):
        correct_pixels = torch.diag(self.confusion_matrix).sum()
        total_pixels = self.confusion_matrix.sum()
        return correct_pixels / (total_pixels + 1e-8)

    def compute_mean_accuracy(self):
        tp = torch.diag(self.confusion_matrix).float()
        total_per_class = self.confusion_matrix.sum(dim=1).float()
        class_accuracy = tp / (total_per_class + 1e-8)
        valid_classes = (total_per_class > 0)
        return class_accuracy[valid_classes].mean() if valid_classes.any() else torch.tensor(0.0)

    def compute_frequency_weighted_iou(self):
        iou, _ = self.compute_iou()
        class_frequencies = self.confusion_matrix.sum(dim=1).float()
        total_pixels = class_frequencies.sum()
        weights = class_frequencies / (total_pixels + 1e-8)
        return (weights * iou).sum()

    def compute_dice_score(self):
        tp = torch.diag(self.confusion_matrix).float()
        fp = self.confusion_matrix.sum(dim=0) - tp
        fn = self.confusion_matrix.sum(dim=1) - tp
        dice = (2 * tp) / (2 * tp + fp + fn + 1e-8)
        valid_classes = ((tp + fp + fn) > 0)
        dice = dice * valid_classes.float()
        mean_dice = dice[valid_classes].mean() if valid_classes.any() else torch.tensor(0.0)
        return dice, mean_dice

    def compute_precision_recall(self):
        tp = torch.diag(self.confusion_matrix).float()
        fp = self.confusion_matrix.sum(dim=0) - tp
        fn = self.confusion_matrix.sum(dim=1) - tp
        precision = tp / (tp + fp + 1e-8)
        valid_precision = ((tp + fp) > 0)
        precision = precision * valid_precision.float()
        mean_precision = precision[valid_precision].mean() if valid_precision.any() else torch.tensor(0.0)
        recall = tp / (tp + fn + 1e-8)
        valid_recall = ((tp + fn) > 0)
        recall = recall * valid_recall.float()
        mean_recall = recall[valid_recall].mean() if valid_recall.any() else torch.tensor(0.0)
        return precision, mean_precision, recall, mean_recall

    def compute_f1_score(self):
        precision, _, recall, _ = self.compute_precision_recall()
        f1 = 2 * (precision * recall) / (precision + recall + 1e-8)
        valid_classes = ((precision + recall) > 0)
        f1 = f1 * valid_classes.float()
        mean_f1 = f1[valid_classes].mean() if valid_classes.any() else torch.tensor(0.0)
        return f1, mean_f1

    def compute(self):
        per_class_iou, mean_iou = self.compute_iou()
        pixel_accuracy = self.compute_pixel_accuracy()
        mean_accuracy = self.compute_mean_accuracy()
        fwiou = self.compute_frequency_weighted_iou()
        per_class_dice, mean_dice = self.compute_dice_score()
        per_class_precision, mean_precision, per_class_recall, mean_recall = self.compute_precision_recall()
        per_class_f1, mean_f1 = self.compute_f1_score()
        metrics = {
            'mIoU': mean_iou.item(),
            'Pixel_Accuracy': pixel_accuracy.item(),
            'Mean_Accuracy': mean_accuracy.item(),
            'Frequency_Weighted_IoU': fwiou.item(),
            'Mean_Dice': mean_dice.item(),
            'Mean_Precision': mean_precision.item(),
            'Mean_Recall': mean_recall.item(),
            'Mean_F1': mean_f1.item()
        }
        for i in range(self.num_classes):
            metrics[f'IoU_Class_{i}'] = per_class_iou[i].item()
            metrics[f'Dice_Class_{i}'] = per_class_dice[i].item()
            metrics[f'Precision_Class_{i}'] = per_class_precision[i].item()
            metrics[f'Recall_Class_{i}'] = per_class_recall[i].item()
            metrics[f'F1_Class_{i}'] = per_class_f1[i].item()
        return metrics


def random_matrix(rng: np.random.Generator) -> np.ndarray:
    """Counts where classes may be absent from the truth, never predicted, without any hit, or unused."""
    n = int(rng.integers(2, 7))
    cm = rng.integers(0, 40, (n, n)) * (rng.random((n, n)) < 0.7)
    for c in range(n):
        role = rng.choice(["normal", "absent_from_truth", "never_predicted", "no_hit", "unused"],
                          p=[0.4, 0.2, 0.15, 0.15, 0.1])
        if role in ("absent_from_truth", "unused"):
            cm[c, :] = 0
        if role in ("never_predicted", "unused"):
            cm[:, c] = 0
        if role == "no_hit":
            cm[c, c] = 0
    return cm


SAME_AS_SEED = ("mIoU", "Pixel_Accuracy", "Mean_Accuracy", "Frequency_Weighted_IoU", "Mean_Dice", "Mean_Recall")


def test_metrics_against_the_seeds_code_on_random_matrices():
    rng = np.random.default_rng(20)
    recall_rule_matters = 0
    for _ in range(200):
        cm = random_matrix(rng)
        if cm.sum() == 0:
            continue  # an empty matrix is NaN here, 0 in the seed (test_empty_matrix_is_nan_not_a_crash)
        ours, seed = metrics_from_confusion(cm), SeedSegmentationMetrics(cm).compute()
        for key in SAME_AS_SEED:
            assert ours[key] == pytest.approx(seed[key], rel=1e-5, abs=1e-6), (key, cm.tolist())
        tp, gt, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
        scored = (gt + predicted) > 0
        for name in ("IoU", "Dice", "Precision", "Recall", "F1"):
            for c in range(len(cm)):
                if scored[c]:
                    assert ours[f"{name}_Class_{c}"] == pytest.approx(seed[f"{name}_Class_{c}"], rel=1e-5, abs=1e-6)
                else:
                    assert math.isnan(ours[f"{name}_Class_{c}"]) and seed[f"{name}_Class_{c}"] == 0.0
        # the documented differences: ours also averages in, as 0, what the seed leaves out
        precision_same = np.array_equal(scored, predicted > 0)
        f1_same = np.array_equal(scored, tp > 0)
        for key, same in (("Mean_Precision", precision_same), ("Mean_F1", f1_same)):
            if same:
                assert ours[key] == pytest.approx(seed[key], rel=1e-5, abs=1e-6), (key, cm.tolist())
            else:
                assert ours[key] < seed[key] or seed[key] == ours[key] == 0.0, (key, cm.tolist())
        assert ours["Mean_Recall"] == pytest.approx(ours["Mean_Accuracy"])
        recall_over_scored = np.mean([ours[f"Recall_Class_{c}"] for c in range(len(cm)) if scored[c]])
        recall_rule_matters += not math.isclose(recall_over_scored, ours["Mean_Recall"])
    assert recall_rule_matters > 25  # many matrices had a predicted class absent from the truth
