"""stopsign: train honest image classifiers by transfer learning from a frozen ImageNet backbone.

    import stopsign
    run = stopsign.train("data/", backbone="efficientnet_lite0")
    classifier = stopsign.load_classifier(run.run_dir / "best.pt")
    classifier.predict(["photo.jpg"])
"""

__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402
from .errors import StopsignError  # noqa: E402
from .predict import Classifier, evaluate, load_classifier  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["Classifier", "StopsignError", "TrainConfig", "evaluate", "load_classifier", "train", "__version__"]
