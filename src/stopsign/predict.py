"""Classifier: a trained checkpoint that predicts on image files through PyTorch; evaluate().

The rows it returns, the decision rule and load_classifier() live in prediction.py, which an
onnxruntime-only deployment imports without torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_data
from .errors import CheckpointError
from .features import FeatureExtractor
from .images import preprocess
from .metrics import Predictions
from .prediction import Prediction, decide, expand_inputs, load_classifier, predict_paths
from .report import write_report
from .runs import create_run_dir

log = logging.getLogger(__name__)

__all__ = ["Classifier", "Prediction", "decide", "evaluate", "expand_inputs", "load_classifier"]


class Classifier:
    """A frozen backbone and the trained head of one checkpoint."""

    def __init__(self, checkpoint: dict, *, weights: str | None = None, cache_dir: Path | None = None,
                 num_workers: int = 2, source: str = "checkpoint"):
        self.checkpoint = checkpoint
        self.class_names: list[str] = list(checkpoint["class_names"])
        self.backbone_name: str = checkpoint["backbone"]
        weights = weights or (checkpoint.get("config") or {}).get("weights")
        self.extractor = FeatureExtractor(self.backbone_name, weights, cache_dir=cache_dir, num_workers=num_workers)
        if self.extractor.weights_sha256 != checkpoint["weights_sha256"]:
            raise CheckpointError(
                f"{source} was trained on {self.backbone_name} weights with sha256 "
                f"{checkpoint['weights_sha256'][:12]}…, but the weights found hash to "
                f"{self.extractor.weights_sha256[:12]}…; pass the original file with --weights")
        if self.extractor.preprocessing["size"] != checkpoint["preprocessing"]["size"]:
            raise CheckpointError(f"{source}: preprocessing does not match the {self.backbone_name} backbone")
        # The backbone's own width, not the checkpoint's claim: a head of another backbone must not load.
        self.head = nn.Linear(self.extractor.feature_size, len(self.class_names))
        try:
            self.head.load_state_dict(checkpoint["head"])
        except (RuntimeError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{source}: the head's weights do not fit {self.backbone_name} "
                                  f"with {len(self.class_names)} classes ({error})") from error
        self.head.eval()

    @property
    def preprocessing(self) -> dict:
        return self.extractor.preprocessing

    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        """Class probabilities (N, C) for the readable images, and {path: reason} for the others."""
        features = self.extractor.extract([Path(p) for p in paths], progress=progress)
        with torch.no_grad():
            logits = self.head(torch.from_numpy(features.features[:, 0]))
        return features.paths, logits.softmax(1).numpy(), features.skipped

    def image_probabilities(self, images: list) -> np.ndarray:
        """Class probabilities (N, C) of decoded RGB images (uploads, say): no files, no feature cache."""
        batch = torch.from_numpy(np.stack([preprocess(image, self.preprocessing) for image in images]))
        with torch.no_grad():
            return self.head(self.extractor.forward(batch)).softmax(1).numpy()

    def predict(self, images, *, threshold: float | None = None, progress: bool = False) -> list[Prediction]:
        """Predict files, folders and glob patterns; unreadable files get a row with their error."""
        return predict_paths(self, images, threshold=threshold, progress=progress)


def evaluate(checkpoint: str | Path, data: str | Path, *, out: str | Path = "runs", name: str | None = None,
             threshold: float | None = None, progress: bool = True, **options) -> tuple[Path, dict]:
    """Score a checkpoint on labelled data in any layout; writes metrics.json, predictions.csv, plots, report."""
    classifier = load_classifier(checkpoint, **options)
    labelled = load_data(data, class_names=classifier.class_names)
    out_dir = create_run_dir(out, name, "eval")
    readable, probs, skipped = classifier.probabilities([s.path for s in labelled.samples], progress=progress)
    label_of = {s.path: s.label for s in labelled.samples}
    predictions = Predictions([str(p) for p in readable], np.array([label_of[p] for p in readable]), probs,
                              classifier.class_names)
    run_info = {"checkpoint": str(checkpoint), "data": {"source": str(labelled.root), "layout": labelled.layout,
                                                        "counts": labelled.class_counts()},
                "skipped files": skipped or "none", "backbone": classifier.backbone_name}
    metrics = write_report(out_dir, predictions, run_info=run_info, threshold=threshold,
                           title=f"stopsign evaluation of {checkpoint}")
    return out_dir, metrics
