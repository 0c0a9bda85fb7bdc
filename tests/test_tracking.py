"""`train --log tensorboard|mlflow` (training/tracking.py): the run's figures in RUN/tensorboard's event files or in
an MLflow run, in RUN/mlruns/ or the store MLFLOW_TRACKING_URI names."""

import csv
import json
import sys

import pytest

from conftest import train_tiny
from stopsign.cli import main


def test_a_run_logs_its_metrics_figures_and_charts_to_tensorboard(tmp_path, make_images, tiny_backbone):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders", size=(40, 40))
    result = train_tiny(tmp_path, data, epochs=2, log="tensorboard")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    with open(result.run_dir / "metrics.csv", newline="") as rows:
        val_acc = [float(row["val_acc"]) for row in csv.DictReader(rows)]
    logged = events.Scalars("val/accuracy")
    assert [e.step for e in logged] == [1, 2] and [e.value for e in logged] == pytest.approx(val_acc)
    evaluation = json.loads((result.run_dir / "summary.json").read_text())["evaluation"]
    assert events.Scalars("evaluation/accuracy")[0].value == pytest.approx(evaluation["accuracy"])
    assert events.Scalars("baseline/log_loss")[0].value == pytest.approx(evaluation["baseline"]["log_loss"])
    assert "charts/confusion" in events.Tags()["images"]
    assert json.loads((result.run_dir / "config.json").read_text())["log"] == "tensorboard"


@pytest.mark.parametrize("log", ["tensorboard", "mlflow"])
def test_without_its_package_the_flag_stops_before_any_work(log, tmp_path, make_images, monkeypatch, capsys):
    data = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    monkeypatch.setitem(sys.modules, log, None)  # `import tensorboard` (or mlflow) now raises ImportError
    out = tmp_path / "runs"
    assert main(["-q", "train", str(data), "--log", log, "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert f"pip install 'stopsign[{log}]'" in message and "\n" not in message
    assert not out.exists()


def mlflow_run(tracking_uri: str, run_name: str):
    """The MLflow run of that name in the experiment "stopsign" of the store at tracking_uri, and a client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("stopsign")
    [run] = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    return run, client


def test_a_run_logs_its_settings_metrics_figures_and_files_to_mlflow(tmp_path, make_images, tiny_backbone,
                                                                       monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders", size=(40, 40))
    result = train_tiny(tmp_path, data, epochs=2, log="mlflow")
    run, client = mlflow_run(f"sqlite:///{result.run_dir / 'mlruns' / 'mlflow.db'}", result.run_dir.name)
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "tiny" and run.data.params["log"] == "mlflow"
    assert run.data.params["name"] == "none"  # an unset setting
    with open(result.run_dir / "metrics.csv", newline="") as rows:
        val_acc = [float(row["val_acc"]) for row in csv.DictReader(rows)]
    history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda metric: metric.step)
    assert [m.step for m in history] == [1, 2] and [m.value for m in history] == pytest.approx(val_acc)
    evaluation = json.loads((result.run_dir / "summary.json").read_text())["evaluation"]
    assert run.data.metrics["evaluation_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert run.data.metrics["baseline_log_loss"] == pytest.approx(evaluation["baseline"]["log_loss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"README.md", "report.html", "best.pt", "metrics.csv", "plots/confusion.png"} <= artifacts
    assert str(result.run_dir / "mlruns" / "artifacts") in run.info.artifact_uri.replace("file://", "")


def test_mlflow_uses_the_store_mlflow_tracking_uri_names(tmp_path, make_images, tiny_backbone, monkeypatch):
    store = tmp_path / "team"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(store)  # where MLflow puts that store's artifacts by default (./mlruns)
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders", size=(40, 40))
    result = train_tiny(tmp_path, data, epochs=2, log="mlflow")
    run, client = mlflow_run(f"sqlite:///{store / 'mlflow.db'}", result.run_dir.name)
    assert run.info.status == "FINISHED" and run.data.metrics["val_acc"] is not None
    assert not (result.run_dir / "mlruns").exists()


def test_an_mlflow_run_that_fails_is_ended_as_failed_and_resume_finishes_it(tmp_path, make_images, tiny_backbone,
                                                                             monkeypatch):
    from stopsign import train
    from stopsign.training import trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_report = trainer.write_report

    def broken_report(*args, **kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(trainer, "write_report", broken_report)
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders", size=(40, 40))
    with pytest.raises(RuntimeError, match="the report failed"):
        train_tiny(tmp_path, data, epochs=2, log="mlflow")
    [run_dir] = (tmp_path / "runs").iterdir()  # kept: its epochs were written
    store = f"sqlite:///{run_dir / 'mlruns' / 'mlflow.db'}"
    run, _ = mlflow_run(store, run_dir.name)
    assert run.info.status == "FAILED" and run.data.metrics["val_acc"] is not None

    monkeypatch.setattr(trainer, "write_report", write_report)
    train(resume=run_dir, progress=False)
    resumed, client = mlflow_run(store, run_dir.name)  # the same run, not a second one
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert "report.html" in {a.path for a in client.list_artifacts(run.info.run_id)}
