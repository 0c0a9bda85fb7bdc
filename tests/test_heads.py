"""training/heads.py (`--head logistic`) and class weights (`--class-weight balanced`): the folded head is
sklearn's model, C is chosen on the training split alone, balanced weights reach the loss, and "none" is the
seed recipe unchanged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from conftest import train_tiny
from stopsign.config import Settings
from stopsign.data.datasets import Sample, load_data, split_samples
from stopsign.errors import StopsignError
from stopsign.model.features import FeatureExtractor
from stopsign.training import fitting, heads
from stopsign.training.fitting import fit
from stopsign.checkpoint import load_checkpoint
from stopsign.training.sources import CachedFeatures, LiveImages


def tiny_config(**changes) -> Settings:
    return Settings().replace(backbone="tiny", num_workers=0, epochs=3, batch_size=4, val_fraction=0.25,
                              head="logistic", tiles=1, pooling="max").replace(**changes)


@pytest.fixture
def extractor(tmp_path, tiny_backbone):
    return FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)


@pytest.fixture
def three_classes(tmp_path, make_images, tiny_backbone):
    data = load_data(make_images(tmp_path / "data", {"a": 8, "b": 8, "c": 8}, layout="folders"))
    return data, *split_samples(data.samples, 0.25, 0, class_names=data.class_names)


def raw_rows(source: CachedFeatures, samples) -> tuple[np.ndarray, np.ndarray]:
    """Every cached view of every sample: what the logistic head trains on."""
    block = source.train_features[[source.train_rows[s.path] for s in samples]]
    return block.reshape(-1, block.shape[2]).astype(np.float64), np.repeat([s.label for s in samples], block.shape[1])


# --- the folded head is sklearn's model ----------------------------------------------------------------

@pytest.mark.parametrize("counts, balanced", [({"a": 8, "b": 8, "c": 8}, False), ({"a": 10, "b": 6}, True)])
def test_the_folded_head_reproduces_predict_proba(tmp_path, make_images, extractor, counts, balanced):
    data = load_data(make_images(tmp_path / "data", counts, layout="folders"))
    train, val = split_samples(data.samples, 0.25, 0, class_names=data.class_names)
    config = tiny_config(views=3, class_weight="balanced" if balanced else "none")
    source = CachedFeatures(extractor, train, val, config.model, config.recipe)
    result = fit(source, 8, len(counts), train, val, config.model, config.recipe)

    row = result.best
    assert result.history == [row] and row["epoch"] == 1 and row["lr"] is None
    assert row["C"] in heads.C_GRID and [c for c, _ in row["C_scores"]] == list(heads.C_GRID)
    assert isinstance(result.head, nn.Linear) and result.head.weight.shape == (len(counts), 8)
    assert [s.path for s in result.val_samples] == [s.path for s in val]

    x, y = raw_rows(source, train)
    assert len(x) == 3 * len(train)  # each view is a row
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=row["C"], max_iter=2000, class_weight="balanced" if balanced else None)
    model.fit(scaler.transform(x), y)
    val_x = source.val_features[[source.val_rows[s.path] for s in val]].astype(np.float64)
    expected = model.predict_proba(scaler.transform(val_x))
    np.testing.assert_allclose(result.val_probs, expected, atol=1e-5)
    with torch.no_grad():  # the head takes raw features: the scaler is in its weights
        on_train = result.head(torch.from_numpy(x.astype(np.float32))).softmax(1).numpy()
    np.testing.assert_allclose(on_train, model.predict_proba(scaler.transform(x)), atol=1e-5)
    assert row["val_acc"] == pytest.approx(np.mean(expected.argmax(1) == [s.label for s in val]))
    assert row["train_acc"] == pytest.approx(np.mean(on_train.argmax(1) == y))


def test_c_is_chosen_by_held_out_log_loss_smaller_c_on_ties(extractor, three_classes, monkeypatch):
    _, train, val = three_classes
    config = tiny_config()
    source = CachedFeatures(extractor, train, val, config.model, config.recipe)
    monkeypatch.setattr(heads, "C_GRID", (0.01, 0.1, 1.0))
    scores = {0.01: 2.0, 0.1: 1.0, 1.0: 1.0}  # 0.1 and 1 tie: the smaller wins
    monkeypatch.setattr(heads, "held_out_log_loss", lambda classifier, x, y, balanced=False: scores[current["C"]])
    current = {}
    fit_quietly = heads.fit_quietly

    def spy(model, features, labels):
        current["C"] = model.get_params().get("C", model.get_params().get("classifier__C"))
        return fit_quietly(model, features, labels)

    monkeypatch.setattr(heads, "fit_quietly", spy)
    result = fit(source, 8, 3, train, val, config.model, config.recipe)
    assert result.best["C"] == 0.1 and result.best["C_scores"] == [[0.01, 2.0], [0.1, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("pooling", ["max", "regions"])
def test_c_is_chosen_without_the_validation_images(extractor, three_classes, monkeypatch, pooling):
    _, train, val = three_classes
    config = tiny_config(views=2, pooling=pooling)
    source = CachedFeatures(extractor, train, val, config.model, config.recipe)
    seen = []  # every row count the solver is given: never one that includes validation features
    fit_quietly = heads.fit_quietly
    monkeypatch.setattr(heads, "fit_quietly", lambda model, x, y: seen.append(len(x)) or fit_quietly(model, x, y))
    first = fit(source, 8, 3, train, val, config.model, config.recipe)
    assert max(seen) == 2 * len(train)

    changed = CachedFeatures(extractor, train, val, config.model, config.recipe)  # other validation labels and features
    changed.val_features = np.random.default_rng(1).normal(size=changed.val_features.shape).astype(np.float32)
    relabelled = [Sample(s.path, (s.label + 1) % 3) for s in val]
    second = fit(changed, 8, 3, train, relabelled, config.model, config.recipe)
    assert second.best["C"] == first.best["C"] and second.best["C_scores"] == first.best["C_scores"]
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, second.head.state_dict()[key]), key
    assert second.best["val_loss"] != first.best["val_loss"]  # the validation images did change


@pytest.mark.parametrize("pooling", ["max", "regions"])
def test_each_folds_scores_are_its_own_images_views(extractor, three_classes, pooling):
    """choose_c pools every training row once and each fold takes its images' rows: the scores are those of a
    logistic regression fit on each fold's own views (max-pooled over the regions), scored on its held-out part."""
    _, train, val = three_classes
    config = tiny_config(views=2, pooling=pooling)
    source = CachedFeatures(extractor, train, val, config.model, config.recipe)
    chosen, scores, _ = heads.choose_c(source, train, config.model, config.recipe, None)
    folds = heads.kfold_samples(train, 5, config.recipe.seed)
    for c, score in [(c, score) for c, score in scores if c <= 1]:  # above, nearly separable: slow to converge
        losses = []
        for fit_on, held_out in folds:
            (x, y), (x_held, y_held) = (heads.pooled_rows(heads.training_rows(source, part), config.model)
                                        for part in (fit_on, held_out))
            scaler = StandardScaler().fit(x)
            model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), y)
            losses.append(heads.held_out_log_loss(model, scaler.transform(x_held), y_held))
        assert score == pytest.approx(np.mean(losses), rel=0.01), c  # warm starts stop a hair elsewhere


