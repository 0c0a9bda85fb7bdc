"""CheckpointClassifier: a trained checkpoint (.pt) that predicts through PyTorch, with the frozen backbone's
feature cache and decode workers of training, so predicting a folder twice computes nothing twice.

The features are read from and written to training's own store (model/features.py, under cache.cache_root()):
keyed by image content, backbone weights, preprocessing and tiles, they are the same numbers whichever command
computed them, so evaluating a run's own training images, or predicting a folder again, runs no backbone pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import model_arguments, stored_threshold
from ..errors import CheckpointError
from ..model.pooling import make_head
from ..model.features import FeatureExtractor, default_cache_dir
from ..model.signature import match_training
from .base import Classifier


class CheckpointClassifier(Classifier):
    """A frozen backbone and the trained head of one checkpoint (a dict from checkpoint.load_checkpoint).

    cache: read and write the feature cache (in `cache_dir`, else training's default folder); False keeps the
    features of this classifier's images in memory only (nothing about them is left on disk)."""

    def __init__(self, checkpoint: dict, *, weights: str | None = None, cache: bool = True,
                 cache_dir: str | Path | None = None, num_workers: int = 2, source: str = "checkpoint",
                 device: str | None = "auto"):
        self.checkpoint = checkpoint
        self.class_names: list[str] = list(checkpoint["class_names"])
        self.backbone_name: str = checkpoint["backbone"]
        model = model_arguments(checkpoint)  # what a checkpoint before 0.2 lacks has the seed's values
        weights = weights or model["weights"]
        self.pooling, self.tiles = model["pooling"], model["tiles"]
        store = (Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
        self.extractor = FeatureExtractor(self.backbone_name, weights, cache_dir=store, num_workers=num_workers,
                                          image_size=checkpoint["preprocessing"]["size"], device=device)
        if self.extractor.weights_sha256 != checkpoint["weights_sha256"]:
            raise CheckpointError(
                f"{source} was trained on {self.backbone_name} weights with sha256 "
                f"{checkpoint['weights_sha256'][:12]}…, but the weights found hash to "
                f"{self.extractor.weights_sha256[:12]}…; pass the original file with --weights")
        if self.extractor.preprocessing["size"] != checkpoint["preprocessing"]["size"]:
            raise CheckpointError(f"{source}: preprocessing does not match the {self.backbone_name} backbone")
        try:
            # The backbone's own width, not the checkpoint's claim: a head of another backbone must not load.
            if model["num_features"] != self.extractor.feature_size:
                raise ValueError(f"{model['num_features']} features, the backbone has {self.extractor.feature_size}")
            self.head = make_head(model["num_features"], model["num_classes"], model["pooling"],
                                  model["positive_index"])
            self.head.load_state_dict(checkpoint["head"])
        except (ValueError, RuntimeError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{source}: the head's weights do not fit {self.backbone_name} "
                                  f"with {len(self.class_names)} classes ({error})") from error
        self.head.eval()
        self.trained_on: dict | None = checkpoint.get("trained_on")  # checkpoints before 0.2 have none
        self.threshold = stored_threshold(checkpoint)

    @property
    def preprocessing(self) -> dict:
        return self.extractor.preprocessing

    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        return self.score(paths, progress)[:3]

    def score(self, paths: list[Path], progress: bool = False):
        """The plain-view features serve both the head and the comparison with the training images."""
        paths = [Path(p) for p in paths]
        features = self.extractor.extract(paths, pooling=self.pooling, tiles=self.tiles, progress=progress)
        probs = self._head_probabilities(features.features[:, 0])
        copies = None
        if self.trained_on:  # the signature is of plain average-pooled features: the same pass, kept in memory
            plain = self.extractor.extract(features.paths)
            copies = match_training(self.trained_on, plain.digests, plain.features[:, 0])
        return features.paths, probs, features.skipped, copies

    def image_probabilities(self, images: list) -> np.ndarray:
        """No files, no feature cache: decoded images straight through backbone and head."""
        return self._head_probabilities(self.extractor.image_features(images, pooling=self.pooling, tiles=self.tiles))

    def _head_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) of feature rows; no rows, no call (a regions head cannot shape an empty batch)."""
        if not len(features):
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        with torch.no_grad():
            return self.head(torch.from_numpy(features)).softmax(1).numpy()
