"""report.html and the files beside it: predictions (and optionally history, run info, checks,
cross-validation) in; predictions.csv, metrics.json, plots/ and one self-contained page out.

The charts are `charts`', the photo grids `photos`', the HTML `html`'s; this module runs the charts and the
photos side by side and writes what they make.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .charts import (plot_c_choice, plot_calibration, plot_confusion, plot_curves, plot_learning_curve, plot_pr,
                     plot_roc, scored_classes)
from .metrics import Predictions, compute_metrics, json_ready
from .html import render_report
from .photos import Thumbnails, duplicate_thumbnails, file_data_uri, plot_samples
from ..cache import THUMBNAILS, store_dir
from ..files import atomic_write_text

logger = logging.getLogger(__name__)


def write_predictions_csv(pred: Predictions, path) -> Path:
    """One row per image: path, true label, predicted label, then p_<class> for every class."""
    file = io.StringIO(newline="")
    writer = csv.writer(file)
    writer.writerow(["path", "label", "predicted"] + [f"p_{name}" for name in pred.class_names])
    for i, image_path in enumerate(pred.paths):
        probs = [repr(float(p)) for p in pred.probs[i]]
        writer.writerow([image_path, pred.class_names[pred.y_true[i]], pred.class_names[pred.y_pred[i]]] + probs)
    return atomic_write_text(path, file.getvalue())


SMALL_VALIDATION = 50  # below this many validation images, the best of the epochs is an optimistic figure


def selection_note(epochs: int, n: int) -> dict:
    """The kept epoch is the best of `epochs` on the same n validation images it is then scored on."""
    warning = None
    if n < SMALL_VALIDATION and epochs > 1:
        warning = (f"the best of {epochs} epochs on the same {n} validation images: this figure is optimistic; "
                   "--folds 5 gives an unbiased one")
    return {"epochs": epochs, "n": n, "warning": warning}


def _photo_images(pred: Predictions, checks: dict | None, plots: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The sample and error grids, and the duplicate thumbnails; each file is decoded once for all three."""
    thumbnails, grids = Thumbnails(store=store_dir(THUMBNAILS)), {}
    grids["samples"] = plot_samples(pred, plots / "samples.jpg", thumbnails=thumbnails)
    if (pred.y_pred != pred.y_true).any():
        grids["errors"] = plot_samples(pred, plots / "errors.jpg", wrong_only=True, thumbnails=thumbnails)
    return grids, duplicate_thumbnails(checks, thumbnails)


def write_report(out_dir, pred: Predictions, *, history: list[dict] | None = None, run_info: dict | None = None,
                 checks: dict | None = None, cv: dict | None = None, test: Predictions | None = None,
                 threshold: float | None = None, title: str = "stopsign report", warnings: list[str] = (),
                 learning_curve: dict | None = None) -> dict:
    """Write predictions.csv, metrics.json, plots/ (charts .png, photo grids .jpg) and report.html; return the metrics.

    test: the layout's test split, scored once with the kept model (metrics["test"]); history: the epochs, whose
    count and the validation size say how much choosing the best epoch flatters the headline (metrics["selection"]);
    warnings: what training found wrong (a head no better than the prior), shown first with the verdict's own;
    learning_curve: training/curve.py's, drawn and kept in metrics.json (metrics["learning_curve"]).
    """
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    pred = pred.with_threshold(threshold) if threshold is not None else pred
    metrics = compute_metrics(pred)
    metrics["warnings"] = list(warnings) + [m for m in [metrics["verdict"]["message"]] if m]
    if cv is not None:
        metrics["cv"] = json_ready(cv)
    if test is not None:
        metrics["test"] = compute_metrics(test.with_threshold(threshold) if threshold is not None else test)
    if learning_curve:
        metrics["learning_curve"] = learning_curve
    if history and cv is None:
        metrics["selection"] = selection_note(len(history), metrics["n"])
    write_predictions_csv(pred, out_dir / "predictions.csv")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))

    charts = {}
    if history and len(history) > 1:  # an SGD head's epochs
        charts["curves"] = (plot_curves, history, plots / "curves.png")
    elif history and history[0].get("C_scores"):  # a head fit in one step: its choice of C, not a lone point
        charts["curves"] = (plot_c_choice, history[0], plots / "c_choice.png")
    charts["confusion"] = (plot_confusion, pred, plots / "confusion.png")
    if scored_classes(pred):
        charts["roc"] = (plot_roc, pred, plots / "roc.png")
        charts["pr"] = (plot_pr, pred, plots / "pr.png")
    charts["calibration"] = (plot_calibration, metrics, plots / "calibration.png")
    if learning_curve:
        charts["learning_curve"] = (plot_learning_curve, learning_curve, plots / "learning_curve.png")
    # The photo work (decoding, resizing, JPEG) releases the GIL: a thread does it beside the charts.
    with ThreadPoolExecutor(1) as pool:
        photo_work = pool.submit(_photo_images, pred, checks, plots)
        images = {name: draw(data, path) for name, (draw, data, path) in charts.items()}
        grids, thumbnail_uris = photo_work.result()

    page = render_report(title, metrics, images={name: file_data_uri(path) for name, path in (images | grids).items()},
                         run_info=run_info, checks=checks, thumbnails=thumbnail_uris, cv=cv)
    atomic_write_text(out_dir / "report.html", page)
    logger.debug("wrote the report to %s", out_dir / "report.html")
    return metrics
