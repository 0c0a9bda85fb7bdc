"""stopsign: train honest image classifiers by transfer learning from a frozen ImageNet backbone.

    import stopsign
    run = stopsign.train("data/", model=stopsign.ModelConfig(backbone="efficientnet_lite0"))
    classifier = stopsign.load_classifier(run.run_dir)          # a run folder, best.pt, .onnx or .torchscript
    classifier.predict(["photo.jpg"])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# Each public name is imported from its module on first use, not here, so that `import stopsign` costs
# nothing and a deployment that predicts with an .onnx file never imports torch.
_PUBLIC = {
    "Classifier": "inference.base",
    "ModelConfig": "config",
    "RunOptions": "config",
    "StopsignError": "errors",
    "TrainConfig": "config",
    "create_app": "deploy.serve",
    "evaluate": "inference.evaluate",
    "export": "deploy.export",
    "find_suspects": "training.review",
    "load_classifier": "inference.load",
    "train": "training.trainer",
    "tune": "training.tune",
}

if TYPE_CHECKING:
    from .config import ModelConfig, RunOptions, TrainConfig
    from .deploy.export import export
    from .training.review import find_suspects
    from .deploy.serve import create_app
    from .errors import StopsignError
    from .inference.base import Classifier
    from .inference.evaluate import evaluate
    from .inference.load import load_classifier
    from .training.trainer import train
    from .training.tune import tune

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
