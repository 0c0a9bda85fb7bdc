"""Imbalanced data, the normal case (real negatives outnumber positives 4:1 to 9:1): every head and pooling beats
the class prior on generated features at 1:4 and 1:9, and a head that does not is said to be no better, loudly."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from stopsign.config import POOLINGS, ModelConfig, Settings, TrainConfig
from stopsign.data.datasets import Sample
from stopsign.reporting.metrics import Predictions, compute_metrics
from stopsign.training.fitting import fit, learned_nothing
from stopsign.training.results import FitResult
from stopsign.training.sources import CachedFeatures

WIDTH, REGIONS = 32, 5


def features(seed: int, count: int, ratio: int, pooling: str) -> tuple[np.ndarray, np.ndarray]:
    """One positive for every `ratio` negatives. A positive's sign lies in feature 0 of one of its regions; with a
    pooling other than regions the rows are the regions pooled that way, as the backbone's pass pools them."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % (ratio + 1) == 0).astype(np.int64)
    regions = np.abs(rng.normal(0, 1, (count, REGIONS, WIDTH)))  # post-ReLU activations: non-negative
    regions[labels == 1, rng.integers(0, REGIONS, int(labels.sum())), :4] += 4.0
    pooled = {"regions": regions.reshape(count, -1), "max": regions.max(1), "avg": regions.mean(1),
              "gem": (regions ** 3).mean(1) ** (1 / 3)}[pooling]
    return pooled.astype(np.float32), labels


def source_of(pooling: str, ratio: int) -> tuple[CachedFeatures, list[Sample], list[Sample]]:
    """A CachedFeatures over generated rows (200 training images, 100 validation), as train() would build it."""
    (x, y), (x_val, y_val) = features(0, 200, ratio, pooling), features(1, 100, ratio, pooling)
    train = [Sample(Path(f"/train/{i}.jpg"), int(label)) for i, label in enumerate(y)]
    val = [Sample(Path(f"/val/{i}.jpg"), int(label)) for i, label in enumerate(y_val)]
    source = CachedFeatures.__new__(CachedFeatures)
    source.train_rows, source.val_rows = {s.path: i for i, s in enumerate(train)}, {s.path: i for i, s in enumerate(val)}
    source.train_features, source.val_features = x[:, None], x_val
    source.batch_size, source.device, source._last = 32, torch.device("cpu"), {}
    return source, train, val


@pytest.mark.parametrize("ratio", [4, 9])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("head", ["logistic", "sgd"])
def test_every_head_and_pooling_beats_the_prior_on_imbalanced_data(head, pooling, ratio, monkeypatch):
    monkeypatch.setattr("stopsign.training.heads.get_spec", lambda name: type("Spec", (), {"feature_size": WIDTH}))
    source, train, val = source_of(pooling, ratio)
    config = Settings().replace(backbone="tiny", head=head, pooling=pooling)
    result = fit(source, WIDTH, 2, train, val, config.model, config.recipe, positive=1)
    truth = np.array([s.label for s in val])
    shares = np.bincount(truth) / len(truth)
    prior = log_loss(truth, np.tile(shares, (len(truth), 1)))
    metrics = compute_metrics(Predictions([str(s.path) for s in val], truth, result.val_probs, ["not_stop", "stop"]))
    beats = log_loss(truth, result.val_probs) < 0.8 * prior and metrics["balanced_accuracy"] >= 0.8
    if head == "logistic":  # the default head: every pooling learns the sign
        assert learned_nothing(result, train, config.model, config.recipe) is None and beats, (metrics["log_loss"], prior)
    else:  # the seed's ten short epochs may not get there on imbalanced data; then the run must say so
        assert beats or learned_nothing(result, train, config.model, config.recipe) or metrics["verdict"]["message"], \
            (metrics["log_loss"], prior, metrics["balanced_accuracy"])


def test_a_head_at_the_prior_is_said_to_have_learned_nothing():
    train = [Sample(Path(f"/{i}.jpg"), int(i % 10 == 0)) for i in range(100)]  # 1:9
    prior = -(0.1 * np.log(0.1) + 0.9 * np.log(0.9))
    row = {"epoch": 1, "train_loss": prior, "C_scores": None}
    stuck = FitResult([row], row, None, [], None)
    message = learned_nothing(stuck, train, ModelConfig(), TrainConfig())
    assert message.startswith("the head learned nothing") and f"{prior:.4f}" in message and "Fix:" in message
    learned = dict(row, train_loss=prior / 2)
    assert learned_nothing(FitResult([learned], learned, None, [], None), train, ModelConfig(), TrainConfig()) is None
    held_out = dict(learned, C_scores=[[0.1, prior + 0.01], [1.0, prior]])  # out of fold no better than the prior
    assert "out of fold" in learned_nothing(FitResult([held_out], held_out, None, [], None), train, ModelConfig(), TrainConfig())


