"""The decision rule: class probabilities to predicted classes, the one copy that metrics, every classifier
and the HTTP service use."""

from __future__ import annotations

import numpy as np

from .errors import StopsignError

POSITIVE = 1  # for two classes, class index 1 is "positive" (stop in the flagship data set)


def decide(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Argmax of each row, or for two classes: the positive class when its probability is >= `threshold`."""
    probs = np.asarray(probs)
    if threshold is None:
        return probs.argmax(1)
    check_threshold(threshold, probs.shape[1])
    # In float64: NumPy would round a Python float threshold to float32 probabilities' precision first, so a
    # threshold just above p would still call p positive.
    return (probs[:, POSITIVE].astype(np.float64) >= float(threshold)).astype(int)


def check_threshold(threshold: float, num_classes: int) -> None:
    """Refuse a threshold that decide() could not apply: on other than two classes, or outside [0, 1]."""
    if num_classes != 2:
        raise StopsignError(f"a decision threshold applies to two-class models only, not {num_classes} classes")
    if not 0.0 <= threshold <= 1.0:
        raise StopsignError(f"a decision threshold is a probability between 0 and 1, got {threshold}")