def test_the_folds_keep_duplicate_groups_and_an_images_views_together(extractor, three_classes, monkeypatch):
    _, train, val = three_classes
    config = tiny_config(views=2)
    source = CachedFeatures(extractor, train, val, config.model, config.recipe)
    groups = {str(train[0].path): 7, str(train[1].path): 7, str(val[0].path): 9}
    asked = []
    kfold = heads.kfold_samples
    monkeypatch.setattr(heads, "kfold_samples", lambda *a, **k: asked.append((a, k)) or kfold(*a, **k))
    fit(source, 8, 3, train, val, config.model, config.recipe, groups=groups)
    (samples, k, seed), keywords = asked[0]
    assert samples == train and k == 5 and seed == config.recipe.seed and keywords["groups"] == groups
    for _, held_out in kfold(samples, k, seed, groups=groups):
        sides = {s.path for s in held_out}
        assert (train[0].path in sides) == (train[1].path in sides)


def test_on_epoch_gets_one_row_and_a_resumable_state(extractor, three_classes):
    _, train, val = three_classes
    config = tiny_config()
    calls = []
    result = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 3, train, val, config.model, config.recipe,
                 on_epoch=lambda row, state: calls.append((row, state)))
    (row, state), = calls
    assert row is result.best and state["history"] == [row] and state["best"] is row
    assert torch.equal(state["best_head"]["weight"], result.head.weight)
    assert state["optimizer"] == {} and state["scheduler"] == {}


def test_on_chosen_gets_the_c_and_class_weight_before_the_final_fit(extractor, three_classes, monkeypatch):
    _, train, val = three_classes
    config = tiny_config(class_weight="auto")
    events, fit_model = [], heads.fit_model
    monkeypatch.setattr(heads, "fit_model", lambda *args, **kwargs: events.append("final fit") or fit_model(*args,
                                                                                                          **kwargs))
    result = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 3, train, val, config.model,
                 config.recipe, on_chosen=events.append)
    assert events == [{"C": result.best["C"], "class_weight": result.best["class_weight"]}, "final fit"]