def test_a_model_no_better_than_the_majority_is_said_so_in_the_cli_and_atop_the_report(
        tmp_path, make_images, tiny_backbone, monkeypatch, capsys, caplog):
    from stopsign.cli import main

    data = make_images(tmp_path / "data", {"stop": 4, "not_stop": 16}, layout="folders")
    stuck = "the head learned nothing: its training log-loss 0.5004 is not below the class prior's 0.5004"
    monkeypatch.setattr("stopsign.training.trainer.learned_nothing", lambda *args: stuck)
    monkeypatch.setattr("stopsign.training.fitting.evaluate",  # every photo at the class shares
                        lambda model, batches, criterion: (0.5, 0.8, np.tile([0.8, 0.2], (len(
                            [t for _, targets in batches for t in targets]), 1))))
    assert main(["train", str(data), "--recipe", "seed", "--backbone", "tiny", "--epochs", "1", "--workers", "0",
                 "--val-fraction", "0.25", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert [r.message for r in caplog.records if r.levelno == logging.ERROR] == [stuck]
    assert "warning: this model is no better than always answering not_stop" in out
    assert "always not_stop: 0.500" in out  # balanced accuracy leads at 1:4; the majority's is 0.5
    page = next((tmp_path / "runs").glob("*/report.html")).read_text()
    assert page.index("The head learned nothing") < page.index("Balanced accuracy")
    assert page.index("This model is no better than always answering not_stop") < page.index("Balanced accuracy")


def overlapping(ratio: int, count: int = 300) -> tuple[CachedFeatures, list[Sample]]:
    """Two overlapping Gaussian classes, one positive for every `ratio` negatives: a plain fit gives the rare class
    low probabilities."""
    rng = np.random.default_rng(0)
    labels = (np.arange(count) % (ratio + 1) == 0).astype(np.int64)
    x = rng.normal(0, 1, (count, 4)) + 0.8 * labels[:, None]
    samples = [Sample(Path(f"/train/{i}.jpg"), int(label)) for i, label in enumerate(labels)]
    source = CachedFeatures.__new__(CachedFeatures)
    source.train_rows, source.train_features = {s.path: i for i, s in enumerate(samples)}, x[:, None].astype(np.float32)
    return source, samples


def test_class_weight_auto_chooses_balanced_weights_where_the_rare_class_is_fit_poorly():
    from stopsign.training.heads import choose_c

    model = ModelConfig(pooling="max")
    source, samples = overlapping(9)
    c, scores, weight = choose_c(source, samples, model, TrainConfig(class_weight="auto"), None)
    assert weight == "balanced" and c in dict(scores)
    # a fixed weight is kept, and scored by the plain log-loss, which the larger class dominates
    plain_c, plain_scores, kept = choose_c(source, samples, model, TrainConfig(class_weight="none"), None)
    assert kept == "none" and min(loss for _, loss in plain_scores) < min(loss for _, loss in scores)


def test_class_weight_auto_is_judged_against_the_class_balanced_prior():
    """auto's held-out scores are class-balanced log-losses: at 1:9 the prior's is 1.204, not 0.325."""
    train = [Sample(Path(f"/{i}.jpg"), int(i % 10 == 0)) for i in range(100)]
    row = {"epoch": 1, "train_loss": 0.1, "C_scores": [[0.1, 0.5], [1.0, 0.6]]}
    result = FitResult([row], row, None, [], None)
    assert learned_nothing(result, train, ModelConfig(), TrainConfig(class_weight="auto")) is None
    assert "against the prior's 0.3251" in learned_nothing(result, train, ModelConfig(), TrainConfig())


def test_class_weight_auto_is_recorded_and_refused_without_the_logistic_head(tmp_path, make_images, tiny_backbone,
                                                                             capsys, caplog):
    import json

    from stopsign import train
    from stopsign.cli import main

    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 24}, size=(48, 40))
    caplog.set_level(logging.INFO)
    result = train(data, backbone="tiny", class_weight="auto", out=str(tmp_path / "runs"), progress=False,
                   num_workers=0, val_fraction=0.25)
    chosen = torch.load(result.run_dir / "best.pt", weights_only=True)["config"]
    weight = json.loads((result.run_dir / "summary.json").read_text())["parameters"]["class_weight"]
    assert chosen["class_weight"] == "auto" and weight in ("none", "balanced")
    assert f"class weight: {weight}, chosen out of fold" in caplog.text
    assert main(["train", str(data), "--backbone", "tiny", "--head", "sgd", "--class-weight", "auto",
                 "--out", str(tmp_path / "runs"), "--workers", "0"]) == 2
    assert "--class-weight auto is chosen by the logistic head's K-fold" in capsys.readouterr().err
