"""metrics: every number equals scikit-learn's; the Wilson interval and the ECE behave as stated."""

import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from stopsign.errors import DataError
from stopsign.reporting.metrics import Predictions, compute_metrics, wilson_interval

NAMES = ["not_stop", "stop"]


def binary_predictions(n=30, seed=0) -> Predictions:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(np.where(y == 1, rng.beta(4, 2, n), rng.beta(2, 4, n)), 0.001, 0.999).round(2)  # ties on purpose
    return Predictions([f"img{i}.jpg" for i in range(n)], y, np.c_[1 - p1, p1], NAMES)


def assert_matches_sklearn(metrics: dict, y: np.ndarray, y_pred: np.ndarray, probs: np.ndarray):
    labels = list(range(probs.shape[1]))
    assert metrics["n"] == len(y)
    assert metrics["accuracy"] == accuracy_score(y, y_pred)
    assert metrics["log_loss"] == log_loss(y, probs, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    for k, name in enumerate(metrics["class_names"]):
        expected = {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]}
        assert metrics["per_class"][name] == expected
    assert metrics["macro_f1"] == f1_score(y, y_pred, average="macro", labels=labels, zero_division=0)
    assert metrics["confusion"] == confusion_matrix(y, y_pred, labels=labels).tolist()
    assert metrics["confusion_normalized"] == confusion_matrix(y, y_pred, labels=labels, normalize="true").tolist()
    np.testing.assert_allclose(np.sum(metrics["confusion_normalized"], axis=1), 1.0)


def test_binary_metrics_equal_sklearn():
    pred = binary_predictions()
    metrics = compute_metrics(pred)
    y, p1 = pred.y_true, pred.probs[:, 1]
    assert metrics["threshold"] is None
    assert_matches_sklearn(metrics, y, pred.probs.argmax(axis=1), pred.probs)
    assert metrics["roc_auc"] == roc_auc_score(y, p1)
    fpr, tpr, thresholds = roc_curve(y, p1)
    assert metrics["roc"]["fpr"] == fpr.tolist() and metrics["roc"]["tpr"] == tpr.tolist()
    assert metrics["roc"]["thresholds"][1:] == thresholds[1:].tolist()  # [0] is inf, stored as None
    assert metrics["pr_auc"] == average_precision_score(y, p1)
    precision, recall, _ = precision_recall_curve(y, p1)
    assert metrics["pr"] == {"precision": precision.tolist(), "recall": recall.tolist()}
    json.dumps(metrics, allow_nan=False)  # JSON-ready: no numpy types, no NaN or inf


def test_threshold_changes_predictions_and_is_recorded():
    pred = binary_predictions()
    metrics = compute_metrics(pred, threshold=0.3)
    y_pred = (pred.probs[:, 1] >= 0.3).astype(int)
    assert metrics["threshold"] == 0.3
    assert_matches_sklearn(metrics, pred.y_true, y_pred, pred.probs)
    assert metrics["accuracy"] != compute_metrics(pred)["accuracy"]  # the fixture is chosen so the rule matters


def test_operating_points_equal_sklearn_at_each_distinct_score():
    pred = binary_predictions()
    y, p1 = pred.y_true, pred.probs[:, 1]
    metrics = compute_metrics(pred)
    table = metrics["thresholds"]
    assert [row["threshold"] for row in table] == sorted(set(p1.tolist()), reverse=True)
    best_f1 = 0.0
    for row in table:
        y_pred = (p1 >= row["threshold"]).astype(int)
        assert row["precision"] == pytest.approx(precision_score(y, y_pred, zero_division=0))
        assert row["recall"] == pytest.approx(recall_score(y, y_pred))
        assert row["fpr"] == pytest.approx(y_pred[y == 0].mean())
        best_f1 = max(best_f1, f1_score(y, y_pred))
    best = metrics["best_f1_threshold"]
    assert best["f1"] == pytest.approx(best_f1)
    assert best["f1"] == pytest.approx(f1_score(y, (p1 >= best["threshold"]).astype(int)))


