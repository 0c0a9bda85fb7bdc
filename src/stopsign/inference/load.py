"""load_classifier(): a model file to the classifier that runs it, chosen by the file's suffix (as
Ultralytics' AutoBackend does). Each backend is imported only when asked for, so an .onnx deployment never
imports torch and a .pt one never imports onnxruntime. predict() and describe_model() are `stopsign predict`'s and
`stopsign info`'s calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import StopsignError
from ..storage import fetch_model, is_url
from .base import Classifier, Prediction

RUN_MODEL = "best.pt"  # what a run folder given as a model means
EXPORT_SUFFIXES = (".onnx", ".torchscript")


def resolve_model_path(path: str | Path) -> Path:
    """A run folder means its best.pt; a URL (s3://.../best.pt, .onnx, or a run folder) means its local copy,
    downloaded once and checked by ETag (storage.fetch_model); anything else is taken as given."""
    if is_url(str(path)):
        return fetch_model(str(path))
    path = Path(path)
    return path / RUN_MODEL if path.is_dir() else path


def load_classifier(path: str | Path, **options) -> Classifier:
    """A .pt checkpoint (or a run folder) → CheckpointClassifier; .onnx → OnnxClassifier; .torchscript →
    TorchScriptClassifier.

    `options` (weights, cache_dir, num_workers, device) concern a checkpoint's PyTorch backbone; an exported file
    holds its whole network, so there they must be left unset or at their defaults.
    """
    path = resolve_model_path(path)
    suffix = path.suffix.lower()
    if suffix in EXPORT_SUFFIXES:
        if options.pop("device", None) not in (None, "auto", "cpu"):
            raise StopsignError(f"{path}: --device applies to .pt checkpoints; an exported model runs on the CPU "
                                "(onnxruntime, TorchScript). Fix: give the run's best.pt")
        if options.get("weights"):
            raise StopsignError(f"{path}: --weights applies to .pt checkpoints; an exported model holds its weights")
        if suffix == ".onnx":
            from .onnx import OnnxClassifier

            return OnnxClassifier(path)
        from .torchscript import TorchScriptClassifier

        return TorchScriptClassifier(path)
    from ..checkpoint import load_checkpoint
    from .pytorch import CheckpointClassifier

    return CheckpointClassifier(load_checkpoint(path), source=str(path), **options)


def predict(path: str | Path, images, *, threshold: float | None = None, progress: bool = False,
            device: str = "auto", explain: bool | str | Path = False, **options
            ) -> tuple[Classifier, Iterable[Prediction] | None]:
    """`stopsign predict`: the classifier and its rows as they come (Classifier.predict_iter; `explain` as there).
    Under torchrun each rank predicts every WORLD_SIZE-th file on its own device, and rank 0 gets every rank's rows
    in input order; the other ranks get None."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        classifier = load_classifier(path, device=device, **options)
        return classifier, classifier.predict_iter(images, threshold=threshold, progress=progress, explain=explain)
    from ..model.ranks import rank_device
    from .distributed import predict_sharded

    device = rank_device(device)
    classifier = load_classifier(path, device=str(device), **options)
    return classifier, predict_sharded(classifier, images, device, threshold=threshold, progress=progress,
                                       explain=explain)


def describe_model(path: str | Path) -> list[str]:
    """What `stopsign info` shows of a model (a path as load_classifier takes it), a line each: a checkpoint's own
    description and recorded settings, or the metadata `stopsign export` wrote into an exported file."""
    path = resolve_model_path(path)
    if path.suffix.lower() in EXPORT_SUFFIXES:
        from .exported import describe_metadata

        return [f"{key:<18} {text}" for key, text in describe_metadata(load_classifier(path).metadata)]
    from ..checkpoint import describe, describe_settings, load_checkpoint

    checkpoint = load_checkpoint(path)
    return ([f"{key:<18} {text}" for key, text in describe(checkpoint, path)] + ["settings"]
            + [f"  {key:<16} {text}" for key, text in describe_settings(checkpoint)])
