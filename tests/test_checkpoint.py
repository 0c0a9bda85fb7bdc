"""checkpoint.py: a self-describing checkpoint made, saved and loaded back; what is not one refused, naming why;
what `stopsign info` says of it."""

from __future__ import annotations

import json

import pytest
import torch

from stopsign.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, describe, describe_settings,
                                 load_checkpoint, make_checkpoint, save_checkpoint)
from stopsign.errors import CheckpointError

BACKBONE = {"name": "tiny", "weights_sha256": "ab" * 32, "feature_size": 8,
            "preprocessing": {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}}


def a_checkpoint(**changes) -> dict:
    head = {"weight": torch.arange(16, dtype=torch.float32).reshape(2, 8), "bias": torch.tensor([0.5, -0.5])}
    row = {"epoch": 3, "val_acc": 0.75, "val_loss": 0.4}
    return make_checkpoint(head, BACKBONE, ["not_stop", "stop"], {"epochs": 3}, row) | changes


def test_checkpoint_round_trip(tmp_path):
    checkpoint = a_checkpoint()
    path = save_checkpoint(tmp_path / "run" / "best.pt", checkpoint)
    assert path == tmp_path / "run" / "best.pt"
    loaded = load_checkpoint(path)
    assert loaded["format"] == CHECKPOINT_FORMAT and loaded["version"] == CHECKPOINT_VERSION
    assert (loaded["backbone"], loaded["weights_sha256"], loaded["feature_size"]) == ("tiny", "ab" * 32, 8)
    assert loaded["preprocessing"] == BACKBONE["preprocessing"]
    assert loaded["class_names"] == ["not_stop", "stop"]
    assert (loaded["epoch"], loaded["val_acc"], loaded["val_loss"]) == (3, 0.75, 0.4)
    assert loaded["config"] == {"epochs": 3} and "resume" not in loaded
    assert torch.equal(loaded["head"]["weight"], checkpoint["head"]["weight"])
    assert torch.equal(loaded["head"]["bias"], torch.tensor([0.5, -0.5]))
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_load_checkpoint_of_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_load_checkpoint_refuses_json_renamed_pt(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "version": 1}))
    with pytest.raises(CheckpointError, match="not a stopsign checkpoint") as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("data", [
    b"", b"not a checkpoint\n",
    b"hello, not a checkpoint\n",  # torch's unpickler would read "h" as BINGET and raise KeyError
    b"epoch,lr\n1,0.1\n",  # ... and this as opcodes that raise IndexError
    b"\xff\xd8\xff\xe0 a JPEG renamed .pt",
], ids=["empty", "text", "text-starting-with-h", "csv", "jpeg"])
def test_load_checkpoint_says_what_is_not_a_checkpoint(tmp_path, data):
    path = tmp_path / "notes.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="is not a stopsign checkpoint: it is not a file written by torch.save"
                       ) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value) and "could run code" not in str(caught.value)


def test_a_run_folder_is_not_a_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint"):
        load_checkpoint(tmp_path)


def test_load_checkpoint_refuses_a_dict_without_the_format_key(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2, 8), "bias": torch.zeros(2)}, path)  # a bare state_dict
    with pytest.raises(CheckpointError, match="not a stopsign checkpoint") as caught:
        load_checkpoint(path)
    assert CHECKPOINT_FORMAT in str(caught.value)


def test_load_checkpoint_refuses_a_tensor(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a stopsign checkpoint"):
        load_checkpoint(path)


def test_load_checkpoint_names_missing_keys(tmp_path):
    checkpoint = a_checkpoint()
    del checkpoint["head"], checkpoint["class_names"]
    path = save_checkpoint(tmp_path / "x.pt", checkpoint)
    with pytest.raises(CheckpointError, match="missing class_names, head"):
        load_checkpoint(path)


def test_load_checkpoint_refuses_a_newer_version(tmp_path):
    path = save_checkpoint(tmp_path / "new.pt", a_checkpoint(version=CHECKPOINT_VERSION + 1))
    with pytest.raises(CheckpointError, match="upgrade stopsign") as caught:
        load_checkpoint(path)
    assert f"version {CHECKPOINT_VERSION + 1}" in str(caught.value)


class NotPlainData:
    pass


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(a_checkpoint(config=NotPlainData()), path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)


def test_a_refused_checkpoint_never_advises_weights_only_false(tmp_path, monkeypatch, capsys):
    from stopsign.cli import main

    path = tmp_path / "evil.pt"
    torch.save(a_checkpoint(config=NotPlainData()), path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"refused to load {path}" in err and "NotPlainData" in err and "Fix:" in err
    for advice in ("weights_only", "can still be loaded", "trust", "\x1b"):  # PyTorch's advice, and its escapes
        assert advice not in err, advice

    import pickle

    def older_torch(*args, **kwargs):  # an older PyTorch words the advice this way, on its first line
        raise pickle.UnpicklingError("Weights only load failed. Re-running with weights_only=False will likely "
                                     "succeed, but it can result in arbitrary code execution. WeightsUnpickler "
                                     "error: Unsupported class test_checkpoint.NotPlainData")

    monkeypatch.setattr(torch, "load", older_torch)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value) and "(test_checkpoint.NotPlainData)" in str(caught.value)


def test_describe_says_what_info_shows_without_raw_dicts_or_tensors():
    lines = dict(describe(a_checkpoint(resume={"history": []}), "runs/x/last.pt"))
    assert lines["model"].startswith("runs/x/last.pt (stopsign checkpoint v1, written by stopsign ")
    assert lines["backbone"] == f"tiny, 8 features, weights sha256 {'ab' * 8}…"
    assert lines["preprocessing"] == "32×32, mean 0.5 0.5 0.5, std 0.25 0.25 0.25"
    assert lines["epoch"] == "3 (validation accuracy 0.750, loss 0.4000)"
    assert lines["trained on"] == "not recorded (before stopsign 0.2)" and lines["head parameters"] == "18"
    assert lines["resumable"] == "yes: the training state after epoch 3"
    assert "resumable" not in dict(describe(a_checkpoint(), "best.pt"))


def test_info_lists_only_the_settings_the_head_read():
    recorded = {"head": "logistic", "pooling": "regions", "epochs": 10, "lr_max": 0.01, "scheduler": "triangular2"}
    logistic = dict(describe_settings(a_checkpoint(config=recorded)))
    assert logistic == {"head": "logistic", "pooling": "regions"}  # no epochs or learning rates it never used
    sgd = dict(describe_settings(a_checkpoint(config=recorded | {"head": "sgd"})))
    assert sgd["epochs"] == "10" and sgd["lr_max"] == "0.01" and sgd["scheduler"] == "triangular2"
