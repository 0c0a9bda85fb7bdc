"""training/crossval.py: K folds score every image exactly once, out of fold, with the fold's last epoch."""

from __future__ import annotations

import numpy as np
import pytest

from stopsign.config import Settings
from stopsign.data.datasets import load_data
from stopsign.model.features import FeatureExtractor
from stopsign.reporting.metrics import Predictions
from stopsign.training import crossval
from stopsign.training.crossval import cross_validate, held_out_predictions
from stopsign.training.sources import CachedFeatures


@pytest.fixture
def data(tmp_path, make_images, tiny_backbone):
    return load_data(make_images(tmp_path / "data", {"not_stop": 6, "stop": 6}, layout="folders"))


def setup(tmp_path, data, folds=2, **changes):
    config = Settings().replace(backbone="tiny", folds=folds, epochs=3, num_workers=0, batch_size=4).replace(**changes)
    extractor = FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)
    return CachedFeatures(extractor, data.samples, data.samples, config.model, config.recipe), config  # as trainer.make_source does


@pytest.fixture
def fits(monkeypatch):
    """Every fit() the K-fold loop makes: (train paths, val paths, keep)."""
    calls = []
    real = crossval.fit

    def spy(source, num_features, num_classes, train, val, model, recipe, **kwargs):
        calls.append(({str(s.path) for s in train}, {str(s.path) for s in val}, kwargs.get("keep")))
        return real(source, num_features, num_classes, train, val, model, recipe, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    return calls


@pytest.mark.parametrize("folds", [2, 3])
def test_held_out_predictions_cover_every_sample_once(tmp_path, data, fits, folds):
    source, config = setup(tmp_path, data, folds)
    predictions = list(held_out_predictions(source, data.samples, data.class_names, 8, config.model, config.recipe))
    assert len(predictions) == folds and all(isinstance(p, Predictions) for p in predictions)
    everything = [path for fold in predictions for path in fold.paths]
    assert sorted(everything) == sorted(str(s.path) for s in data.samples)  # each exactly once
    label_of = {str(s.path): s.label for s in data.samples}
    for fold in predictions:
        assert len(fold.paths) == 12 // folds
        assert list(fold.y_true) == [label_of[p] for p in fold.paths]
        assert sorted(fold.y_true.tolist()) == [0] * (6 // folds) + [1] * (6 // folds)  # stratified
        assert fold.probs.shape == (12 // folds, 2)
        np.testing.assert_allclose(fold.probs.sum(axis=1), 1.0, atol=1e-6)
        assert fold.class_names == ["not_stop", "stop"]
    assert len(fits) == folds
    for (train, val, keep), fold in zip(fits, predictions):
        assert keep == "last"  # never choose the epoch on the held-out fold
        assert not train & val and len(train | val) == 12
        assert val == set(fold.paths)


def test_cross_validate_summarises_the_folds(tmp_path, data):
    source, config = setup(tmp_path, data, 2)
    result = cross_validate(source, data.samples, data.class_names, 8, config.model, config.recipe)
    assert set(result) == {"folds", "per_fold", "mean", "std", "oof_confusion", "oof"}
    assert result["folds"] == 2 and len(result["per_fold"]) == 2
    for fold in result["per_fold"]:
        assert fold["n"] == 6 and 0 <= fold["accuracy"] <= 1
        assert set(fold) == {"accuracy", "log_loss", "macro_f1", "roc_auc", "ece", "n"}
    for key in ("accuracy", "log_loss"):
        values = [fold[key] for fold in result["per_fold"]]
        assert result["mean"][key] == pytest.approx(np.mean(values))
        assert result["std"][key] == pytest.approx(np.std(values, ddof=1))
    assert result["std"]["log_loss"] > 0  # two different folds

    oof = result["oof"]
    assert isinstance(oof, Predictions) and oof.class_names == data.class_names
    assert sorted(oof.paths) == sorted(str(s.path) for s in data.samples)
    label_of = {str(s.path): s.label for s in data.samples}
    assert list(oof.y_true) == [label_of[p] for p in oof.paths]
    assert oof.probs.shape == (12, 2)
    confusion = np.array(result["oof_confusion"])
    assert confusion.shape == (2, 2) and confusion.sum() == 12
    assert confusion.sum(axis=1).tolist() == [6, 6]
    assert np.trace(confusion) == round(np.mean([f["accuracy"] for f in result["per_fold"]]) * 12)


def test_cross_validate_is_deterministic(tmp_path, data):
    source, config = setup(tmp_path, data, 2)
    first = cross_validate(source, data.samples, data.class_names, 8, config.model, config.recipe)
    second = cross_validate(source, data.samples, data.class_names, 8, config.model, config.recipe)
    assert first["oof"].paths == second["oof"].paths
    np.testing.assert_array_equal(first["oof"].probs, second["oof"].probs)
    assert first["per_fold"] == second["per_fold"]


def test_another_seed_draws_other_folds(tmp_path, data, fits):
    source, config = setup(tmp_path, data, 2)
    list(held_out_predictions(source, data.samples, data.class_names, 8, config.model, config.recipe))
    list(held_out_predictions(source, data.samples, data.class_names, 8, config.model, config.recipe.replace(seed=1)))
    assert {frozenset(v) for _, v, _ in fits[:2]} != {frozenset(v) for _, v, _ in fits[2:]}


def test_the_folds_show_a_bar_only_when_asked(tmp_path, data, capsys):
    source, config = setup(tmp_path, data, 2)
    capsys.readouterr()  # whatever building the features wrote
    cross_validate(source, data.samples, data.class_names, 8, config.model, config.recipe, progress=True)
    shown = capsys.readouterr().err
    assert "folds:" in shown and "/2 [" in shown  # tqdm's "folds:   0%|   | 0/2 [..." line
    cross_validate(source, data.samples, data.class_names, 8, config.model, config.recipe)  # the default, as tune's trials call it
    assert capsys.readouterr().err == ""