def test_multiclass_one_vs_rest_auc_equals_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 40)
    probs = rng.dirichlet([1, 1, 1], 40) + np.eye(3)[y] * 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    pred = Predictions([str(i) for i in range(40)], y, probs, ["a", "b", "c"])
    metrics = compute_metrics(pred)
    assert_matches_sklearn(metrics, y, probs.argmax(axis=1), probs)
    assert metrics["roc_auc"] == roc_auc_score(y, probs, multi_class="ovr", average="macro")
    for k, name in enumerate("abc"):
        assert metrics["roc_auc_per_class"][name] == roc_auc_score(y == k, probs[:, k])
    assert "thresholds" not in metrics


def test_one_class_present_gives_no_auc_and_says_why():
    pred = Predictions(["a", "b", "c"], [1, 1, 1], [[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]], NAMES)
    metrics = compute_metrics(pred)
    assert metrics["roc_auc"] is None and metrics["pr_auc"] is None and metrics["thresholds"] is None
    assert "only" in metrics["roc_auc_reason"]
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_empty_predictions_raise():
    with pytest.raises(DataError, match="empty"):
        compute_metrics(Predictions([], np.zeros(0, int), np.zeros((0, 2)), NAMES))


def test_threshold_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        Predictions(["a"], [0], [[0.5, 0.3, 0.2]], ["a", "b", "c"], threshold=0.5)


def test_wilson_interval_known_value_and_contains_estimate():
    lo, hi = wilson_interval(18, 20)
    assert lo == pytest.approx(0.6990, abs=1e-4) and hi == pytest.approx(0.9721, abs=1e-4)
    for successes, n in [(0, 5), (5, 5), (1, 20), (13, 20), (200, 200)]:
        lo, hi = wilson_interval(successes, n)
        assert 0.0 <= lo <= successes / n <= hi <= 1.0


def test_wilson_interval_narrows_like_one_over_root_n():
    widths = [np.subtract(*wilson_interval(9 * n // 10, n)[::-1]) for n in (20, 80, 320, 1280)]
    assert widths == sorted(widths, reverse=True)
    ratios = np.array(widths[1:]) / np.array(widths[:-1])
    assert np.all(np.abs(ratios - 0.5) < 0.08)  # four times the images, half the width
    assert wilson_interval(90, 100, confidence=0.99)[0] < wilson_interval(90, 100)[0]


def test_expected_calibration_error_on_a_hand_made_case():
    # Two images at 0.95 (both right: gap 0.05) and two at 0.65 (one right: gap 0.15) -> ECE 0.10.
    probs = [[0.05, 0.95], [0.95, 0.05], [0.35, 0.65], [0.65, 0.35]]
    pred = Predictions(["a", "b", "c", "d"], [1, 0, 1, 1], probs, NAMES)
    calibration = compute_metrics(pred)["calibration"]
    assert calibration["ece"] == pytest.approx(0.10)
    filled = [b for b in calibration["bins"] if b["count"]]
    assert [(b["lo"], b["count"], b["accuracy"]) for b in filled] == [(pytest.approx(0.6), 2, 0.5), (pytest.approx(0.9), 2, 1.0)]
    assert len(calibration["bins"]) == 10


def test_calibration_bins_agree_with_sklearn_calibration_curve():
    pred = binary_predictions(n=200, seed=3)
    top = pred.probs.max(axis=1)
    hit = (pred.probs.argmax(axis=1) == pred.y_true).astype(int)
    accuracy, confidence = calibration_curve(hit, top, n_bins=10, strategy="uniform")
    filled = [b for b in compute_metrics(pred)["calibration"]["bins"] if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in filled], accuracy)
    np.testing.assert_allclose([b["confidence"] for b in filled], confidence)
