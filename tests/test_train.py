"""train(): the run folder, the recipe, freezing, determinism, and the fast and slow paths agreeing."""

import csv
import json
import os
import re
import shutil
from datetime import datetime

import numpy as np
import pytest
import torch
from conftest import train_tiny

from stopsign import TrainConfig, train
from stopsign.errors import DataError, StopsignError
from stopsign.model.backbones import load_backbone
from stopsign.model.pooling import FrozenBackboneClassifier
from stopsign.checkpoint import load_checkpoint
from stopsign.training.fitting import is_better, make_optimizer, train_one_epoch


run = train_tiny


@pytest.fixture
def data(tmp_path, make_images):
    return make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, layout="cvstudio")


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_run_folder_holds_every_file(tmp_path, data, tiny_backbone):
    result = run(tmp_path, data)
    names = {p.name for p in result.run_dir.iterdir()} | {f"plots/{p.name}" for p in (result.run_dir / "plots").iterdir()}
    for name in ["config.json", "data.json", "metrics.csv", "summary.json", "best.pt", "last.pt",
                 "predictions.csv", "metrics.json", "report.html", "plots/curves.png", "plots/samples.jpg",
                 "plots/confusion.png"]:
        assert name in names
    rows = read_metrics(result.run_dir)
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert datetime.fromisoformat(summary["completed"]).utcoffset() is not None
    assert summary["parameters"]["percentage used training"] == 75
    assert summary["parameters"]["learningRatescheduler"] == {"lr_scheduler": "triangular2", "base_lr": 1e-6,
                                                              "max_lr": 1e-2}
    assert summary["accuracy"]["accuracy"] == [float(r["val_acc"]) for r in rows]
    assert summary["best_val_acc"] == result.best_val_acc == max(float(r["val_acc"]) for r in rows)

    split = json.loads((result.run_dir / "data.json").read_text())["split"]
    assert len(split) == 24 and sum(row["split"] == "val" for row in split) == 6
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["backbone"] == "tiny" and len(config["backbone_weights_sha256"]) == 64
    assert "torch" in config["versions"]


def test_checkpoint_describes_itself(tmp_path, data, tiny_backbone):
    result = run(tmp_path, data)
    checkpoint = torch.load(result.run_dir / "best.pt", weights_only=True)
    assert checkpoint["backbone"] == "tiny"
    assert checkpoint["class_names"] == ["not_stop", "stop"]
    assert checkpoint["preprocessing"]["size"] == 32
    assert checkpoint["epoch"] == result.best_epoch
    assert checkpoint["head"]["weight"].shape == (2, 8)
    assert load_checkpoint(result.run_dir / "last.pt")["epoch"] == 4


def test_same_seed_same_metrics_other_seed_other_split(tmp_path, data, tiny_backbone):
    first, second = run(tmp_path, data, seed=3), run(tmp_path, data, seed=3)
    other = run(tmp_path, data, seed=4)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(read_metrics(first.run_dir)) == strip(read_metrics(second.run_dir))
    assert first.run_dir != second.run_dir  # never overwrites
    val = lambda r: {row["file"] for row in json.loads((r.run_dir / "data.json").read_text())["split"]
                     if row["split"] == "val"}
    assert val(first) == val(second) != val(other)


def test_recipe_sgd_momentum_and_triangular2_per_epoch(tmp_path, data, tiny_backbone):
    result = run(tmp_path, data, epochs=12)
    lrs = [row["lr"] for row in result.history]
    # one cycle rises over 5 epochs and falls over 5; the next has half the height (triangular2)
    peak = 1e-2 - 1e-6
    expected = [1e-6 + peak * (1 - abs(e / 5 - 1)) for e in range(10)] + [1e-6 + peak / 2 * e / 5 for e in range(2)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    optimizer, scheduler = make_optimizer(torch.nn.Linear(8, 2), TrainConfig())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert type(scheduler).__name__ == "CyclicLR"


def test_only_the_new_layer_trains_and_batchnorm_stays(tiny_backbone):
    backbone = load_backbone("tiny")
    head = torch.nn.Linear(backbone.feature_size, 2)
    model = FrozenBackboneClassifier(backbone.model, head).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 8 * 2 + 2
    assert not backbone.model.training  # eval mode survives model.train()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    head_before = head.weight.detach().clone()
    optimizer, _ = make_optimizer(head, TrainConfig(lr_max=0.1))
    batches = [(torch.randn(8, 3, 32, 32) * 3 + 1, torch.randint(0, 2, (8,))) for _ in range(3)]
    train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer)
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert not torch.equal(head_before, head.weight)


