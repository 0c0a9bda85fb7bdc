"""The report's charts: training curves, confusion matrix, ROC, precision-recall, calibration; data in, PNG out.

Drawn on matplotlib's object API with the Agg canvas, so nothing here touches pyplot's global state or needs a
display. Margins are fixed in inches where the labels are known in advance: matplotlib's constrained layout
measures every tick label, and took most of a warm run's time.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from ..decision import POSITIVE
from ..files import atomic_write_bytes
from .html import short_number
from .metrics import Predictions

CURVE_MARGINS = (0.75, 0.55, 0.15, 0.35)  # inches (left, bottom, right, top): room for tick labels and a title
LONGEST_NAME = 30  # characters of a class name on the confusion matrix's axes; longer ones lose their middle


def new_figure(width: float, height: float, margins: tuple[float, float, float, float] | None = None) -> Figure:
    """A figure of width x height inches on the Agg canvas. margins: (left, bottom, right, top) around the axes in
    inches, for labels known in advance; without them the layout is constrained (labels of unknown length)."""
    figure = Figure(figsize=(width, height), dpi=80, layout=None if margins else "constrained")
    FigureCanvasAgg(figure)
    if margins:
        left, bottom, right, top = margins
        figure.subplots_adjust(left=left / width, bottom=bottom / height, right=1 - right / width,
                               top=1 - top / height)
    return figure


def _title(axis, text: str) -> None:
    """An axis title at a fixed height: left to itself, matplotlib measures every tick label to place it."""
    axis.set_title(text, y=1.0)


def integer_ticks(axis) -> None:
    """Whole-number ticks only, on an x/y axis or a colour bar's axis that counts something (trials, epochs)."""
    axis.set_major_locator(MaxNLocator(integer=True))


def log_ticks(axis, low: float, high: float, most: int = 5) -> None:
    """At most `most` (about) short labels (1e-6, 0.02) on a log axis shown from low to high, no minor ticks.

    Whole decades when the range spans two or more (LogLocator thins them to `most`), 1 and 3 per decade over
    one to two, 1, 2 and 5 below one, so that even a narrow range has labelled ticks. Plain text (plain_log_scale).
    """
    decades = math.log10(high / low)
    subs = (1.0,) if decades >= 2 else (1.0, 3.0) if decades >= 1 else (1.0, 2.0, 5.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=most))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda value, _: short_number(value)))


def plain_log_scale(axis, ticks) -> None:
    """A log scale on `ticks` (axis.xaxis or axis.yaxis) labelled in plain text ("1e-06"), without minor ticks:
    mathtext's parser is slow to build in every new process, and each minor tick is a costly artist."""
    (axis.set_xscale if ticks is axis.xaxis else axis.set_yscale)("log")
    ticks.set_minor_locator(NullLocator())
    ticks.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def save_figure(figure: Figure, path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: list[dict], path) -> Path:
    """Loss and accuracy (train and val) and the learning rate, against the epoch."""
    epochs = [row["epoch"] for row in history]

    def column(key):
        return [np.nan if row.get(key) is None else float(row[key]) for row in history]

    figure = new_figure(13, 3.6, margins=CURVE_MARGINS)
    loss_axis, accuracy_axis, lr_axis = axes = figure.subplots(1, 3, gridspec_kw={"wspace": 0.25})
    for axis, title in zip(axes, ("loss", "accuracy", "learning rate")):
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        _title(axis, title)
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "acc")):
        for split in ("train", "val"):
            values = column(f"{split}_{metric}")
            if not all(math.isnan(v) for v in values):
                axis.plot(epochs, values, marker="o", markersize=3, label=split)
        axis.legend(loc="upper right" if metric == "loss" else "lower right")  # where the curves are not
    accuracy_axis.set_ylim(-0.02, 1.02)
    rates = column("lr")
    lr_axis.plot(epochs, rates, marker="o", markersize=3, color="tab:gray")
    positive = [r for r in rates if r > 0]
    if positive and max(positive) / min(positive) > 100:
        plain_log_scale(lr_axis, lr_axis.yaxis)
    return save_figure(figure, path)


