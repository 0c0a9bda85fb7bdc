"""`train --log tensorboard` (training/tracking.py): the run's figures in RUN/tensorboard's event files."""

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


def test_without_tensorboard_the_flag_stops_before_any_work(tmp_path, make_images, monkeypatch, capsys):
    data = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    out = tmp_path / "runs"
    assert main(["-q", "train", str(data), "--log", "tensorboard", "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert "pip install 'stopsign[tensorboard]'" in message and "\n" not in message
    assert not out.exists()
