"""The two sources of batches that fit() trains a head from, with the same recipe and the same checkpoint:

- CachedFeatures (default) computes the frozen backbone's features of each image view once (cached on disk)
  and trains the linear head on them;
- LiveImages (`cache=False`) runs the backbone over freshly augmented images every epoch, as the seed
  notebook does; kept for comparison (--finetune trains unfrozen stages on its own path: training/finetune.py).

Both draw augmentation through model.transforms.view_params: an image's view at epoch e on the live path is
the cached path's view e + 1.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig, RunOptions, TrainConfig
from ..data.datasets import Sample
from ..data.images import file_digest, read_image
from ..errors import StopsignError
from ..model.pooling import FrozenBackboneClassifier
from ..model.features import FeatureExtractor, FeatureSet, ViewsDataset, view_loader
from ..model.transforms import view_params
from .plan import extract, source_requests


class CachedFeatures:
    """The fast path: backbone features of each view, computed once. Training images need only their
    augmented views (one drawn per epoch); validation images their plain view."""

    # A linear head on a few hundred feature rows: splitting its matmuls across threads costs more than it
    # saves, and on a busy machine far more (measured on 2 shared cores: 35 ms a step with 2 threads, 0.3 ms with 1).
    threads = 1

    def __init__(self, extractor: FeatureExtractor, train: list[Sample], val: list[Sample], model: ModelConfig,
                 recipe: TrainConfig, progress: bool = False, *, features: dict[str, FeatureSet] | None = None):
        """features: those of plan.source_requests(train, val, model, recipe), when extracted already (train())."""
        features = features or extract(source_requests(train, val, model, recipe), extractor, progress=progress)
        augmented, plain = features["train"], features["held out"]
        self.train_rows = {p: row for row, p in enumerate(augmented.paths)}
        self.val_rows = {p: row for row, p in enumerate(plain.paths)}
        self.train_features, self.val_features = augmented.features, plain.features[:, 0]
        self.skipped = augmented.skipped | plain.skipped
        self.batch_size = recipe.batch_size
        self.device = extractor.device  # an SGD head trains where the backbone ran; on the CPU .to() is a no-op
        # what the augmented views were drawn with, and which features they are
        self.drawn = (recipe.augment, recipe.seed, recipe.rotation, model.pooling, model.tiles, model.tile_pixels)
        self._last: dict[int, tuple] = {}  # see _indexed

    def for_config(self, model: ModelConfig, recipe: TrainConfig) -> "CachedFeatures":
        """These features under another recipe: its batch size, and only its first recipe.views augmented views.

        View k of an image is drawn from (seed, image, k), so the first v views of a larger set are exactly the
        views a CachedFeatures built with views=v computes: tuning extracts the most views once, then narrows.
        """
        views = recipe.views if recipe.augment and recipe.views > 0 else 1
        asked = (recipe.augment, recipe.seed, recipe.rotation, model.pooling, model.tiles, model.tile_pixels)
        if asked != self.drawn or views > self.train_features.shape[1]:
            raise ValueError(f"these features hold {self.train_features.shape[1]} views drawn with (augment, seed, "
                             f"rotation, pooling, tiles, tile_pixels) = {self.drawn}; cannot serve {views} views with {asked}")
        narrowed = copy.copy(self)
        narrowed.train_features, narrowed.batch_size = self.train_features[:, :views], recipe.batch_size
        narrowed._last = {}
        return narrowed

    def _indexed(self, table: dict, samples: list[Sample]) -> tuple[list[Sample], np.ndarray, np.ndarray]:
        """The samples that have features in `table`, their rows and their labels. fit() asks about the same
        lists every epoch, so the answer for the last list asked of each table is kept (a list is not changed
        while a head trains on it); looking up paths every epoch was a tenth of a tuning trial's time."""
        last = self._last.get(id(table))
        if last is None or last[0] is not samples:
            readable = [s for s in samples if s.path in table]
            last = (samples, readable, np.array([table[s.path] for s in readable], dtype=np.int64),
                    np.array([s.label for s in readable], dtype=np.int64))
            self._last[id(table)] = last
        return last[1:]

    def model(self, head: nn.Linear) -> nn.Module:
        return head

    def train_batches(self, samples: list[Sample], epoch: int, rng: np.random.Generator):
        samples, rows, labels = self._indexed(self.train_rows, samples)
        order = rng.permutation(len(samples))
        views = rng.integers(0, self.train_features.shape[1], size=len(samples))
        for start in range(0, len(order), self.batch_size):
            pick = order[start:start + self.batch_size]
            yield (torch.from_numpy(np.asarray(self.train_features[rows[pick], views[pick]])).to(self.device),
                   torch.from_numpy(labels[pick]).to(self.device))

    def readable(self, samples: list[Sample]) -> list[Sample]:
        return self._indexed(self.val_rows, samples)[0]

    def val_batches(self, samples: list[Sample]):
        _, rows, labels = self._indexed(self.val_rows, samples)
        for start in range(0, len(rows), 256):
            yield (torch.from_numpy(self.val_features[rows[start:start + 256]]).to(self.device),
                   torch.from_numpy(labels[start:start + 256]).to(self.device))