def plot_c_choice(row: dict, path) -> Path:
    """The logistic head's one fit: each C's mean held-out log-loss (grouped K-fold on the training split), the
    chosen C marked: what a head fit in one step has instead of a curve per epoch."""
    values, losses = zip(*row["C_scores"])
    figure = new_figure(6.5, 3.6, margins=CURVE_MARGINS)
    axis = figure.subplots()
    axis.plot(values, losses, marker="o", markersize=3, color="tab:blue", label="held-out log-loss")
    axis.axvline(row["C"], color="tab:green", linestyle="--", label=f"chosen C = {row['C']:g}")
    plain_log_scale(axis, axis.xaxis)
    axis.set_xlabel("C (inverse regularisation)")
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    _title(axis, "choosing C: mean held-out log-loss")
    return save_figure(figure, path)


def axis_names(class_names: list[str]) -> list[str]:
    """Class names short enough for an axis: a long one keeps its start and its end, where names tend to differ;
    names that still collide get their class index in front."""
    keep = (LONGEST_NAME - 4) // 2
    names = [name if len(name) <= LONGEST_NAME else name[:keep] + "…" + name[-keep:] for name in class_names]
    return names if len(set(names)) == len(names) else [f"{k}: {name}" for k, name in enumerate(names)]


def plot_confusion(pred: Predictions, path) -> Path:
    """The confusion matrix as counts and row-normalised (rows = truth), side by side."""
    labels = list(range(pred.num_classes))
    names = axis_names(pred.class_names)
    name_width = 0.08 * max(len(name) for name in names)  # inches at 10 pt, roughly
    side, gap, top = 3.4, 0.3, 0.35  # inches: each matrix a square of this side
    upright = name_width > 0.9 * side / pred.num_classes  # names wider than their column stand on end
    left, bottom = 0.6 + name_width, 0.55 + (name_width if upright else 0.2)
    figure = new_figure(left + 2 * side + gap + 0.1, bottom + side + top, margins=(left, bottom, 0.1, top))
    counts_axis, normalized_axis = figure.subplots(1, 2, gridspec_kw={"wspace": gap / side})
    for axis, normalize, fmt, title in (
        (counts_axis, None, "d", "counts"),
        (normalized_axis, "true", ".2f", "share of each true class"),
    ):
        matrix = confusion_matrix(pred.y_true, pred.y_pred, labels=labels, normalize=normalize)
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(
            ax=axis, values_format=fmt, colorbar=False, cmap="Blues",
            xticks_rotation="vertical" if upright else "horizontal"
        )
        _title(axis, title)
    normalized_axis.set_yticklabels([])  # the rows are the left matrix's, on the same line
    normalized_axis.set_ylabel("")
    return save_figure(figure, path)


def scored_classes(pred: Predictions) -> list[int]:
    """Classes with a one-vs-rest curve: the positive class for two classes, every class present otherwise."""
    candidates = [POSITIVE] if pred.num_classes == 2 else range(pred.num_classes)
    return [k for k in candidates if 0 < (pred.y_true == k).sum() < len(pred.y_true)]


def rule_point(pred: Predictions) -> dict | None:
    """Two classes: where the model's decisions sit on its curves (false-positive rate, recall and, when it
    predicts the positive class at all, precision), and the rule's name; None for more classes."""
    if pred.num_classes != 2 or POSITIVE not in scored_classes(pred):
        return None
    positive, predicted = pred.y_true == POSITIVE, pred.y_pred == POSITIVE
    rule = "argmax" if pred.threshold is None else f"p ≥ {pred.threshold:.3f}"
    return {"fpr": predicted[~positive].mean(), "recall": predicted[positive].mean(),
            "precision": positive[predicted].mean() if predicted.any() else None, "label": f"decision rule ({rule})"}


