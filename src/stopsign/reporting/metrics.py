"""Every number of an evaluation: accuracy and its interval, per class, ROC/PR, calibration, thresholds.

`compute_metrics()` turns `Predictions` into one JSON-ready dict. Each number scikit-learn defines is
scikit-learn's, so the report can be checked against it, and the Wilson interval is scipy's; only the binned
calibration table, its ECE and the operating-point table are computed here. `evaluation_lines()` and
`training_lines()` word the figures, beside their baselines and warnings, for the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, confusion_matrix,
                             f1_score, log_loss, precision_recall_curve, precision_recall_fscore_support, recall_score,
                             roc_auc_score, roc_curve)

from ..decision import POSITIVE, decide
from ..errors import DataError

CALIBRATION_BINS = 10  # equal-width bins on the top-class probability


@dataclass
class Predictions:
    """What an evaluation scores: one row of class probabilities per image."""

    paths: list[str]
    y_true: np.ndarray  # (N,) int class indices
    probs: np.ndarray  # (N, C) float probabilities, rows sum to 1
    class_names: list[str]
    threshold: float | None = None  # two classes only: predict class 1 when p1 >= threshold; None = argmax
    # per image: "exact" or "near" when it is a copy of a training image of the model, None when new;
    # None for the whole list when unknown (model.signature.compare_with_training)
    copies: list[str | None] | None = None
    # per image: True when unlike the model's training images (model.signature), None when unknown
    unfamiliar: list[bool | None] | None = None
    # per image: where the model looked, a box (left, top, right, bottom) as fractions of the photo, None when not
    # known (inference/explain.py; evaluate explains the mistakes the report shows)
    boxes: list[tuple[float, ...] | None] | None = None

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        self.y_true = np.asarray(self.y_true, dtype=int).reshape(-1)
        self.probs = np.asarray(self.probs, dtype=float)
        self.class_names = list(self.class_names)
        num_classes = len(self.class_names)
        if self.probs.shape != (len(self.y_true), num_classes):
            raise ValueError(f"probs has shape {self.probs.shape}; expected one row per label and one column per "
                             f"class ({len(self.y_true)}, {num_classes})")
        if len(self.paths) != len(self.y_true):
            raise ValueError(f"{len(self.paths)} paths but {len(self.y_true)} labels")
        if self.copies is not None and len(self.copies) != len(self.paths):
            raise ValueError(f"{len(self.copies)} copy marks for {len(self.paths)} images")
        if not np.allclose(self.probs.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError("each row of probs must sum to 1 (pass softmax outputs, not logits)")
        if len(self.y_true) and (self.y_true.min() < 0 or self.y_true.max() >= num_classes):
            raise ValueError(f"y_true holds class indices outside 0..{num_classes - 1}")
        if self.threshold is not None and num_classes != 2:
            raise ValueError(f"a decision threshold needs exactly two classes, not {num_classes}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def y_pred(self) -> np.ndarray:
        """Predicted class indices: argmax, or p1 >= threshold when a threshold is set (two classes)."""
        return decide(self.probs, self.threshold)

    @property
    def confidence(self) -> np.ndarray:
        """The probability given to the predicted class."""
        return self.probs[np.arange(len(self.y_true)), self.y_pred]

    def log_loss(self) -> float:
        """scikit-learn's log-loss, on rows renormalised for it alone: float32 softmax rows sum to 1 ± 1e-7."""
        probs = self.probs / self.probs.sum(axis=1, keepdims=True)
        return float(log_loss(self.y_true, probs, labels=list(range(self.num_classes))))

    def with_threshold(self, threshold: float | None) -> "Predictions":
        return replace(self, threshold=threshold)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion successes / n (scipy's binomtest): unlike the normal
    approximation it stays inside [0, 1] and is honest at n = 20 and at 20/20."""
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def compute_metrics(pred: Predictions, threshold: float | None = None) -> dict:
    """Score predictions. `threshold` (two classes only) overrides `pred.threshold`."""
    if threshold is not None:
        pred = pred.with_threshold(threshold)
    n = len(pred.y_true)
    if n == 0:
        raise DataError("there are no predictions to score: the evaluation set is empty; add images to it")
    labels = list(range(pred.num_classes))
    y_true, y_pred = pred.y_true, pred.y_pred
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    result = {
        "n": n, "class_names": pred.class_names, "threshold": pred.threshold,
        "accuracy": accuracy_score(y_true, y_pred),
        "accuracy_ci95": list(wilson_interval(int((y_true == y_pred).sum()), n)),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred) if len(np.unique(y_true)) > 1 else None,
        "log_loss": pred.log_loss(), "baseline": baseline(y_true, pred.class_names),
        "per_class": {name: {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]}
                      for k, name in enumerate(pred.class_names)},
        "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels),
        "confusion_normalized": confusion_matrix(y_true, y_pred, labels=labels, normalize="true"),
    }
    result["verdict"] = verdict(result)
    if pred.copies is not None:
        result["training_copies"] = training_copies(pred)
    if pred.unfamiliar is not None and None not in pred.unfamiliar:
        result["familiarity"] = familiarity(pred)
    result |= binary_curves(y_true, pred.probs[:, POSITIVE]) if pred.num_classes == 2 else one_vs_rest_auc(pred)
    result["calibration"] = calibration_table(pred)
    return json_ready(result)


IMBALANCED = 3.0  # above this ratio of the largest class to the smallest, balanced accuracy leads


def baseline(y_true: np.ndarray, class_names: list[str]) -> dict:
    """What a model that ignores the photo scores on these labels: always answering the majority class
    (accuracy; balanced accuracy 1/K) and always answering the class shares (the prior's log-loss). A figure
    means something only beside these."""
    counts = np.bincount(y_true, minlength=len(class_names))
    present = counts[counts > 0]
    shares = present / counts.sum()
    return {"majority_class": class_names[int(counts.argmax())], "accuracy": float(shares.max()),
            "balanced_accuracy": 1.0 / len(present), "log_loss": float(-(shares * np.log(shares)).sum()),
            "imbalance": float(present.max() / present.min())}


def verdict(result: dict) -> dict:
    """Which figure leads (balanced accuracy above 3:1 imbalance) and whether the model beats its baseline on
    it and on log-loss; `message` says so plainly when it does not."""
    base = result["baseline"]
    lead = "balanced_accuracy" if base["imbalance"] > IMBALANCED and result["balanced_accuracy"] is not None \
        else "accuracy"
    beats_accuracy = result[lead] > base[lead] + 1e-9
    beats_log_loss = result["log_loss"] < base["log_loss"] - 1e-9
    message = None
    if not beats_accuracy:
        message = (f"this model is no better than always answering {base['majority_class']}: "
                   f"{lead.replace('_', ' ')} {result[lead]:.3f} against {base[lead]:.3f}")
    elif not beats_log_loss:
        message = (f"this model's probabilities are no better than the class shares: log-loss "
                   f"{result['log_loss']:.4f} against the prior's {base['log_loss']:.4f}")
    return {"lead": lead, "beats_baseline": beats_accuracy and beats_log_loss, "message": message}


def accuracy_interval(metrics: dict) -> str:
    """Accuracy, its Wilson interval and n, e.g. "0.950 (95% CI 0.76-0.99, n=20)": one format for CLI and report."""
    low, high = metrics["accuracy_ci95"]
    return f"{metrics['accuracy']:.3f} (95% CI {low:.2f}-{high:.2f}, n={metrics['n']})"


def headline(metrics: dict, where: str = "") -> str:
    """The figure to quote beside its baselines, e.g. "accuracy 0.950 (95% CI 0.76-0.99, n=20){where}; always
    not_stop: 0.500; log-loss 0.1921 against the prior's 0.6931"; balanced accuracy leads above 3:1 imbalance."""
    base, lead = metrics["baseline"], metrics["verdict"]["lead"]
    accuracy = f"accuracy {accuracy_interval(metrics)}"
    figure = (f"balanced accuracy {metrics['balanced_accuracy']:.3f}, {accuracy}" if lead == "balanced_accuracy"
              else accuracy)
    return (f"{figure}{where}; always {base['majority_class']}: {base[lead]:.3f}; log-loss {metrics['log_loss']:.4f} "
            f"against the prior's {base['log_loss']:.4f}")


def copies_sentence(metrics: dict) -> str | None:
    """How many evaluated images the model was trained on, and the scores on the others (the ones to quote)."""
    copies = metrics.get("training_copies")
    if not copies:
        return None
    seen, n = copies["exact"] + copies["near"], metrics["n"]
    if not seen:
        return f"none of the {n} images is a training image of this model or a near copy of one"
    sentence = (f"warning: {seen} of the {n} images are training images of this model ({copies['exact']} exact, "
                f"{copies['near']} near copies): accuracy on them measures memory")
    new = copies["new_images"]
    if new:
        low, high = new["accuracy_ci95"]
        recall = ", ".join(f"{name} {r:.3f}" for name, r in new["recall"].items() if r is not None)
        sentence += (f"; on the {new['n']} new images: accuracy {new['accuracy']:.3f} (95% CI {low:.2f}-{high:.2f}), "
                     f"recall {recall} (the figure to quote)")
    return sentence


def warning_lines(metrics: dict) -> list[str]:
    return [f"warning: {warning}" for warning in metrics.get("warnings", [])]


def evaluation_lines(metrics: dict) -> list[str]:
    """What `stopsign evaluate` says: the figure beside its baselines, the warnings, each class's scores, the
    confusion matrix, and how many of the images the model was trained on."""
    confusion, names = metrics["confusion"], list(metrics["per_class"])
    lines = [headline(metrics), *warning_lines(metrics)]
    for k, (name, row) in enumerate(metrics["per_class"].items()):
        predicted = sum(line[k] for line in confusion)  # no image called this class: its precision is undefined
        precision = f"{row['precision']:.3f}" if predicted else "n/a"
        recall = f"{row['recall']:.3f}" if row["support"] else "n/a"
        lines.append(f"  {name:<16} precision {precision:<5}  recall {recall:<5}  f1 {row['f1']:.3f}  "
                     f"support {row['support']}")
    corner = "truth / predicted"
    width = max(len(name) for name in names + [corner])
    lines += ["confusion (rows: truth, columns: predicted)"] + [  # the header row: the class names
        f"  {row:<{width}} " + " ".join(f"{cell:>{max(len(name), 5)}}" for name, cell in zip(names, cells))
        for row, cells in [(corner, names), *zip(names, confusion)]]
    extra = [copies_sentence(metrics), familiarity_sentence(metrics)]
    return lines + [line for line in extra if line]


def training_lines(metrics: dict, epochs: int, best_epoch: int) -> list[str]:
    """What a training command says last: the accuracy to trust (cross-validated, else on the validation images
    with what makes it optimistic, then the test split's) and the warnings. epochs: the rows of its history."""
    cv = metrics.get("cv")
    if cv:
        folds = f", mean of folds {cv['mean']['accuracy']:.3f} ± {cv['std']['accuracy']:.3f}"
        lines = [f"{cv['folds']}-fold cross-validated {headline(metrics, folds)}; final model trained on all data",
                 *warning_lines(metrics)]
    else:
        # the SGD head keeps the best of its epochs; a head fit in one step (logistic) chose nothing on them
        lines = [f"best validation {headline(metrics, f' at epoch {best_epoch}')}" if epochs > 1
                 else f"validation {headline(metrics)}", *warning_lines(metrics)]
        selection, copies = (metrics.get("selection") or {}).get("warning"), copies_sentence(metrics)
        if selection:
            lines.append(f"warning: {selection}")
        if copies and copies.startswith("warning"):  # the copies matter here only when there are some
            lines.append(copies)
    if metrics.get("test"):
        lines.append(f"test {headline(metrics['test'])}: scored once with the kept model, the figure to quote")
    return lines


def training_copies(pred: Predictions) -> dict:
    """How many evaluated images the model was trained on (exact copies, near copies), and the scores on the
    others: the figure to quote, since accuracy on copies of training photos measures memory."""
    new = np.array([c is None for c in pred.copies], dtype=bool)
    y_true, y_pred, n = pred.y_true[new], pred.y_pred[new], int(new.sum())
    result = {"exact": pred.copies.count("exact"), "near": pred.copies.count("near"), "new": n, "new_images": None}
    if n:
        hits = int((y_pred == y_true).sum())
        recall = recall_score(y_true, y_pred, labels=range(pred.num_classes), average=None, zero_division=np.nan)
        result["new_images"] = {"n": n, "accuracy": hits / n, "accuracy_ci95": list(wilson_interval(hits, n)),
                                "recall": dict(zip(pred.class_names, recall))}  # NaN, no image of the class: None
    return result


def binary_curves(y_true: np.ndarray, scores: np.ndarray) -> dict:
    present = np.unique(y_true)
    if len(present) < 2:
        reason = f"undefined: only class index {int(present[0])} occurs in the true labels"
        undefined = ("roc_auc", "roc", "pr_auc", "pr", "thresholds", "best_f1_threshold")
        return {**dict.fromkeys(undefined), "roc_auc_reason": reason}
    fpr, tpr, roc_thresholds = roc_curve(y_true, scores)
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    return {"roc_auc": roc_auc_score(y_true, scores), "roc": {"fpr": fpr, "tpr": tpr, "thresholds": roc_thresholds},
            "pr_auc": average_precision_score(y_true, scores), "pr": {"precision": precision, "recall": recall},
            **operating_points(precision, recall, thresholds, roc_curve(y_true, scores, drop_intermediate=False)[0])}


def operating_points(precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray, fpr: np.ndarray) -> dict:
    """The table of "positive when score >= t" for each distinct score t, highest first, and its row of best F1.

    precision, recall, thresholds: scikit-learn's precision-recall curve (thresholds rising, one end point more);
    fpr: its ROC curve with every distinct score kept (thresholds falling, the "predict none" point first)."""
    precision, recall, thresholds = precision[-2::-1], recall[-2::-1], thresholds[::-1]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=precision + recall > 0)
    best = int(np.argmax(f1))  # ties keep the highest threshold
    return {"thresholds": [{"threshold": t, "precision": p, "recall": r, "fpr": f}
                           for t, p, r, f in zip(thresholds, precision, recall, fpr[1:])],
            "best_f1_threshold": {"threshold": thresholds[best], "f1": f1[best], "precision": precision[best],
                                  "recall": recall[best]}}


def one_vs_rest_auc(pred: Predictions) -> dict:
    counts, n = np.bincount(pred.y_true, minlength=pred.num_classes), len(pred.y_true)
    reasons = {name: "undefined: every image is of this class" if count == n else "undefined: no image of this class"
               for name, count in zip(pred.class_names, counts) if count in (0, n)}
    per_class = {name: None if name in reasons else roc_auc_score(pred.y_true == k, pred.probs[:, k])
                 for k, name in enumerate(pred.class_names)}
    if reasons:
        return {"roc_auc_per_class": per_class, "roc_auc": None,
                "roc_auc_reason": "; ".join(f"{name}: {why}" for name, why in reasons.items())}
    return {"roc_auc_per_class": per_class, "roc_auc": roc_auc_score(
        pred.y_true, pred.probs, multi_class="ovr", average="macro", labels=list(range(pred.num_classes)))}


def calibration_table(pred: Predictions, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability table on the top-class probability, and the expected calibration error: scikit-learn has
    neither for many classes. The bins are right-closed like calibration_curve's (0.1 falls in the first)."""
    top, hit = pred.probs.max(axis=1), pred.probs.argmax(axis=1) == pred.y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_of = np.searchsorted(edges[1:-1], top)
    rows = []
    for b in range(bins):
        inside = bin_of == b
        confidence, accuracy = (float(top[inside].mean()), float(hit[inside].mean())) if inside.any() else (None, None)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(inside.sum()),
                     "confidence": confidence, "accuracy": accuracy})
    ece = sum((row["count"] / len(top) * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]), 0.0)
    return {"bins": rows, "ece": ece}


