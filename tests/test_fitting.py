"""training/fitting.py and training/sources.py: fit() is deterministic, keeps the right epoch, follows the
schedule; the live and cached paths draw the same augmentation; unreadable files are known up front."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from stopsign.config import Settings, TrainConfig
from stopsign.data.datasets import load_data, split_samples
from stopsign.data.images import file_digest
from stopsign.errors import StopsignError
from stopsign.model import features as features_module
from stopsign.model.features import FeatureExtractor, ViewsDataset
from stopsign.model.transforms import view_params
from stopsign.training import sources as sources_module
from stopsign.training.fitting import fit, make_optimizer
from stopsign.training.sources import CachedFeatures, LiveImages


def tiny_config(**changes) -> Settings:
    return Settings.seed_recipe(backbone="tiny", num_workers=0, epochs=10, batch_size=4, val_fraction=0.25).replace(**changes)


@pytest.fixture
def data(tmp_path, make_images, tiny_backbone):
    return load_data(make_images(tmp_path / "data", {"not_stop": 6, "stop": 6}, layout="folders"))


@pytest.fixture
def extractor(tmp_path, tiny_backbone):
    return FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)


@pytest.fixture
def split(data):
    return split_samples(data.samples, 0.25, 0, class_names=data.class_names)


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# --- determinism ---------------------------------------------------------------------------------------

def test_two_fits_with_the_same_seed_are_identical(extractor, split):
    train, val = split
    config = tiny_config(views=3, seed=4, epochs=6)
    first = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 2, train, val, config.model, config.recipe)
    second = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 2, train, val, config.model, config.recipe)  # warm cache
    assert len(first.history) == 6
    assert without_seconds(first.history) == without_seconds(second.history)
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, second.head.state_dict()[key]), key
    np.testing.assert_array_equal(first.val_probs, second.val_probs)
    assert [s.path for s in first.val_samples] == [s.path for s in val]

    other = tiny_config(views=3, seed=5, epochs=6)
    third = fit(CachedFeatures(extractor, train, val, other.model, other.recipe), 8, 2, train, val, other.model, other.recipe)
    assert not torch.equal(third.head.weight, first.head.weight)  # the seed does matter


# --- which epoch is kept ----------------------------------------------------------------------------------

VAL_LABELS = [0, 1, 0, 1]


def logits_for(correct: int, confidence: float) -> torch.Tensor:
    """Logits for VAL_LABELS: the first `correct` right, the rest wrong, each with margin `confidence`."""
    rows = []
    for i, label in enumerate(VAL_LABELS):
        predicted = label if i < correct else 1 - label
        rows.append([confidence if c == predicted else 0.0 for c in range(2)])
    return torch.tensor(rows)


# epoch: (val_acc, margin). Epochs 2, 3 and 4 tie at 1.0; 4 has the lowest loss (largest margin); 5 is worse.
SCRIPT = [(2, 0.5), (4, 1.0), (4, 0.5), (4, 3.0), (3, 1.0)]


class ScriptedSource:
    """Real training batches from CachedFeatures; validation logits follow SCRIPT epoch by epoch."""

    threads = None

    def __init__(self, inner: CachedFeatures):
        self.inner = inner
        self.train_batches = inner.train_batches

    def model(self, head: nn.Linear) -> nn.Module:
        return ScriptedModel(head)

    def readable(self, samples):
        return samples

    def val_batches(self, samples):
        yield torch.zeros(len(VAL_LABELS), 8), torch.tensor(VAL_LABELS)


class ScriptedModel(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.evaluations = head, 0

    def forward(self, inputs):
        if self.training:
            return self.head(inputs)
        script = SCRIPT[min(self.evaluations, len(SCRIPT) - 1)]
        self.evaluations += 1
        return logits_for(*script)


def scripted_fit(extractor, split, keep):
    train, val = split
    config = tiny_config(epochs=len(SCRIPT))
    heads = {}

    def record(row, state):
        heads[row["epoch"]] = {k: v.clone() for k, v in state["head"].items()}

    result = fit(ScriptedSource(CachedFeatures(extractor, train, val, config.model, config.recipe)), 8, 2, train, val[:4], config.model, config.recipe,
                 keep=keep, on_epoch=record)
    return result, heads


def test_keep_best_takes_the_highest_val_acc_and_ties_go_to_the_lower_loss(extractor, split):
    result, heads = scripted_fit(extractor, split, "best")
    assert [row["val_acc"] for row in result.history] == [0.5, 1.0, 1.0, 1.0, 0.75]
    losses = [row["val_loss"] for row in result.history]
    assert losses[3] < losses[1] < losses[2]
    assert result.best["epoch"] == 4 and result.best["val_acc"] == 1.0
    assert torch.equal(result.head.weight, heads[4]["weight"])
    assert not torch.equal(result.head.weight, heads[5]["weight"])


def test_keep_last_takes_the_last_epoch_whatever_its_score(extractor, split):
    result, heads = scripted_fit(extractor, split, "last")
    assert result.best["epoch"] == 5 and result.best["val_acc"] == 0.75
    assert result.best == result.history[-1]
    assert torch.equal(result.head.weight, heads[5]["weight"])
    assert torch.equal(result.head.bias, heads[5]["bias"])


def test_keep_best_on_real_features_is_the_best_row(extractor, split):
    train, val = split
    config = tiny_config(epochs=8, lr_max=0.5)
    result = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 2, train, val, config.model, config.recipe, keep="best")
    best = max(result.history, key=lambda row: (row["val_acc"], -row["val_loss"]))
    assert result.best == best


def test_without_validation_the_last_epoch_is_kept(extractor, split):
    train, _ = split
    config = tiny_config(epochs=3)
    result = fit(CachedFeatures(extractor, train, [], config.model, config.recipe), 8, 2, train, [], config.model, config.recipe, keep="best")
    assert result.best["epoch"] == 3 and result.best["val_acc"] is None
    assert result.val_samples == [] and result.val_probs is None


# --- the recipe ---------------------------------------------------------------------------------------------

def test_make_optimizer_refuses_an_unknown_scheduler():
    with pytest.raises(StopsignError, match="unknown scheduler 'warmup'") as caught:
        make_optimizer(nn.Linear(8, 2), TrainConfig(scheduler="warmup"))
    assert "triangular2" in str(caught.value) and "cosine" in str(caught.value)


def test_make_optimizer_is_sgd_with_the_recipe():
    optimizer, _ = make_optimizer(nn.Linear(8, 2), TrainConfig(momentum=0.8, weight_decay=1e-4, lr_max=0.02))
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.8, 1e-4)


def test_triangular2_rises_from_lr_base_to_lr_max_over_cycle_epochs(extractor, split):
    train, val = split
    config = tiny_config(epochs=10, lr_base=1e-6, lr_max=1e-2, cycle_epochs=5, scheduler="triangular2")
    result = fit(CachedFeatures(extractor, train, val, config.model, config.recipe), 8, 2, train, val, config.model, config.recipe)
    lrs = [row["lr"] for row in result.history]
    assert [row["epoch"] for row in result.history] == list(range(1, 11))
    assert lrs[0] == pytest.approx(1e-6, rel=1e-9)
    assert lrs[5] == pytest.approx(1e-2, rel=1e-9)
    step = (1e-2 - 1e-6) / 5
    expected = [1e-6 + step * k for k in (0, 1, 2, 3, 4, 5, 4, 3, 2, 1)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_cosine_and_constant_schedules(extractor, split):
    train, val = split
    model, recipe, _ = tiny_config()
    source = CachedFeatures(extractor, train, val, model, recipe)
    cosine = tiny_config(epochs=4, scheduler="cosine", lr_base=1e-4, lr_max=0.1)
    lrs = [row["lr"] for row in fit(source, 8, 2, train, val, cosine.model, cosine.recipe).history]
    expected = [1e-4 + (0.1 - 1e-4) * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    constant = tiny_config(epochs=3, scheduler="constant", lr_max=0.03)
    assert [row["lr"] for row in fit(source, 8, 2, train, val, constant.model, constant.recipe).history] == pytest.approx([0.03] * 3)


# --- the live path -----------------------------------------------------------------------------------------

class SpyViews(ViewsDataset):
    """ViewsDataset recording the (paths, views) each pass asked for."""

    made: list[tuple[list[str], list[list[tuple[bool, float]]]]] = []

    def __init__(self, paths, views, preprocessing, tiles=1, pixels=0):
        super().__init__(paths, views, preprocessing, tiles, pixels)
        SpyViews.made.append(([str(p) for p in paths], [list(v) for v in views]))


@pytest.fixture
def spy(monkeypatch):
    SpyViews.made = []
    monkeypatch.setattr(sources_module, "ViewsDataset", SpyViews)
    monkeypatch.setattr(features_module, "ViewsDataset", SpyViews)
    return SpyViews


def test_live_images_draw_view_params_of_epoch_plus_one(data, extractor, spy):
    config = tiny_config(seed=3, rotation=20.0)
    live = LiveImages(extractor, data.samples, *config)
    digests = {str(s.path): file_digest(s.path) for s in data.samples}
    seen = set()
    for epoch in range(3):
        batches = list(live.train_batches(data.samples, epoch, np.random.default_rng([config.recipe.seed, epoch])))
        assert sum(len(labels) for _, labels in batches) == len(data.samples)
        assert batches[0][0].shape[1:] == (3, 32, 32)
        paths, draws = spy.made[-1]
        assert sorted(paths) == sorted(digests)
        for path, views in zip(paths, draws):
            assert views == [view_params(digests[path], epoch + 1, 3, 20.0)]
            seen.add(views[0])
    assert len({flip for flip, _ in seen}) == 2 and len(seen) > 3  # real draws: both flips, various angles


def test_live_epoch_e_is_the_cached_view_e_plus_one(data, tiny_backbone, spy):
    config = tiny_config(seed=2, rotation=15.0, views=3)
    uncached = FeatureExtractor("tiny", cache_dir=None, num_workers=0)  # every view goes through ViewsDataset
    CachedFeatures(uncached, data.samples, [], config.model, config.recipe)
    cached = {path: views for paths, draws in spy.made for path, views in zip(paths, draws)}
    assert sorted(cached) == sorted(str(s.path) for s in data.samples)
    assert all(len(views) == 3 for views in cached.values())
    live = LiveImages(uncached, data.samples, *config)
    for epoch in range(3):
        list(live.train_batches(data.samples, epoch, np.random.default_rng(epoch)))
        paths, draws = spy.made[-1]
        # the cached path asks for (flip, angle, tile 0); the live path for (flip, angle): the same draw
        assert {path: views[0] for path, views in zip(paths, draws)} == {p: v[epoch][:2] for p, v in cached.items()}


def test_live_images_without_augmentation_draw_the_plain_view(data, extractor, spy):
    live = LiveImages(extractor, data.samples, *tiny_config(augment=False))
    list(live.train_batches(data.samples, 4, np.random.default_rng(0)))
    assert all(views == [(False, 0.0)] for views in spy.made[-1][1])


def test_live_images_list_an_unreadable_file_before_any_epoch(data, extractor, spy):
    broken = data.root / "stop" / "broken.png"
    broken.write_bytes(b"\x89PNG garbage, not an image" * 3)
    data = load_data(data.root)
    assert str(broken) in {str(s.path) for s in data.samples}
    live = LiveImages(extractor, data.samples, *tiny_config())
    assert list(live.skipped) == [str(broken)] and live.skipped[str(broken)]
    assert spy.made == []  # nothing was batched yet
    assert str(broken) not in live.digests and len(live.digests) == len(data.samples) - 1
    assert len(live.readable(data.samples)) == len(data.samples) - 1
    batches = list(live.train_batches(data.samples, 0, np.random.default_rng(0)))
    assert sum(len(labels) for _, labels in batches) == len(data.samples) - 1
    assert str(broken) not in spy.made[-1][0]


def test_live_images_record_a_file_that_breaks_after_construction(data, extractor):
    live = LiveImages(extractor, data.samples, *tiny_config())
    assert live.skipped == {}
    gone = data.samples[0].path
    gone.write_bytes(b"")  # emptied between construction and the epoch
    batches = list(live.train_batches(data.samples, 0, np.random.default_rng(0)))
    assert sum(len(labels) for _, labels in batches) == len(data.samples) - 1
    assert set(live.skipped) == {str(gone)} and "empty" in live.skipped[str(gone)]
    assert gone not in [s.path for s in live.readable(data.samples)]


def test_a_run_shorter_than_one_cycle_still_reaches_lr_max(tmp_path, tiny_backbone, make_images, caplog):
    from stopsign import train

    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    with caplog.at_level("WARNING"):
        result = train(data, backbone="tiny", epochs=3, out=str(tmp_path / "runs"), progress=False, num_workers=0,
                       head="sgd",
                       val_fraction=0.3)
    assert [row["lr"] for row in result.history] == pytest.approx([1e-6, 1e-2, 1e-6], rel=1e-3)  # up 1, down 1
    assert "3 epochs are fewer than one learning-rate cycle (5 up, 5 down)" in caplog.text
