"""runs.py (run folders: made, never reused, cleaned after a kill) and training/records.py (the state to resume from,
the data.json and summary.json records)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from stopsign.config import Settings, TrainConfig
from stopsign.data.datasets import Sample
from stopsign.checkpoint import make_checkpoint, save_checkpoint
from stopsign.errors import StopsignError
from stopsign.runs import WRITE_PROBE, create_run_dir, remove_partial_files
from stopsign.training.records import data_record, resume_state, summary
from test_checkpoint import BACKBONE


# --- create_run_dir ---------------------------------------------------------------------------------------

def test_create_run_dir_never_reuses_a_folder(tmp_path):
    first = create_run_dir(tmp_path / "runs", "exp", "tiny")
    (first / "best.pt").write_bytes(b"keep me")
    second = create_run_dir(tmp_path / "runs", "exp", "tiny")
    third = create_run_dir(tmp_path / "runs", "exp", "tiny")
    assert (first.name, second.name, third.name) == ("exp", "exp-2", "exp-3")
    assert all(p.is_dir() for p in (first, second, third))
    assert (first / "best.pt").read_bytes() == b"keep me"
    assert list(second.iterdir()) == []  # the write probe is gone


def test_create_run_dir_without_a_name_uses_the_prefix_and_time(tmp_path):
    path = create_run_dir(tmp_path, None, "tiny")
    assert path.parent == tmp_path and path.name.startswith("tiny-")
    stamp = path.name[len("tiny-"):]
    assert len(stamp) == len("20240101-120000") and stamp[8] == "-" and stamp.replace("-", "").isdigit()


def test_create_run_dir_names_an_out_under_a_regular_file(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = blocker / "runs"
    with pytest.raises(StopsignError, match="cannot write the run folder") as caught:
        create_run_dir(out, "exp", "tiny")
    assert str(out) in str(caught.value) and "--out" in str(caught.value)


def test_create_run_dir_when_out_is_a_regular_file(tmp_path):
    out = tmp_path / "runs"
    out.write_text("x")
    with pytest.raises(StopsignError) as caught:
        create_run_dir(out, "exp", "tiny")
    assert str(out) in str(caught.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_create_run_dir_names_a_read_only_out(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(StopsignError) as caught:
            create_run_dir(out, "exp", "tiny")
        assert str(out) in str(caught.value)
    finally:
        out.chmod(0o700)


# --- the state to resume from --------------------------------------------------------------------------

def test_checkpoint_keeps_the_resume_state(tmp_path):
    resume = {"history": [{"epoch": 1}], "best": {"epoch": 1}, "optimizer": {"lr": 0.1}}
    head = {"weight": torch.zeros(2, 8), "bias": torch.zeros(2)}
    checkpoint = make_checkpoint(head, BACKBONE, ["a", "b"], {}, {"epoch": 1, "val_acc": None, "val_loss": None},
                                 resume=resume)
    save_checkpoint(tmp_path / "last.pt", checkpoint)
    assert resume_state(tmp_path) == resume
    assert resume_state(tmp_path / "elsewhere") is None


# --- records ---------------------------------------------------------------------------------------------

def test_data_record_counts_and_relative_names(tmp_path):
    root = tmp_path / "data"
    train = [Sample(root / "stop" / "s1.png", 1), Sample(root / "stop" / "s2.png", 1),
             Sample(root / "not_stop" / "n1.png", 0)]
    val = [Sample(root / "not_stop" / "n2.png", 0)]
    skipped = {str(root / "stop" / "bad.png"): "cannot decode", str(tmp_path / "outside.png"): "empty file"}
    record = data_record(root, "folders", ["not_stop", "stop"], {"train": train, "val": val}, skipped,
                         TrainConfig(val_fraction=0.25, seed=7).to_dict())
    assert record["source"] == str(root) and record["layout"] == "folders"
    assert record["class_names"] == ["not_stop", "stop"]
    assert (record["val_fraction"], record["seed"]) == (0.25, 7)
    assert record["counts"] == {"train": {"not_stop": 1, "stop": 2}, "val": {"not_stop": 1, "stop": 0}, "skipped": 2}
    assert record["split"] == [
        {"file": os.path.join("stop", "s1.png"), "label": "stop", "split": "train"},
        {"file": os.path.join("stop", "s2.png"), "label": "stop", "split": "train"},
        {"file": os.path.join("not_stop", "n1.png"), "label": "not_stop", "split": "train"},
        {"file": os.path.join("not_stop", "n2.png"), "label": "not_stop", "split": "val"},
    ]
    assert sorted(record["skipped"], key=lambda r: r["file"]) == sorted([
        {"file": os.path.join("stop", "bad.png"), "reason": "cannot decode"},
        {"file": str(tmp_path / "outside.png"), "reason": "empty file"},
    ], key=lambda r: r["file"])
    json.dumps(record)  # data.json must be JSON


def test_summary_shape():
    config = Settings().replace(head="sgd", epochs=3, lr_max=0.05, lr_base=1e-5, momentum=0.8, val_fraction=0.2,
                                scheduler="cosine").to_dict()
    history = [dict(epoch=i, val_acc=acc, train_loss=loss, val_loss=1 - acc, train_acc=0.7)
               for i, (acc, loss) in enumerate([(0.5, 0.9), (0.9, 0.6), (0.8, 0.4)], start=1)]
    result = summary(config, history, history[1], "2024-01-01T10:00:00+00:00", "2024-01-01T10:05:00+00:00",
                     share_trained=0.8)
    assert set(result) == {"started", "completed", "parameters", "accuracy", "cv_accuracy", "best_val_acc",
                           "best_epoch", "evaluation", "threshold"}
    assert result["evaluation"] is None and result["threshold"] is None  # no report's metrics or threshold given
    assert result["started"] == "2024-01-01T10:00:00+00:00" and result["completed"] == "2024-01-01T10:05:00+00:00"
    assert result["parameters"] == {
        "epochs": 3, "learningRate": 0.05, "momentum": 0.8, "percentage used training": 80,
        "learningRatescheduler": {"lr_scheduler": "cosine", "base_lr": 1e-5, "max_lr": 0.05},
    }
    # validation loss beside validation accuracy, as the seed records both per epoch
    assert result["accuracy"] == {"accuracy": [0.5, 0.9, 0.8], "loss": [0.5, pytest.approx(0.1), pytest.approx(0.2)],
                                  "measured_on": "validation"}
    assert (result["best_val_acc"], result["best_epoch"]) == (0.9, 2)


def test_summary_of_a_logistic_head_lists_its_c_and_the_evaluation_beside_its_baseline():
    config = Settings().replace(val_fraction=0.2).to_dict()  # the default head: logistic, no epochs or learning rate
    best = dict(epoch=1, val_acc=0.9, val_loss=0.3, train_acc=0.95, train_loss=0.2, C=0.1, class_weight="none")
    evaluation = {"n": 20, "accuracy": 0.9, "balanced_accuracy": 0.9, "log_loss": 0.3,
                  "baseline": {"majority_class": "stop", "accuracy": 0.5},
                  "verdict": {"lead": "accuracy", "beats_baseline": True, "message": None}}
    result = summary(config, [best], best, "s", "c", share_trained=0.8,
                     metrics=evaluation | {"confusion": [[9, 1], [1, 9]]})
    assert result["parameters"] == {"head": "logistic", "C": 0.1, "class_weight": "none",
                                    "percentage used training": 80}
    assert result["evaluation"] == evaluation  # the figures beside their baselines, not the whole report


def test_summary_of_a_cross_validated_run_says_what_it_measured():
    config = Settings().replace(epochs=2, folds=5).to_dict()
    history = [dict(epoch=i, val_acc=None, val_loss=None, train_acc=0.6 + i / 10, train_loss=1 / i) for i in (1, 2)]
    result = summary(config, history, history[1], "s", "c", share_trained=1.0, cv_accuracy=0.93)
    assert result["parameters"]["percentage used training"] == 100  # the final model trains on every image
    assert result["accuracy"] == {"accuracy": [0.7, 0.8], "loss": [1.0, 0.5], "measured_on": "training"}
    assert result["cv_accuracy"] == 0.93


def test_remove_partial_files_keeps_finished_files(tmp_path):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    finished = [run / "best.pt", run / "metrics.csv", run / "report" / "index.html", run / "notes.tmp"]
    for path in finished:
        path.write_text("done")
    partial = [run / ".last.pt.abc123.tmp", run / ".metrics.csv.x.tmp", run / "report" / ".index.html.q.tmp",
               run / WRITE_PROBE]
    for path in partial:
        path.write_text("half")
    remove_partial_files(run)
    assert all(p.read_text() == "done" for p in finished)
    assert not any(p.exists() for p in partial)
    remove_partial_files(run)  # nothing left to remove: no error
    remove_partial_files(tmp_path / "missing")


def test_a_taken_name_is_said_out_loud(tmp_path, caplog):
    create_run_dir(tmp_path, "demo", "x")
    with caplog.at_level("WARNING"):
        second = create_run_dir(tmp_path, "demo", "x")
    assert second.name == "demo-2"
    assert f"{tmp_path / 'demo'} already exists; this run goes to {second}" in caplog.text


def test_a_taken_name_under_an_out_given_as_text_gets_a_fresh_folder(tmp_path, caplog):
    out = str(tmp_path / "runs")  # as the command line and train() pass it
    first = create_run_dir(out, "demo", "x")
    with caplog.at_level("WARNING"):
        second = create_run_dir(out, "demo", "x")
    assert (first.name, second.name) == ("demo", "demo-2")
    assert f"{tmp_path / 'runs' / 'demo'} already exists; this run goes to {second}" in caplog.text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo", "demo-2"]


def test_a_run_folder_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_bytes", full_disk)
    with pytest.raises(StopsignError, match="No space left on device"):
        create_run_dir(tmp_path / "runs", "exp", "tiny")
    assert list((tmp_path / "runs").iterdir()) == []