def plot_roc(pred: Predictions, path) -> Path:
    """ROC curve (one-vs-rest per class when there are more than two), with the decision rule's point."""
    figure = new_figure(5, 4.5, margins=CURVE_MARGINS)
    axis = figure.subplots()
    for n, k in enumerate(scored_classes(pred)):
        is_k, scores = pred.y_true == k, pred.probs[:, k]
        fpr, tpr, _ = roc_curve(is_k, scores)
        display = RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=roc_auc_score(is_k, scores))
        display.plot(ax=axis, name=pred.class_names[k], plot_chance_level=n == 0)
    if point := rule_point(pred):
        axis.plot(point["fpr"], point["recall"], "o", color="black", label=point["label"])
        axis.legend(loc="lower right")
    _title(axis, "ROC")
    return save_figure(figure, path)


def plot_pr(pred: Predictions, path) -> Path:
    """Precision-recall curve with average precision (one-vs-rest per class when there are more than two), with the
    decision rule's point."""
    figure = new_figure(5, 4.5, margins=CURVE_MARGINS)
    axis = figure.subplots()
    for k in scored_classes(pred):
        is_k, scores = pred.y_true == k, pred.probs[:, k]
        precision, recall, _ = precision_recall_curve(is_k, scores)
        display = PrecisionRecallDisplay(precision, recall, average_precision=average_precision_score(is_k, scores))
        display.plot(ax=axis, name=pred.class_names[k])
        axis.axhline(is_k.mean(), color="gray", linestyle="--", linewidth=1, label=f"chance ({is_k.mean():.2f})")
    if (point := rule_point(pred)) and point["precision"] is not None:
        axis.plot(point["recall"], point["precision"], "o", color="black", label=point["label"])
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="lower left")
    _title(axis, "precision-recall")
    return save_figure(figure, path)


def plot_calibration(metrics: dict, path) -> Path:
    """Reliability diagram of the top-class probability, with the number of images per bin below."""
    bins = metrics["calibration"]["bins"]
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [b for b in bins if b["count"]]
    figure = new_figure(5, 5.5, margins=CURVE_MARGINS)
    reliability, counts = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True, gridspec_kw={"hspace": 0.1})
    reliability.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    accuracy = [b["accuracy"] for b in filled]
    reliability.bar([(b["lo"] + b["hi"]) / 2 for b in filled], accuracy, width=width * 0.9, alpha=0.7, label="accuracy in bin")
    reliability.plot([b["confidence"] for b in filled], accuracy, "o", color="black", markersize=4, label="at mean confidence")
    reliability.set(ylabel="accuracy", ylim=(0, 1.02))
    _title(reliability, f"calibration (ECE {metrics['calibration']['ece']:.3f})")
    reliability.legend(loc="upper left")
    counts.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="tab:gray")
    counts.set(xlabel="top-class probability", ylabel="images", xlim=(0, 1))
    return save_figure(figure, path)


def plot_learning_curve(curve: dict, path) -> Path:
    """The learning curve (training/curve.py): the mean out-of-fold score with its 95% interval against the images
    per class, the fitted power law dashed and its extrapolation hollow: an estimate, and titled so."""
    points = curve["points"]
    sizes = [p["images_per_class"] for p in points]
    scores = np.array([p["score"] for p in points])
    errors = np.array([[p["score"] - p["low"] for p in points], [p["high"] - p["score"] for p in points]])
    figure = new_figure(6.5, 3.6, margins=CURVE_MARGINS)
    axis = figure.subplots()
    axis.errorbar(sizes, scores, yerr=errors, marker="o", markersize=4, capsize=3, color="tab:blue",
                  label=f"out of fold ({curve['folds']} grouped folds), 95% interval")
    if curve["law"]:
        law, ahead = curve["law"], curve["extrapolated"]
        grid = np.linspace(sizes[0], ahead[-1]["images_per_class"], 100)
        axis.plot(grid, 1 - (law["a"] * grid ** -law["b"] + law["c"]), linestyle="--", color="tab:gray",
                  label="power law fit")
        axis.plot([p["images_per_class"] for p in ahead], [p["score"] for p in ahead], "o", markersize=6,
                  markerfacecolor="none", color="tab:gray", label="extrapolated (estimate)")
    axis.set(xlabel="training images per class", ylabel=curve["metric"], ylim=(max(0.0, scores.min() - 0.25), 1.02))
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    _title(axis, "learning curve (an estimate)")
    return save_figure(figure, path)