class LiveImages:
    """The slow path: decode and augment every image and run the backbone over it, every epoch."""

    def __init__(self, extractor: FeatureExtractor, samples: list[Sample], model: ModelConfig, recipe: TrainConfig,
                 run: RunOptions):
        if model.tiles > 1:
            raise StopsignError("--tiles needs cached features: the live path (--no-cache) sees each image whole. "
                                "Fix: drop --no-cache, or --tiles")
        self.backbone, self.preprocessing = extractor.backbone.model, extractor.preprocessing
        self.pooling, self.recipe, self.num_workers = model.pooling, recipe, run.num_workers
        self.device = extractor.device  # backbone and head train there, in float32 (no autocast on this path)
        # Every image is read once up front, as the cached path's extraction does, so the files that cannot be
        # used are known (and recorded) before the first epoch; the digests seed each image's augmentation.
        self.skipped: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        size = self.preprocessing["size"]
        for sample in samples:
            try:
                read_image(sample.path, draft=(size, size))
                self.digests[str(sample.path)] = file_digest(sample.path)
            except StopsignError as error:
                self.skipped[str(sample.path)] = str(error)
        self.threads = None  # the backbone runs here: keep torch's thread count

    def model(self, head: nn.Linear) -> nn.Module:
        return FrozenBackboneClassifier(self.backbone, head, self.pooling).to(self.device)

    def _batches(self, samples: list[Sample], order, draws):
        dataset = ViewsDataset([samples[i].path for i in order], draws, self.preprocessing)
        for batch in view_loader(dataset, self.recipe.batch_size, self.num_workers):
            good = [(i, tensor) for i, tensor, error in batch if error is None]
            self.skipped.update({str(samples[order[i]].path): error for i, _, error in batch if error})
            if good:
                yield (torch.cat([t for _, t in good]).to(self.device),
                       torch.tensor([samples[order[i]].label for i, _ in good], dtype=torch.long).to(self.device))

    def train_batches(self, samples: list[Sample], epoch: int, rng: np.random.Generator):
        samples = self.readable(samples)
        order = rng.permutation(len(samples))
        view = epoch + 1 if self.recipe.augment else 0
        draws = [[view_params(self.digests[str(samples[i].path)], view, self.recipe.seed, self.recipe.rotation)]
                 for i in order]
        return self._batches(samples, order, draws)

    def readable(self, samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if str(s.path) not in self.skipped]

    def val_batches(self, samples: list[Sample]):
        samples = self.readable(samples)
        return self._batches(samples, np.arange(len(samples)), [[(False, 0.0)]] * len(samples))
