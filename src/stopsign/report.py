"""Plots and report.html: predictions (and optionally history, run info, checks, cross-validation) in, files out.

Figures are drawn on matplotlib's object API with the Agg canvas, so nothing here touches pyplot's
global state or needs a display. The HTML itself is rendered by `report_html`.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
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

from .errors import ImageError
from .images import read_image
from .metrics import POSITIVE, Predictions, compute_metrics, json_ready
from .report_html import render_report
from .runs import atomic_write_bytes, atomic_write_text  # runs imports only errors: no cycle

logger = logging.getLogger(__name__)

MAX_ERROR_IMAGES = 100  # errors.png shows every mistake up to this many (a figure of 1,000 photos helps no one)
THUMBNAIL_SIDE = 96  # duplicate-group thumbnails in the HTML, in pixels
GRID_IMAGE_SIDE = 192  # images of samples.png and errors.png, in pixels (the size the matplotlib grid showed)
MAX_THUMBNAIL_GROUPS = 50  # duplicate groups shown with thumbnails; the rest are listed by name
WRONG = "#c0392b"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_curves(history: list[dict], path) -> Path:
    """Loss and accuracy (train and val) and the learning rate, against the epoch."""
    epochs = [row["epoch"] for row in history]

    def column(key):
        return [np.nan if row.get(key) is None else float(row[key]) for row in history]

    figure = _figure(13, 3.6)
    loss_axis, accuracy_axis, lr_axis = figure.subplots(1, 3)
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "acc")):
        for split in ("train", "val"):
            values = column(f"{split}_{metric}")
            if not all(math.isnan(v) for v in values):
                axis.plot(epochs, values, marker="o", markersize=3, label=split)
        axis.set_xlabel("epoch")
        axis.legend()
        axis.grid(alpha=0.3)
    loss_axis.set_title("loss")
    accuracy_axis.set_title("accuracy")
    accuracy_axis.set_ylim(-0.02, 1.02)
    rates = column("lr")
    lr_axis.plot(epochs, rates, marker="o", markersize=3, color="tab:gray")
    positive = [r for r in rates if r > 0]
    if positive and max(positive) / min(positive) > 100:
        lr_axis.set_yscale("log")
    lr_axis.set_title("learning rate")
    lr_axis.set_xlabel("epoch")
    lr_axis.grid(alpha=0.3)
    return _save(figure, path)


class Thumbnails:
    """Upright RGB thumbnails for one report: each file is decoded once, at the largest size asked first."""

    def __init__(self, side: int = GRID_IMAGE_SIDE):
        self.side = side
        self.decoded: dict[str, Image.Image | None] = {}

    def get(self, path, side: int) -> Image.Image | None:
        """A copy of the image at most side x side pixels, or None when it cannot be read."""
        path = str(path)
        if path not in self.decoded:
            try:  # JPEG: decoded at a reduced scale no smaller than self.side
                image = read_image(path, draft=(self.side, self.side))
                image.thumbnail((self.side, self.side))
            except ImageError:
                image = None
            self.decoded[path] = image
        image = self.decoded[path]
        if image is None:
            return None
        image = image.copy()
        image.thumbnail((side, side))
        return image


def load_thumbnail(path, side: int) -> Image.Image | None:
    """An upright RGB copy of an image at most side x side pixels, or None when it cannot be read."""
    return Thumbnails(side).get(path, side)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """The text, cut with an ellipsis where it is wider than width pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def plot_samples(pred: Predictions, path, *, max_images: int = 16, wrong_only: bool = False,
                 thumbnails: Thumbnails | None = None) -> Path:
    """A grid of images titled "predicted p=0.93 / truth", mistakes in red with a thick red frame.

    wrong_only=True shows every misclassified image (up to MAX_ERROR_IMAGES), most confident first,
    and ignores max_images; otherwise the first max_images images in evaluation order. Drawn with PIL,
    not matplotlib subplots: pasting thumbnails is many times faster than laying out one axis per image.
    """
    thumbnails = thumbnails or Thumbnails()
    y_pred, confidence = pred.y_pred, pred.confidence
    wrong = y_pred != pred.y_true
    if wrong_only:
        order = [i for i in np.argsort(-confidence, kind="stable") if wrong[i]]
        shown = order[:MAX_ERROR_IMAGES]
    else:
        shown = list(range(min(max_images, len(pred.y_true))))
    columns = max(1, min(5, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    pad, title_height, side = 8, 20, GRID_IMAGE_SIDE
    cell_width, cell_height = side + 2 * pad, side + title_height + 2 * pad
    heading = ""
    if wrong_only and shown:
        total = int(wrong.sum())
        heading = f"{total} misclassified, most confident first" + (f" (first {len(shown)})" if total > len(shown) else "")
    top = 28 if heading else 0
    grid = Image.new("RGB", (columns * cell_width, top + rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    title_font, heading_font = _font(13), _font(16)
    if heading:
        draw.text((grid.width / 2, top / 2), heading, fill="black", font=heading_font, anchor="mm")
    if not shown:
        draw.text((grid.width / 2, grid.height / 2), "no misclassified images" if wrong_only else "no images to show",
                  fill="black", font=heading_font, anchor="mm")
        return _save_image(grid, path)
    for slot, i in enumerate(shown):
        x = (slot % columns) * cell_width
        y = top + (slot // columns) * cell_height
        color = WRONG if wrong[i] else "black"
        title = f"{pred.class_names[y_pred[i]]} p={confidence[i]:.2f} / {pred.class_names[pred.y_true[i]]}"
        draw.text((x + cell_width / 2, y + pad + title_height / 2), _fit_text(draw, title, title_font, cell_width - 4),
                  fill=color, font=title_font, anchor="mm")
        box = (x + pad, y + pad + title_height, x + pad + side, y + pad + title_height + side)
        image = thumbnails.get(pred.paths[i], side)
        if image is None:
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "unreadable", fill="black", font=title_font,
                      anchor="mm")
        else:  # centred in the square, as imshow would show it
            grid.paste(image, (box[0] + (side - image.width) // 2, box[1] + (side - image.height) // 2))
        frame = 3 if wrong[i] else 1
        draw.rectangle((box[0] - frame, box[1] - frame, box[2] + frame - 1, box[3] + frame - 1),
                       outline=color if wrong[i] else "#999999", width=frame)
    return _save_image(grid, path)


def _save_image(image: Image.Image, path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_confusion(pred: Predictions, path) -> Path:
    """The confusion matrix as counts and row-normalised (rows = truth), side by side."""
    labels = list(range(pred.num_classes))
    figure = _figure(10, 4.2)
    counts_axis, normalized_axis = figure.subplots(1, 2)
    for axis, normalize, fmt, title in (
        (counts_axis, None, "d", "counts"),
        (normalized_axis, "true", ".2f", "share of each true class"),
    ):
        matrix = confusion_matrix(pred.y_true, pred.y_pred, labels=labels, normalize=normalize)
        ConfusionMatrixDisplay(matrix, display_labels=pred.class_names).plot(
            ax=axis, values_format=fmt, colorbar=False, cmap="Blues"
        )
        axis.set_title(title)
    return _save(figure, path)


def _scored_classes(pred: Predictions) -> list[int]:
    """Classes with a one-vs-rest curve: the positive class for two classes, every class present otherwise."""
    candidates = [POSITIVE] if pred.num_classes == 2 else range(pred.num_classes)
    return [k for k in candidates if 0 < (pred.y_true == k).sum() < len(pred.y_true)]


def plot_roc(pred: Predictions, path) -> Path:
    """ROC curve (one-vs-rest per class when there are more than two)."""
    figure = _figure(5, 4.5)
    axis = figure.subplots()
    for n, k in enumerate(_scored_classes(pred)):
        is_k, scores = pred.y_true == k, pred.probs[:, k]
        fpr, tpr, _ = roc_curve(is_k, scores)
        display = RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=roc_auc_score(is_k, scores))
        display.plot(ax=axis, name=pred.class_names[k], plot_chance_level=n == 0)
    axis.set_title("ROC")
    return _save(figure, path)


def plot_pr(pred: Predictions, path) -> Path:
    """Precision-recall curve with average precision (one-vs-rest per class when there are more than two)."""
    figure = _figure(5, 4.5)
    axis = figure.subplots()
    for k in _scored_classes(pred):
        is_k, scores = pred.y_true == k, pred.probs[:, k]
        precision, recall, _ = precision_recall_curve(is_k, scores)
        display = PrecisionRecallDisplay(precision, recall, average_precision=average_precision_score(is_k, scores))
        display.plot(ax=axis, name=pred.class_names[k])
        axis.axhline(is_k.mean(), color="gray", linestyle="--", linewidth=1, label=f"chance ({is_k.mean():.2f})")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="lower left")
    axis.set_title("precision-recall")
    return _save(figure, path)


def plot_calibration(metrics: dict, path) -> Path:
    """Reliability diagram of the top-class probability, with the number of images per bin below."""
    bins = metrics["calibration"]["bins"]
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [b for b in bins if b["count"]]
    figure = _figure(5, 5.5)
    reliability, counts = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    reliability.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    accuracy = [b["accuracy"] for b in filled]
    reliability.bar([(b["lo"] + b["hi"]) / 2 for b in filled], accuracy, width=width * 0.9, alpha=0.7, label="accuracy in bin")
    reliability.plot([b["confidence"] for b in filled], accuracy, "o", color="black", markersize=4, label="at mean confidence")
    reliability.set_ylabel("accuracy")
    reliability.set_ylim(0, 1.02)
    reliability.set_title(f"calibration (ECE {metrics['calibration']['ece']:.3f})")
    reliability.legend(loc="upper left")
    counts.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="tab:gray")
    counts.set_xlabel("top-class probability")
    counts.set_ylabel("images")
    counts.set_xlim(0, 1)
    return _save(figure, path)


def write_predictions_csv(pred: Predictions, path) -> Path:
    """One row per image: path, true label, predicted label, then p_<class> for every class."""
    file = io.StringIO(newline="")
    writer = csv.writer(file)
    writer.writerow(["path", "label", "predicted"] + [f"p_{name}" for name in pred.class_names])
    for i, image_path in enumerate(pred.paths):
        probs = [repr(float(p)) for p in pred.probs[i]]
        writer.writerow([image_path, pred.class_names[pred.y_true[i]], pred.class_names[pred.y_pred[i]]] + probs)
    return atomic_write_text(path, file.getvalue())


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _thumbnails(checks: dict | None, thumbnails: Thumbnails | None = None) -> dict[str, str]:
    """JPEG data URIs for the files of the duplicate groups the report shows."""
    thumbnails = thumbnails or Thumbnails(THUMBNAIL_SIDE)
    if not checks:
        return {}
    groups = checks.get("exact_duplicates", [])[:MAX_THUMBNAIL_GROUPS] + checks.get("near_duplicates", [])[:MAX_THUMBNAIL_GROUPS]
    uris = {}
    for file in (f for group in groups for f in group["files"]):
        if file["path"] in uris:
            continue
        image = thumbnails.get(file["path"], THUMBNAIL_SIDE)
        if image is not None:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
            uris[file["path"]] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return uris


def write_report(
    out_dir,
    pred: Predictions,
    *,
    history: list[dict] | None = None,
    run_info: dict | None = None,
    checks: dict | None = None,
    cv: dict | None = None,
    threshold: float | None = None,
    title: str = "stopsign report",
) -> dict:
    """Write predictions.csv, metrics.json, plots/*.png and one self-contained report.html; return the metrics."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    if threshold is not None:
        pred = pred.with_threshold(threshold)
    metrics = compute_metrics(pred)
    if cv is not None:
        metrics["cv"] = json_ready(cv)
    write_predictions_csv(pred, out_dir / "predictions.csv")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))

    images, thumbnails = {}, Thumbnails()  # the grids and the duplicate thumbnails decode each file once
    if history:
        images["curves"] = plot_curves(history, plots / "curves.png")
    images["samples"] = plot_samples(pred, plots / "samples.png", thumbnails=thumbnails)
    if (pred.y_pred != pred.y_true).any():
        images["errors"] = plot_samples(pred, plots / "errors.png", wrong_only=True, thumbnails=thumbnails)
    images["confusion"] = plot_confusion(pred, plots / "confusion.png")
    if _scored_classes(pred):
        images["roc"] = plot_roc(pred, plots / "roc.png")
        images["pr"] = plot_pr(pred, plots / "pr.png")
    images["calibration"] = plot_calibration(metrics, plots / "calibration.png")

    page = render_report(
        title,
        metrics,
        images={name: _data_uri(path) for name, path in images.items()},
        run_info=run_info,
        checks=checks,
        thumbnails=_thumbnails(checks, thumbnails),
        cv=cv,
    )
    atomic_write_text(out_dir / "report.html", page)
    logger.info("wrote the report to %s", out_dir / "report.html")
    return metrics
