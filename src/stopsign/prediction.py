"""What every classifier shares, free of torch: prediction rows, the decision rule, input expansion, loading.

A checkpoint (.pt) predicts through PyTorch (predict.Classifier); an exported .onnx file through onnxruntime
alone (onnx_predict.OnnxClassifier). Both turn probabilities into the same `Prediction` rows here, and
`load_classifier` picks one by the file's suffix, importing torch only for a checkpoint, so that a deployment
holding only an .onnx file runs without torch or torchvision installed.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StopsignError
from .images import IMAGE_EXTENSIONS, list_images


@dataclass
class Prediction:
    path: str
    label: str | None  # None when the image could not be read
    probabilities: dict[str, float]
    error: str | None = None

    def to_dict(self) -> dict:
        data = {"path": self.path, "label": self.label, "probabilities": self.probabilities}
        return data | ({"error": self.error} if self.error else {})


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Argmax, or for two classes: class 1 when its probability reaches `threshold`."""
    if threshold is None:
        return probs.argmax(1)
    if probs.shape[1] != 2:
        raise StopsignError("--threshold applies to two-class models only")
    return (probs[:, 1] >= threshold).astype(int)


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


def predict_paths(classifier, images, *, threshold: float | None = None, progress: bool = False) -> list[Prediction]:
    """Predict files, folders and glob patterns with any classifier that has `.probabilities(paths)`.

    One row per input file, in order; an unreadable file gets a row with its error instead of a label.
    """
    paths = expand_inputs(images if isinstance(images, (list, tuple)) else [images])
    readable, probs, skipped = classifier.probabilities(paths, progress=progress)
    by_path = {str(p): row for p, row in zip(readable, probs)}
    names = classifier.class_names
    results = []
    for path in paths:
        row = by_path.get(str(path))
        if row is None:
            results.append(Prediction(str(path), None, {}, skipped.get(str(path), "cannot be read")))
            continue
        label = int(decide(row[None], threshold)[0])
        results.append(Prediction(str(path), names[label], {name: float(p) for name, p in zip(names, row)}))
    return results


def load_classifier(path: str | Path, **options):
    """A Classifier for a .pt checkpoint, an OnnxClassifier for an exported .onnx file.

    `options` (weights, cache_dir, num_workers) concern a checkpoint's PyTorch backbone; an ONNX file holds
    its whole network, so there they must be left unset or at their defaults.
    """
    if Path(path).suffix.lower() == ".onnx":
        from .onnx_predict import OnnxClassifier

        if options.get("weights"):
            raise StopsignError(f"{path}: --weights applies to .pt checkpoints; an ONNX file holds its weights")
        return OnnxClassifier(path)
    # Imported here, not at the top: the PyTorch side must stay out of an onnxruntime-only deployment.
    from .predict import Classifier
    from .runs import load_checkpoint

    return Classifier(load_checkpoint(path), source=str(path), **options)
