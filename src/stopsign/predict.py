"""Classifier: a trained checkpoint that predicts on image files; load_classifier() and evaluate()."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_data
from .errors import CheckpointError, StopsignError
from .features import FeatureExtractor
from .images import IMAGE_EXTENSIONS, list_images
from .metrics import Predictions
from .report import write_report
from .runs import create_run_dir, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    label: str | None  # None when the image could not be read
    probabilities: dict[str, float]
    error: str | None = None

    def to_dict(self) -> dict:
        data = {"path": self.path, "label": self.label, "probabilities": self.probabilities}
        return data | ({"error": self.error} if self.error else {})


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
        self.head = nn.Linear(checkpoint["feature_size"], len(self.class_names))
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

    def predict(self, images, *, threshold: float | None = None, progress: bool = False) -> list[Prediction]:
        """Predict files, folders and glob patterns; unreadable files get a row with their error."""
        paths = expand_inputs(images if isinstance(images, (list, tuple)) else [images])
        readable, probs, skipped = self.probabilities(paths, progress=progress)
        by_path = {str(p): row for p, row in zip(readable, probs)}
        results = []
        for path in paths:
            row = by_path.get(str(path))
            if row is None:
                results.append(Prediction(str(path), None, {}, skipped.get(str(path), "cannot be read")))
                continue
            label = int(decide(row[None], threshold)[0])
            results.append(Prediction(str(path), self.class_names[label],
                                      {name: float(p) for name, p in zip(self.class_names, row)}))
        return results


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Argmax, or for two classes: class 1 when its probability reaches `threshold`."""
    if threshold is None:
        return probs.argmax(1)
    if probs.shape[1] != 2:
        raise StopsignError("--threshold applies to two-class models only")
    return (probs[:, 1] >= threshold).astype(int)


def load_classifier(path: str | Path, **options) -> Classifier:
    """Load a checkpoint (weights_only=True) into a Classifier; nothing else is needed."""
    return Classifier(load_checkpoint(path), source=str(path), **options)


def expand_inputs(inputs) -> list[Path]:
    """Files as given, folders to the images directly in them, glob patterns to their matches."""
    paths: list[Path] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            paths.extend(list_images(path))
        elif path.exists() or path.is_symlink():
            paths.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            paths.extend(p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(path)  # reported as unreadable, not a crash
    return paths


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