def test_live_images_are_refused_naming_the_fix(extractor, three_classes):
    _, train, val = three_classes
    config = tiny_config(cache=False)
    with pytest.raises(StopsignError, match="--head logistic.*--no-cache"):
        fit(LiveImages(extractor, train + val, *config), 8, 3, train, val, config.model, config.recipe)


# --- class weights of the SGD head ---------------------------------------------------------------------

def test_balanced_weights_reach_the_sgd_loss(tmp_path, make_images, extractor, monkeypatch):
    data = load_data(make_images(tmp_path / "data", {"a": 9, "b": 3}, layout="folders"))
    train = data.samples
    built = []
    original = nn.CrossEntropyLoss

    def spy(*args, **kwargs):
        built.append(kwargs.get("weight"))
        return original(*args, **kwargs)

    monkeypatch.setattr(fitting.nn, "CrossEntropyLoss", spy)
    config = tiny_config(head="sgd", class_weight="balanced")
    fit(CachedFeatures(extractor, train, [], config.model, config.recipe), 8, 2, train, [], config.model, config.recipe)
    # n / (classes * count): 12 / (2 * 9) and 12 / (2 * 3)
    assert torch.allclose(built[0], torch.tensor([12 / 18, 12 / 6]))
    assert fitting.class_weights(train, 3).tolist() == pytest.approx([12 / 27, 12 / 9, 0.0])  # no image: 0

    built.clear()
    config = config.replace(class_weight="none")
    fit(CachedFeatures(extractor, train, [], config.model, config.recipe), 8, 2, train, [], config.model, config.recipe)
    assert built == [None]


def test_balanced_weights_raise_the_small_class_share(tmp_path, make_images, extractor):
    data = load_data(make_images(tmp_path / "data", {"a": 12, "b": 3}, layout="folders"))
    train = data.samples

    def small_class_probability(class_weight):
        config = tiny_config(head="sgd", class_weight=class_weight, epochs=4, lr_max=0.1)
        result = fit(CachedFeatures(extractor, train, train, config.model, config.recipe), 8, 2, train, train, config.model, config.recipe, keep="last")
        return result.val_probs[:, 1].mean()

    assert small_class_probability("balanced") > small_class_probability("none")


def test_no_class_weight_is_the_seed_recipe_bit_for_bit(extractor, three_classes, monkeypatch):
    _, train, val = three_classes
    config = tiny_config(head="sgd", views=2, epochs=4)
    weighted = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 3, train, val, config.model, config.recipe)

    def seed_criterion(config, train_samples, num_classes):  # what fit() built before class weights
        return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    monkeypatch.setattr(fitting, "make_criterion", seed_criterion)
    seed = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 3, train, val, config.model, config.recipe)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in weighted.history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in seed.history]
    for key, value in weighted.head.state_dict().items():
        assert torch.equal(value, seed.head.state_dict()[key]), key
    np.testing.assert_array_equal(weighted.val_probs, seed.val_probs)


# --- end to end ----------------------------------------------------------------------------------------

def test_train_with_the_logistic_head_writes_a_plain_checkpoint(tmp_path, make_images, tiny_backbone, caplog):
    from stopsign import load_classifier

    data = make_images(tmp_path / "data", {"stop": 10, "not_stop": 10}, layout="folders")
    with caplog.at_level(logging.DEBUG, logger="stopsign.training.heads"):
        result = train_tiny(tmp_path, data, head="logistic", views=2)
    assert any("C=" in message for message in caplog.messages)
    assert result.best_epoch == 1 and len(result.history) == 1
    checkpoint = load_checkpoint(result.run_dir / "best.pt")
    assert set(checkpoint["head"]) == {"weight", "bias"} and checkpoint["head"]["weight"].shape == (2, 8)
    assert checkpoint["config"]["head"] == "logistic"
    assert (result.run_dir / "metrics.csv").read_text().splitlines()[0].startswith("epoch,lr,")
    predictions = load_classifier(result.run_dir / "best.pt").predict([data / "stop", data / "not_stop"])
    assert len(predictions) == 20 and all(p.label in ("stop", "not_stop") for p in predictions)
    assert (result.run_dir / "report.html").is_file()


def test_the_epoch_log_of_a_logistic_run_formats(tmp_path, make_images, tiny_backbone, caplog):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    with caplog.at_level(logging.INFO, logger="stopsign"):  # pytest's capture handler raises on a format error
        train_tiny(tmp_path, data, head="logistic")
    assert any("epoch 1/" in message for message in caplog.messages)
