"""`--pooling regions`: the max of each quarter of the last feature map, of every tile, cached by the same pass
as the other poolings; a head that scores every region and gives an image its best region's logits; the
logistic fit of that head (RegionLogistic) and its fold into the checkpoint's plain weights."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from stopsign import load_classifier, train
from stopsign.config import Settings
from stopsign.data.datasets import load_data, split_samples
from stopsign.data.images import read_image
from stopsign.model.pooling import RegionHead, make_head
from stopsign.model.features import FeatureExtractor
from stopsign.model.transforms import tile_views
from stopsign.training import heads
from stopsign.training.fitting import fit
from stopsign.training.sources import CachedFeatures


@pytest.fixture
def images(tmp_path, make_images, tiny_backbone):
    data = load_data(make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders"))
    return data


def test_regions_come_from_the_same_cached_pass_and_lie_side_by_side(tmp_path, images):
    paths = [s.path for s in images.samples]
    extractor = FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)
    largest = extractor.extract(paths, pooling="max", tiles=2)
    assert largest.computed == 16 * 5
    regions = extractor.extract(paths, pooling="regions", tiles=2)
    assert regions.computed == 0  # every pooling, regions too, came from that pass
    assert extractor.width("regions", 2) == 8 * 4 * 5 and regions.features.shape == (16, 1, 8 * 4 * 5)
    assert extractor.width("max", 2) == 8 and largest.features.shape == (16, 1, 8)

    # Each tile's four quarters, tile after tile; their max is that tile's max pooling, and the max over
    # everything the max-pooled tiled feature.
    for row, path in enumerate(paths[:3]):
        image = read_image(path)
        passes = extractor.forward(torch.from_numpy(np.stack(tile_views(image, extractor.preprocessing, 2))))
        laid = regions.features[row, 0].reshape(5, 4, 8)
        np.testing.assert_allclose(laid, passes[:, 3:7].numpy(), atol=1e-5)
        np.testing.assert_allclose(laid.max(axis=1), passes[:, 1].numpy(), atol=1e-5)
        np.testing.assert_allclose(laid.max(axis=(0, 1)), largest.features[row, 0], atol=1e-5)
        np.testing.assert_allclose(extractor.image_features([image], pooling="regions", tiles=2)[0],
                                   regions.features[row, 0], atol=1e-5)


def test_the_region_head_gives_an_image_its_best_regions_logits():
    torch.manual_seed(0)
    head = make_head(8, 3, "regions", positive=1)
    assert isinstance(head, RegionHead) and set(head.state_dict()) == {"weight", "bias"}  # a plain checkpoint
    assert head.positive is None  # three classes: no positive class, each class's best region
    features = torch.randn(5, 6 * 8)  # 6 regions of 8 features
    per_region = features.reshape(5, 6, 8) @ head.weight.T + head.bias
    torch.testing.assert_close(head(features), per_region.amax(dim=1))
    assert type(make_head(8, 3, "max")) is nn.Linear

    # Two classes with a positive one: the probabilities of the region most in favour of it, whole.
    for positive in (0, 1):
        binary = make_head(8, 2, "regions", positive=positive)
        per_region = features.reshape(5, 6, 8) @ binary.weight.T + binary.bias
        odds = per_region[..., positive] - per_region[..., 1 - positive]
        expected = per_region[torch.arange(5), odds.argmax(dim=1)].softmax(1)
        torch.testing.assert_close(binary(features).softmax(1), expected)
        assert not torch.allclose(binary(features).softmax(1), per_region.amax(dim=1).softmax(1))


def multiple_instance_problem(seed: int, count: int, regions: int = 5, width: int = 6):
    """Positives carry a signal in one random region of `regions`; every other region is noise. Averaging the
    regions dilutes it by `regions`; the best region keeps it whole."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0, 1, (count, regions, width)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    features[labels == 1, rng.integers(0, regions, int(labels.sum())), 0] += 4.0
    return features.reshape(count, regions * width), labels


@pytest.mark.parametrize("positive", [1, None])
def test_region_logistic_learns_a_signal_in_any_one_region(positive):
    x, y = multiple_instance_problem(0, 200)
    x_test, y_test = multiple_instance_problem(1, 400)
    scaler = heads.RegionScaler(6).fit(x)
    model = heads.RegionLogistic(1.0, 6, positive=positive).fit(scaler.transform(x), y)
    assert model.coef_.shape == ((1, 6) if positive else (2, 6))
    accuracy = (model.predict_proba(scaler.transform(x_test)).argmax(1) == y_test).mean()
    from sklearn.linear_model import LogisticRegression

    averaged = LogisticRegression().fit(x.reshape(200, 5, 6).mean(1), y)
    baseline = averaged.score(x_test.reshape(400, 5, 6).mean(1), y_test)
    assert accuracy >= 0.9 and accuracy > baseline + 0.05, (accuracy, baseline)
    # Deterministic, and a warm start (scikit-learn's contract) continues from the last solution: a refit on the
    # same rows starts where the fit ended and stays there.
    again = heads.RegionLogistic(1.0, 6, positive=positive).fit(scaler.transform(x), y)
    np.testing.assert_array_equal(again.coef_, model.coef_)
    warm = again.set_params(warm_start=True).fit(scaler.transform(x), y)
    assert warm.converged_ and warm.n_iter_ <= model.n_iter_, (warm.n_iter_, model.n_iter_)
    np.testing.assert_allclose(warm.predict_proba(scaler.transform(x_test)),
                               model.predict_proba(scaler.transform(x_test)), atol=0.01)


