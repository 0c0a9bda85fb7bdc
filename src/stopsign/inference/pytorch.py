"""CheckpointClassifier: a trained checkpoint (.pt) that predicts through PyTorch, with the frozen backbone's
feature cache and decode workers of training, so predicting a folder twice computes nothing twice.

The features are read from and written to training's own store (model/features.py, under cache.cache_root()):
keyed by image content, backbone weights, preprocessing and tiles, they are the same numbers whichever command
computed them, so predicting or evaluating a folder again, or a run's validation images, runs no backbone pass. (A
run trained with augmentation cached its training images' augmented views, not the plain ones predict reads.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import model_arguments, stored_threshold
from ..data.images import photo_size, read_image
from ..errors import CheckpointError
from ..model.pooling import REGIONS, make_head, score_weights
from ..model.features import FeatureExtractor, default_cache_dir
from ..model.signature import TrainingMatch, compare_with_training
from ..model.transforms import preprocess, tile_box
from .base import Classifier
from .explain import CAM_SCALE, Explanation, explanation


class CheckpointClassifier(Classifier):
    """A frozen backbone and the trained head of one checkpoint (a dict from checkpoint.load_checkpoint).

    cache: read and write the feature cache (in `cache_dir`, else training's default folder); False keeps the
    features of this classifier's images in memory only (nothing about them is left on disk)."""

    explains = True  # the backbone's feature maps are at hand: explanations() (inference/explain.py)

    def __init__(self, checkpoint: dict, *, weights: str | None = None, cache: bool = True,
                 cache_dir: str | Path | None = None, num_workers: int = 2, source: str = "checkpoint",
                 device: str | None = "auto"):
        self.checkpoint = checkpoint
        self.class_names: list[str] = list(checkpoint["class_names"])
        self.backbone_name: str = checkpoint["backbone"]
        model = model_arguments(checkpoint)  # what a checkpoint before 0.2 lacks has the seed's values
        weights = weights or model["weights"]
        self.pooling, self.tiles, self.positive = model["pooling"], model["tiles"], model["positive_index"]
        self.tile_pixels = model.get("tile_pixels", 0)  # none before --tile-pixels
        store = (Path(cache_dir) if cache_dir else default_cache_dir()) if cache else None
        self.extractor = FeatureExtractor(self.backbone_name, weights, cache_dir=store, num_workers=num_workers,
                                          image_size=checkpoint["preprocessing"]["size"], device=device,
                                          tuned=checkpoint.get("tuned"))
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
        self.unfamiliar_below = (self.trained_on or {}).get("unfamiliar_below")  # none before the cut-off was kept
        self.threshold = stored_threshold(checkpoint)

    @property
    def preprocessing(self) -> dict:
        return self.extractor.preprocessing

    @property
    def _tiling(self) -> dict:
        """How the extractor is to see an image for this model's head."""
        return {"pooling": self.pooling, "tiles": self.tiles, "tile_pixels": self.tile_pixels}

    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        features = self.extractor.extract([Path(p) for p in paths], progress=progress, **self._tiling)
        return features.paths, self._head_probabilities(features.features[:, 0]), features.skipped

    def training_match(self, paths: list[Path]) -> TrainingMatch | None:
        """The signature is of plain average-pooled features: a pass probabilities() made and stored (every pooling
        of a view is kept, and the whole image is a tiling's first view), read back, not computed again."""
        if not self.trained_on:
            return None
        plain = self.extractor.extract([Path(p) for p in paths])
        return compare_with_training(self.trained_on, plain.digests, plain.features[:, 0])

    def image_match(self, images: list) -> TrainingMatch | None:
        """One more backbone pass on each decoded image: its whole, plain view, which the signature holds."""
        if not self.trained_on:
            return None
        return compare_with_training(self.trained_on, None, self.extractor.image_features(images))

    def image_probabilities(self, images: list) -> np.ndarray:
        """No files, no feature cache: decoded images straight through backbone and head."""
        return self._head_probabilities(self.extractor.image_features(images, **self._tiling))

    def explanations(self, paths: list[Path]) -> list[Explanation]:
        """The head's features of each image come from the store probabilities() filled; the winning tile's feature
        map takes one more backbone pass (the store keeps only poolings)."""
        found = self.extractor.extract([Path(p) for p in paths], **self._tiling)
        return [self._explain(read_image(path, draft=(self.decode_side,) * 2), row, photo_size(path))
                for path, row in zip(found.paths, found.features[:, 0])]

    def image_explanations(self, images: list, sizes: list | None = None) -> tuple[np.ndarray, list[Explanation]]:
        features = self.extractor.image_features(images, **self._tiling)
        sizes = sizes or [image.size for image in images]
        return (self._head_probabilities(features),
                [self._explain(image, row, size) for image, row, size in zip(images, features, sizes)])

    def _explain(self, image, features: np.ndarray, size: tuple[int, int]) -> Explanation:
        """Where the head looked in a decoded image whose head features are `features`: every region's score
        (regions pooling), and the class activation map of the winning region's tile (of the whole image for
        other poolings: a linear head on pooled cells scores each cell the same way), seen CAM_SCALE times larger
        for a finer map."""
        with torch.no_grad():
            row = torch.from_numpy(np.ascontiguousarray(features))
            predicted = int(self.head(row[None]).argmax(1))
            weight, bias = score_weights(self.head, self.positive, predicted)
            regions, tile = None, 0
            if self.pooling == "regions":
                regions = self.head.region_scores(row[None])[0].numpy()
                tile = int(regions.argmax()) // REGIONS
            crop = image.crop(tile_box(*image.size, self.tiles, tile, self.tile_pixels)) if tile else image
            larger = self.preprocessing | {"size": self.preprocessing["size"] * CAM_SCALE}
            maps = self.extractor.backbone.model.trunk(torch.from_numpy(preprocess(crop, larger))[None])
            maps = maps[:, :, None, None] if maps.dim() == 2 else maps  # a trunk that pools by itself: one cell
            cam = torch.einsum("chw,c->hw", maps[0].float(), weight) + bias
        cells = tuple(max(1, side // CAM_SCALE) for side in cam.shape)  # the map of the model's own input side
        return explanation(image.size, size, self.tiles, regions, cells, cam.numpy(), tile, self.tile_pixels)

    def _head_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) of feature rows; no rows, no call (a regions head cannot shape an empty batch)."""
        if not len(features):
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        with torch.no_grad():
            return self.head(torch.from_numpy(features)).softmax(1).numpy()
