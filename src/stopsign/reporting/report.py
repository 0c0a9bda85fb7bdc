"""report.html and the files beside it: predictions (and optionally history, run info, checks,
cross-validation) in; predictions.csv, metrics.json, plots/ and one self-contained page out.

The charts are `charts`', the photo grids `photos`', the HTML `html`'s; this module runs them
side by side (a forked process, a thread) and writes what they make.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .charts import plot_c_choice, plot_calibration, plot_confusion, plot_curves, plot_pr, plot_roc, scored_classes
from .metrics import Predictions, compute_metrics, json_ready
from .photos import Thumbnails, data_uri, default_thumbnail_dir, duplicate_thumbnails, plot_samples
from ..files import atomic_write_text
from .html import render_report

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


def file_data_uri(path: Path) -> str:
    """A written plot as a data: URI (JPEG or PNG by its suffix)."""
    return data_uri(Path(path).read_bytes(), "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png")


FORKED_CHARTS = ("curves", "calibration")  # the child finishes first: the photo thread slows the parent
CHILD_TIMEOUT = 30.0  # seconds the parent waits for the chart child after its own work (it needs about 0.2 s)
FORK = sys.platform == "linux"  # macOS forbids fork after some system libraries are loaded; Windows has none


class ForkedCharts:
    """Draws some charts in a child process, forked, while this one draws the others.

    matplotlib holds the GIL, so threads cannot share its work; a forked child has every module loaded already
    and starts in a few milliseconds. On two cores the report of a run on warm features went from 0.40 to
    0.28 s (bench/bench_speed.py), most of what is left of such a run. Only where FORK says. The child draws
    into files (atomic writes), writes nothing else (a stream lock held by another thread at the fork, as in a
    notebook, would hang it) and exits whatever happens, so a killed parent leaves no process behind for long.
    Whatever goes wrong (no fork, a child that fails, hangs past CHILD_TIMEOUT or is reaped by someone else),
    the charts are drawn here instead; an interrupted wait kills and reaps the child before it goes on.
    """

    def __init__(self, charts: dict):
        self.charts, self.pid, self.status = charts, None, None

    @property
    def names(self):
        """The charts the child draws: none when there is no child."""
        return self.charts if self.pid else ()

    def __enter__(self) -> "ForkedCharts":
        if self.charts and FORK:
            # Python 3.12+ warns on any fork beside other threads (torch's idle pool here); the child only draws
            # with matplotlib and PIL, starts no thread and never returns to the caller.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    self.pid = os.fork()
                except OSError as error:  # out of memory or processes: draw everything here
                    logger.debug("no chart process: %s", error)
            if self.pid == 0:
                code = 1
                try:
                    warnings.simplefilter("ignore")  # the parent says what there is to say when it redraws
                    logging.disable(logging.CRITICAL)
                    for draw, data, path in self.charts.values():
                        draw(data, path)
                    code = 0
                finally:
                    os._exit(code)  # never back into the caller's code, whatever happened
        return self

    def __exit__(self, *exc) -> None:
        if not self.pid:
            return
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT
            while time.monotonic() < deadline:
                done, status = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    self.status = status
                    return
                time.sleep(0.002)
        except ChildProcessError:  # SIGCHLD ignored: the kernel reaped the child, its status is unknown
            return
        finally:
            if self.status is None:  # timed out, interrupted (Ctrl-C) or unknown: no child left behind
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)

    def result(self) -> dict[str, Path]:
        """The paths of the child's charts, drawn here instead if the child failed."""
        if not self.pid:
            return {}
        if self.status != 0:
            logger.warning("the chart process failed or hung (wait status %s); drawing its charts here", self.status)
        return {name: path if self.status == 0 else draw(data, path) for name, (draw, data, path) in self.charts.items()}


def _photo_images(pred: Predictions, checks: dict | None, plots: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The sample and error grids, and the duplicate thumbnails; each file is decoded once for all three."""
    thumbnails, grids = Thumbnails(store=default_thumbnail_dir()), {}
    grids["samples"] = plot_samples(pred, plots / "samples.jpg", thumbnails=thumbnails)
    if (pred.y_pred != pred.y_true).any():
        grids["errors"] = plot_samples(pred, plots / "errors.jpg", wrong_only=True, thumbnails=thumbnails)
    return grids, duplicate_thumbnails(checks, thumbnails)


def write_report(
    out_dir,
    pred: Predictions,
    *,
    history: list[dict] | None = None,
    run_info: dict | None = None,
    checks: dict | None = None,
    cv: dict | None = None,
    test: Predictions | None = None,
    threshold: float | None = None,
    title: str = "stopsign report",
    warnings: list[str] = (),
) -> dict:
    """Write predictions.csv, metrics.json, plots/ (charts .png, photo grids .jpg) and report.html; return the metrics.

    test: the layout's test split, scored once with the kept model (metrics["test"]); history: the epochs, whose
    count and the validation size say how much choosing the best epoch flatters the headline (metrics["selection"]);
    warnings: what training found wrong (a head no better than the prior), shown first with the verdict's own.
    """
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    if threshold is not None:
        pred = pred.with_threshold(threshold)
    metrics = compute_metrics(pred)
    metrics["warnings"] = list(warnings) + [m for m in [metrics["verdict"]["message"]] if m]
    if cv is not None:
        metrics["cv"] = json_ready(cv)
    if test is not None:
        metrics["test"] = compute_metrics(test.with_threshold(threshold) if threshold is not None else test)
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
    with ForkedCharts({name: chart for name, chart in charts.items() if name in FORKED_CHARTS}) as forked:
        # The photo work (decoding, resizing, JPEG) releases the GIL: a thread does it beside the charts.
        with ThreadPoolExecutor(1) as pool:
            photo_work = pool.submit(_photo_images, pred, checks, plots)
            images = {name: draw(data, path) for name, (draw, data, path) in charts.items() if name not in forked.names}
            grids, thumbnail_uris = photo_work.result()
    images |= forked.result()

    page = render_report(
        title,
        metrics,
        images={name: file_data_uri(path) for name, path in (images | grids).items()},
        run_info=run_info,
        checks=checks,
        thumbnails=thumbnail_uris,
        cv=cv,
    )
    atomic_write_text(out_dir / "report.html", page)
    logger.debug("wrote the report to %s", out_dir / "report.html")
    return metrics