def tied_at_zero_problem(seed: int, count: int, ratio: int, regions: int = 6, width: int = 8):
    """Each image's regions come in pairs (v, -v), so their average is zero in every image: at zero weights the
    gradient of the best region's score (torch spreads a tie's gradient evenly) is exactly zero, while one region
    of each positive carries the sign in feature 0. One positive for every `ratio` negatives."""
    rng = np.random.default_rng(seed)
    half = rng.normal(0, 1, (count, regions // 2, width))
    labels = (np.arange(count) % (ratio + 1) == 0).astype(int)
    half[labels == 1, 0, 0] = 4.0
    return np.concatenate([half, -half], axis=1).reshape(count, -1).astype(np.float32), labels


@pytest.mark.parametrize("ratio", [1, 4, 9])
def test_the_regions_fit_leaves_the_tie_at_zero_weights(ratio):
    x, y = tied_at_zero_problem(0, 300, ratio)
    x_test, y_test = tied_at_zero_problem(1, 300, ratio)
    scaler = heads.RegionScaler(8).fit(x)
    model = heads.RegionLogistic(1.0, 8, positive=1).fit(scaler.transform(x), y)
    probs = model.predict_proba(scaler.transform(x_test))
    from sklearn.metrics import balanced_accuracy_score, log_loss

    shares = np.bincount(y_test) / len(y_test)
    prior = log_loss(y_test, np.tile(shares, (len(y_test), 1)))
    assert model.converged_
    assert balanced_accuracy_score(y_test, probs.argmax(1)) >= 0.95
    assert log_loss(y_test, probs) < prior / 2, (log_loss(y_test, probs), prior)


def test_converged_is_false_when_the_fit_never_left_its_start(monkeypatch):
    x, y = multiple_instance_problem(0, 100)
    scaler = heads.RegionScaler(6).fit(x)
    monkeypatch.setattr(heads, "MAX_ITER", 1)  # one step: a solver cut short has not met its tolerance
    assert not heads.RegionLogistic(1.0, 6, positive=1).fit(scaler.transform(x), y).converged_


@pytest.mark.parametrize("balanced, positive", [(False, None), (True, None), (False, 1), (True, 0)])
def test_the_folded_region_head_reproduces_predict_proba(images, tmp_path, balanced, positive):
    train_samples, val = split_samples(images.samples, 0.25, 0, class_names=images.class_names)
    config = Settings().replace(backbone="tiny", num_workers=0, head="logistic", pooling="regions", tiles=2, views=2,
                                class_weight="balanced" if balanced else "none")
    extractor = FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)
    source = CachedFeatures(extractor, train_samples, val, config.model, config.recipe)
    result = fit(source, 8, 2, train_samples, val, config.model, config.recipe, positive=positive)
    row = result.best
    capped = [c for c in heads.C_GRID if c <= heads.REGIONS_MAX_C]  # a larger C overfits the best region
    assert row["C"] in capped and [c for c, _ in row["C_scores"]] == capped
    assert isinstance(result.head, RegionHead) and result.head.weight.shape == (2, 8)
    assert result.head.positive == positive

    block = source.train_features[[source.train_rows[s.path] for s in train_samples]]
    x, y = block.reshape(-1, block.shape[2]), np.repeat([s.label for s in train_samples], block.shape[1])
    scaler = heads.RegionScaler(8).fit(x)
    model = heads.RegionLogistic(row["C"], 8, "balanced" if balanced else None, positive).fit(scaler.transform(x), y)
    val_x = source.val_features[[source.val_rows[s.path] for s in val]]
    np.testing.assert_allclose(result.val_probs, model.predict_proba(scaler.transform(val_x)), atol=1e-4)


@pytest.mark.parametrize("head", ["logistic", "sgd"])
def test_a_regions_run_predicts_what_it_validated(tmp_path, images, head):
    result = train(images.root, backbone="tiny", pooling="regions", tiles=2, head=head, epochs=3,
                   out=str(tmp_path / "runs"), progress=False, num_workers=0, val_fraction=0.25)
    rows = list(csv.DictReader(open(result.run_dir / "predictions.csv")))
    predicted = {p.path: p for p in load_classifier(result.run_dir).predict([r["path"] for r in rows])}
    assert len(rows) == 4 and load_classifier(result.run_dir).head.positive == images.class_names.index("stop")
    for row in rows:
        assert abs(predicted[row["path"]].probabilities["stop"] - float(row["p_stop"])) < 1e-4


def test_a_positive_class_that_names_no_class_is_refused(tmp_path, images, capsys):
    from stopsign.cli import main
    from stopsign.errors import StopsignError

    with pytest.raises(StopsignError, match=r"--positive Stop: .* have \['not_stop', 'stop'\]"):
        train(images.root, backbone="tiny", positive="Stop", out=str(tmp_path / "runs"), progress=False,
              num_workers=0)
    assert main(["train", str(images.root), "--backbone", "tiny", "--positive", "Stop", "--out",
                 str(tmp_path / "runs"), "--quiet"]) == 2
    assert "--positive Stop" in capsys.readouterr().err and not (tmp_path / "runs").exists()
