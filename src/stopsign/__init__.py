"""stopsign: train honest image classifiers by transfer learning from a frozen ImageNet backbone.

    import stopsign
    run = stopsign.train("data/", backbone="efficientnet_lite0")
    classifier = stopsign.load_classifier(run.run_dir / "best.pt")
    classifier.predict(["photo.jpg"])
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name is imported from its module on first use, not here, so that `import stopsign` costs
# nothing and a deployment that predicts with an .onnx file never imports torch.
_PUBLIC = {"Classifier": "predict", "StopsignError": "errors", "TrainConfig": "config", "evaluate": "predict",
           "load_classifier": "prediction", "train": "train"}

if TYPE_CHECKING:
    from .config import TrainConfig
    from .errors import StopsignError
    from .predict import Classifier, evaluate
    from .prediction import load_classifier
    from .train import train

__all__ = ["Classifier", "StopsignError", "TrainConfig", "evaluate", "load_classifier", "train", "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule stopsign.train binds it as the attribute `train`; the public function of
        # that name must win, as it did when this file imported everything eagerly.
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