def json_ready(value):
    """numpy scalars and arrays to Python numbers and lists; non-finite floats (ROC's inf) to None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def familiarity(pred: Predictions) -> dict:
    """The accuracy on the images like the model's training images and on those unlike them (below its cut-off,
    model.signature), apart: a model is to be trusted on the kind of photo it learned from, not beyond."""
    unfamiliar, hits = np.array(pred.unfamiliar, dtype=bool), pred.y_pred == pred.y_true

    def scored(chosen: np.ndarray) -> dict:
        n, correct = int(chosen.sum()), int(hits[chosen].sum())
        return {"n": n, "accuracy": correct / n if n else None,
                "accuracy_ci95": list(wilson_interval(correct, n)) if n else None}

    return {"familiar": scored(~unfamiliar), "unfamiliar": scored(unfamiliar)}


def familiarity_sentence(metrics: dict) -> str | None:
    """How many evaluated images are unlike the training images, and the accuracy on each side."""
    if not metrics.get("familiarity"):
        return None
    familiar, unfamiliar = metrics["familiarity"]["familiar"], metrics["familiarity"]["unfamiliar"]
    if not unfamiliar["n"]:
        return f"none of the {metrics['n']} images is unlike the training photos"
    sides = [f"{name} accuracy {accuracy_interval(side)}" for name, side in
             (("familiar", familiar), ("unfamiliar", unfamiliar)) if side["n"]]
    return (f"{unfamiliar['n']} of the {metrics['n']} images are unlike the training photos (similarity below the "
            f"model's cut-off): {'; '.join(sides)}")