def test_fast_and_slow_paths_train_the_same_head(tmp_path, data, tiny_backbone):
    fast = run(tmp_path, data, augment=False, epochs=6)
    slow = run(tmp_path, data, augment=False, epochs=6, cache=False)
    for a, b in zip(fast.history, slow.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["train_acc"] == b["train_acc"] and a["val_acc"] == b["val_acc"]
    fast_head = torch.load(fast.run_dir / "best.pt", weights_only=True)["head"]["weight"]
    slow_head = torch.load(slow.run_dir / "best.pt", weights_only=True)["head"]["weight"]
    assert torch.allclose(fast_head, slow_head, atol=1e-4)


def test_bad_image_is_skipped_and_counted(tmp_path, data, tiny_backbone):
    broken = sorted((data / "images").iterdir())[0]
    broken.write_bytes(b"this is not a picture")
    result = run(tmp_path, data)
    record = json.loads((result.run_dir / "data.json").read_text())
    assert record["counts"]["skipped"] == 1
    assert record["skipped"][0]["file"].endswith(broken.name)
    assert all(not row["file"].endswith(broken.name) for row in record["split"])


def test_best_epoch_prefers_accuracy_then_lower_loss():
    best = {"val_acc": 0.8, "val_loss": 0.5}
    assert is_better({"val_acc": 0.9, "val_loss": 0.9}, best)
    assert is_better({"val_acc": 0.8, "val_loss": 0.4}, best)
    assert not is_better({"val_acc": 0.8, "val_loss": 0.6}, best)


def test_separate_validation_set(tmp_path, data, make_images, tiny_backbone):
    val = make_images(tmp_path / "val", {"stop": 3, "not_stop": 3}, layout="folders")
    result = run(tmp_path, data, val=str(val))
    split = json.loads((result.run_dir / "data.json").read_text())["split"]
    assert sum(row["split"] == "val" for row in split) == 6
    assert sum(row["split"] == "train" for row in split) == 24


def test_cross_validation_scores_every_image_once_then_trains_on_all(tmp_path, data, tiny_backbone):
    result = run(tmp_path, data, folds=4)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["n"] == 24  # out-of-fold: every image validated exactly once
    assert metrics["cv"]["folds"] == 4 and len(metrics["cv"]["per_fold"]) == 4
    accuracies = [fold["accuracy"] for fold in metrics["cv"]["per_fold"]]
    assert metrics["cv"]["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert metrics["cv"]["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert sum(map(sum, metrics["cv"]["oof_confusion"])) == 24
    split = json.loads((result.run_dir / "data.json").read_text())["split"]
    assert len(split) == 24 and {row["split"] for row in split} == {"train"}  # the final model saw all
    assert load_checkpoint(result.run_dir / "best.pt")["epoch"] == 4  # no held-out data to pick an epoch on


def test_cross_validation_without_the_cache(tmp_path, data, tiny_backbone):
    fast = run(tmp_path, data, folds=3, augment=False)
    slow = run(tmp_path, data, folds=3, augment=False, cache=False)
    read = lambda r: json.loads((r.run_dir / "metrics.json").read_text())["cv"]["mean"]["accuracy"]
    assert read(slow) == pytest.approx(read(fast))


def test_unusable_data_leaves_no_run_folder(tmp_path, make_images, tiny_backbone):
    lonely = make_images(tmp_path / "lonely", {"stop": 3}, layout="folders")
    with pytest.raises(DataError, match="class"):
        run(tmp_path, lonely)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ctrl_c_while_computing_features_says_how_to_resume(tmp_path, data, tiny_backbone, monkeypatch):
    from stopsign.model.features import FeatureExtractor
    from stopsign.errors import Interrupted

    extract = FeatureExtractor.extract

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureExtractor, "extract", interrupted)
    with pytest.raises(Interrupted, match="--resume") as error:
        run(tmp_path, data, name="stopped")
    assert str(tmp_path / "runs" / "stopped") in str(error.value)
    monkeypatch.setattr(FeatureExtractor, "extract", extract)
    resumed = train(data, resume=tmp_path / "runs" / "stopped", progress=False)
    assert len(resumed.history) == 4 and (resumed.run_dir / "best.pt").is_file()


# --- duplicate groups stay on one side of whatever is drawn ------------------------------------------------

def with_copies(make_images, root):
    """Class folders of 12 + 12 images in which 3 stop photos and 2 not_stop photos have a renamed copy."""
    data = make_images(root, {"stop": 12, "not_stop": 12}, layout="folders")
    for name in ("stop-0", "stop-1", "stop-2"):
        shutil.copy(data / "stop" / f"{name}.png", data / "stop" / f"copy-of-{name}.png")
    for name in ("not_stop-0", "not_stop-1"):
        shutil.copy(data / "not_stop" / f"{name}.png", data / "not_stop" / f"copy-of-{name}.png")
    return data


def group_sides(run_dir, key):
    rows = json.loads((run_dir / "data.json").read_text())["split"]
    sides = {}
    for row in rows:
        if "group" in row:
            sides.setdefault(row["group"], set()).add(row[key])
    return sides


def test_the_split_keeps_each_duplicate_group_on_one_side(tmp_path, make_images, tiny_backbone):
    data = with_copies(make_images, tmp_path / "data")
    for seed in range(4):
        result = train_tiny(tmp_path, data, epochs=1, seed=seed, val_fraction=0.4, name=f"s{seed}")
        sides = group_sides(result.run_dir, "split")
        assert len(sides) == 5 and all(len(side) == 1 for side in sides.values())
        assert "Duplicate groups spanning more than one split" not in (result.run_dir / "report.html").read_text()


def test_folds_keep_each_duplicate_group_in_one_fold_and_say_so(tmp_path, make_images, tiny_backbone):
    data = with_copies(make_images, tmp_path / "data")
    result = train_tiny(tmp_path, data, epochs=2, folds=3)
    sides = group_sides(result.run_dir, "fold")
    assert len(sides) == 5 and all(len(side) == 1 for side in sides.values())
    folds = {row["fold"] for row in json.loads((result.run_dir / "data.json").read_text())["split"]}
    assert folds == {1, 2, 3}
    assert "Duplicate groups spanning more than one split" not in (result.run_dir / "report.html").read_text()


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(tmp_path, make_images, tiny_backbone, monkeypatch):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")

    def broken(*args, **kwargs):
        raise StopsignError("the features could not be computed")

    monkeypatch.setattr("stopsign.training.trainer.make_source", broken)
    with pytest.raises(StopsignError, match="could not be computed"):
        train_tiny(tmp_path, data, name="doomed")
    assert not (tmp_path / "runs" / "doomed").exists()


def test_a_test_split_is_scored_once_with_the_kept_model(tmp_path, make_images, tiny_backbone, capsys):
    from stopsign.cli import main

    data = make_images(tmp_path / "data", {"train": {"stop": 8, "not_stop": 8}, "val": {"stop": 3, "not_stop": 3},
                                           "test": {"stop": 4, "not_stop": 4}}, layout="splits")
    result = train_tiny(tmp_path, data, epochs=3)
    test = json.loads((result.run_dir / "metrics.json").read_text())["test"]
    assert test["n"] == 8 and test["training_copies"]["exact"] == 0
    assert "Test split, scored once with the kept model: accuracy" in (result.run_dir / "report.html").read_text()
    assert main(["-q", "train", str(data), "--backbone", "tiny", "--epochs", "3", "--workers", "0",
                 "--out", str(tmp_path / "runs")]) == 0
    assert re.search(r"^test accuracy \d\.\d{3} \(95% CI .*, n=8\); always \w+: .* the prior's .*: scored once with the kept model",
                     capsys.readouterr().out, re.M)


def test_run_files_follow_the_umask(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 5, "not_stop": 5}, layout="folders")
    previous = os.umask(0o022)
    try:
        result = train_tiny(tmp_path, data, epochs=1)
    finally:
        os.umask(previous)
    for name in ("config.json", "data.json", "metrics.csv", "best.pt", "last.pt", "summary.json", "report.html",
                 "plots/confusion.png"):
        assert (result.run_dir / name).stat().st_mode & 0o777 == 0o644, name


