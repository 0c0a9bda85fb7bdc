"""`--log tensorboard|mlflow`: a run's settings, its metrics.csv rows as they are written, its final evaluation
figures and its report, as TensorBoard event files in RUN/tensorboard/ (through torch.utils.tensorboard) or as an
MLflow run in RUN/mlruns/ (or the store MLFLOW_TRACKING_URI names). Each package is an optional extra:
check_tracking says so before any work. `tracking` opens the tracker for the run's `with` block and closes it when
the run fails, so that no MLflow run is left running."""

from __future__ import annotations

import importlib
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..config import Settings
from ..errors import Interrupted, StopsignError

# --log: the pip package that provides the module of the same name (torch does not bring tensorboard, which
# SummaryWriter needs; mlflow-skinny is MLflow's client without its server and UI)
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}
EPOCH_SCALARS = {"train_loss": "train/loss", "train_acc": "train/accuracy", "val_loss": "val/loss",
                 "val_acc": "val/accuracy", "lr": "train/lr"}
EVALUATION_FIGURES = ("accuracy", "balanced_accuracy", "log_loss")
MLFLOW_EXPERIMENT = "stopsign"
MLFLOW_ARTIFACTS = ("README.md", "report.html", "best.pt", "metrics.csv", "config.json", "args.yaml")


def check_tracking(log: str | None) -> None:
    """A one-line error naming the pip command when the package `--log` needs is missing."""
    if log is None:
        return
    try:
        importlib.import_module(log)
    except ImportError:
        raise StopsignError(f"--log {log} needs the {PACKAGES[log]} package, which is not installed. "
                            f"Fix: pip install 'stopsign[{log}]'") from None


def open_tracker(settings: Settings, run_dir: Path) -> TensorBoard | MLflow | None:
    """The tracker `--log` asks for, writing into the run folder; None without --log."""
    log = settings.run.log
    return {"tensorboard": TensorBoard, "mlflow": MLflow}[log](run_dir, settings.to_dict()) if log else None


@contextmanager
def tracking(settings: Settings, run_dir: Path):
    """open_tracker's tracker for the run's `with` block: if the run raises, the tracker is closed, an MLflow run
    marked failed (killed on Ctrl-C) rather than left running."""
    tracker = open_tracker(settings, run_dir)
    try:
        yield tracker
    except BaseException as error:
        if tracker:
            tracker.close(error)
        raise


class TensorBoard:
    """A run's event files in RUN/tensorboard/: one scalar per metrics.csv column per epoch, then the run's settings
    beside its final figures (TensorBoard's HPARAMS tab), the model card as text and the report's charts as
    images. A resumed run adds event files to the same folder."""

    def __init__(self, run_dir: Path, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.settings = SummaryWriter(str(run_dir / "tensorboard")), settings

    def log_epoch(self, row: dict) -> None:
        """One metrics.csv row (a logistic head has one, without a learning rate)."""
        for column, tag in EPOCH_SCALARS.items():
            if row.get(column) is not None:
                self.writer.add_scalar(tag, row[column], row["epoch"])
        self.writer.flush()

    def log_run(self, run_summary: dict, run_dir: Path) -> None:
        """The flat settings against summary.json's evaluation figures and their baselines; the model card
        (README.md) and every chart of plots/; then the files are closed."""
        self.writer.add_hparams(shown(self.settings), final_figures(run_summary), run_name=".")
        if (card := run_dir / "README.md").is_file():
            self.writer.add_text("model card", card.read_text(encoding="utf-8"))
        for chart in sorted((run_dir / "plots").glob("*.png")):
            self.writer.add_image(f"charts/{chart.stem}", read_rgb(chart), dataformats="HWC")
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        self.writer.close()


class MLflow:
    """A run of the experiment "stopsign" named after the run folder: the flat settings as parameters, each
    metrics.csv row as metrics at step = epoch, then summary.json's evaluation figures and their baselines, and the
    model card, report, model, settings and charts as artifacts. Its store is RUN/mlruns/ (an SQLite database, as
    MLflow 3 asks: it refuses its file store by default) unless MLFLOW_TRACKING_URI names another, MLflow's own
    convention. A client, not mlflow.start_run, so that no global MLflow state changes. A resumed run continues
    its unfinished MLflow run."""

    def __init__(self, run_dir: Path, settings: dict):
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        store = None if uri else (run_dir / "mlruns").resolve()
        if store:
            store.mkdir(exist_ok=True)
            uri = f"sqlite:///{(store / 'mlflow.db').as_posix()}"
        self.client = mlflow_client(uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            MLFLOW_EXPERIMENT, artifact_location=(store / "artifacts").as_uri() if store else None)
        unfinished = [] if "'" in run_dir.name else self.client.search_runs(  # a quote would end the filter's string
            [experiment_id], f"attributes.run_name = '{run_dir.name}' and attributes.status != 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"])
        if unfinished:
            self.run_id, logged = unfinished[0].info.run_id, unfinished[0].data.params
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id, logged = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id, {}
        # MLflow refuses to change a logged parameter: a resumed run keeps the values of its first start
        params = [Param(name, str(value)) for name, value in shown(settings).items() if name not in logged]
        self.client.log_batch(self.run_id, params=params)

    def log_epoch(self, row: dict) -> None:
        """One metrics.csv row, under its column names (a logistic head has one, without a learning rate)."""
        self.log_metrics({column: row[column] for column in EPOCH_SCALARS if row.get(column) is not None},
                         step=row["epoch"])

    def log_run(self, run_summary: dict, run_dir: Path) -> None:
        """summary.json's evaluation figures and their baselines (evaluation_accuracy, baseline_log_loss...), the
        run's files and plots/ as artifacts; then the run is ended."""
        self.log_metrics({name.replace("/", "_"): value for name, value in final_figures(run_summary).items()})
        for name in MLFLOW_ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "plots"), "plots")
        self.close()

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(value), now, step)
                                                    for name, value in metrics.items()])

    def close(self, error: BaseException | None = None) -> None:
        """Ends the run: finished, killed by Ctrl-C, or failed."""
        stopped = isinstance(error, (KeyboardInterrupt, Interrupted))
        self.client.set_terminated(self.run_id, "FINISHED" if error is None else "KILLED" if stopped else "FAILED")


def mlflow_client(uri: str):
    """MLflow's client of the store at `uri`, without the two INFO lines MLflow prints on opening an SQLite store,
    which every run's output would show."""
    from mlflow.tracking import MlflowClient

    store_log = logging.getLogger("mlflow.store.db.utils")
    level = store_log.level
    store_log.setLevel(logging.WARNING)
    try:
        return MlflowClient(tracking_uri=uri)
    finally:
        store_log.setLevel(level)


def final_figures(run_summary: dict) -> dict[str, float]:
    """summary.json's evaluation figures and their baselines: {"evaluation/accuracy": ..., "baseline/...": ...}."""
    evaluation = run_summary.get("evaluation") or {}
    figures = {f"evaluation/{name}": evaluation[name] for name in EVALUATION_FIGURES
               if evaluation.get(name) is not None}
    return figures | {f"baseline/{name}": evaluation["baseline"][name] for name in EVALUATION_FIGURES
                      if evaluation and evaluation["baseline"].get(name) is not None}


def shown(settings: dict) -> dict:
    """The flat settings with an unset one as "none": TensorBoard's hparams and MLflow's parameters take no None."""
    return {name: "none" if value is None else value for name, value in settings.items()}


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