def test_synthetic_negatives_only_ever_train(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    for folds in (0, 3):
        result = train_tiny(tmp_path, data, epochs=2, synthetic_negatives=5, folds=folds, name=f"synthetic{folds}")
        rows = json.loads((result.run_dir / "data.json").read_text())["split"]
        rendered = [row for row in rows if row.get("synthetic")]
        assert len(rendered) == 5 and {(row["split"], row["label"]) for row in rendered} == {("train", "not_stop")}
        assert all("fold" not in row for row in rendered)
        predicted = [row["path"] for row in csv.DictReader(open(result.run_dir / "predictions.csv"))]
        assert len(predicted) == (12 if folds else 4) and not any("negative-" in path for path in predicted)
        assert "5 rendered scenes with other signs and red things, in the training split only" in \
            (result.run_dir / "report.html").read_text()
    with pytest.raises(StopsignError, match="none is called stop. Fix: name the positive class with --positive"):
        train_tiny(tmp_path, make_images(tmp_path / "ab", {"a": 3, "b": 3}, layout="folders"), synthetic_negatives=2)
    assert train_tiny(tmp_path, make_images(tmp_path / "ab2", {"a": 3, "b": 3}, layout="folders"), epochs=1,
                      synthetic_negatives=2, positive="a").run_dir.is_dir()


def test_resume_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    from stopsign.cli import main

    missing = tmp_path / "runs" / "typo"
    assert main(["-q", "train", "--resume", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {missing}: the folder does not exist" in err and "config.json" not in err
    assert not missing.exists()


def test_resume_of_a_finished_run_is_refused_and_changes_nothing(tmp_path, data, tiny_backbone, capsys):
    from stopsign.cli import main

    run_dir = run(tmp_path, data, epochs=2, name="done").run_dir
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in run_dir.iterdir() if path.is_file()}
    assert main(["-q", "train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {run_dir}: that run finished" in err
    assert "start a new run without --resume" in err and f"stopsign evaluate {run_dir} DATA" in err
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes())
            for path in run_dir.iterdir() if path.is_file()} == before


def test_the_data_line_counts_what_was_trained_on(tmp_path, data, tiny_backbone, caplog):
    for broken in sorted((data / "images").iterdir())[:4]:
        broken.write_bytes(b"this is not a picture")
    with caplog.at_level("INFO", logger="stopsign"):
        result = run(tmp_path, data, epochs=1)
    line = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("CV Studio"))
    counts = json.loads((result.run_dir / "data.json").read_text())["counts"]
    trained, validated = sum(counts["train"].values()), sum(counts["val"].values())
    assert trained + validated == 20 and counts["skipped"] == 4
    assert line == (f"CV Studio export: 20 images, not_stop {counts['train']['not_stop'] + counts['val']['not_stop']}"
                    f" / stop {counts['train']['stop'] + counts['val']['stop']}; split {trained}/{validated}; "
                    "4 unreadable images skipped")


def test_a_run_whose_last_upload_failed_still_resumes_to_finish_it(tmp_path, data, tiny_backbone, monkeypatch):
    from stopsign.training import trainer

    run_dir = run(tmp_path, data, epochs=1, name="cut").run_dir  # whole here: summary.json written locally
    url = "s3://bucket/runs/cut"
    monkeypatch.setattr(trainer, "exists", lambda path: False)  # ... but its upload never reached the bucket
    assert trainer.resolve_settings({}, run_dir, url=url)[1] == run_dir
    monkeypatch.setattr(trainer, "exists", lambda path: path == f"{url}/summary.json")  # uploaded: finished
    with pytest.raises(StopsignError, match=f"cannot resume {url}: that run finished"):
        trainer.resolve_settings({}, run_dir, url=url)


def test_training_does_not_load_the_scene_renderer():
    """The demo's 500-line scene renderer is imported only by `stopsign demo` and --synthetic-negatives."""
    import subprocess
    import sys

    code = "import stopsign.training.trainer, sys; print('stopsign.data.demo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_checkpoint_stores_its_model_and_one_written_before_loads_with_the_head_it_had(tiny_checkpoint, tmp_path):
    """checkpoint["model"]: the model's own arguments, its head's included. A checkpoint without them (before the
    settings were split; before 0.2 its settings named no pooling either) rebuilds the seed's head from its settings."""
    from stopsign import load_classifier

    checkpoint, data = tiny_checkpoint
    state = load_checkpoint(checkpoint)
    assert state["model"] == {
        "backbone": "tiny", "weights": None, "image_size": None, "pooling": "avg", "tiles": 1, "tile_pixels": 0,
        "head": "sgd", "positive": None, "num_features": 8, "num_classes": 2, "positive_index": 1}
    assert state["config"]["pooling"] == "avg" and state["config"]["epochs"] == 6  # the flat settings, as before
    old = tmp_path / "old.pt"
    torch.save({key: value for key, value in state.items() if key != "model"} | {"config": {}}, old)
    before, now = load_classifier(old, cache=False), load_classifier(checkpoint, cache=False)
    assert (before.pooling, before.tiles) == (now.pooling, now.tiles) == ("avg", 1)
    photos = sorted((data / "stop").iterdir())[:3]
    np.testing.assert_allclose(before.probabilities(photos)[1], now.probabilities(photos)[1])
