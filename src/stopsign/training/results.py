"""What a fit returns, whichever fitter made it (the SGD loop in training/fitting.py, the logistic head in
training/heads.py): its own module, so that both fitters import it and neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ..data.datasets import Sample


@dataclass
class FitResult:
    history: list[dict]
    best: dict  # the kept epoch's row
    head: nn.Linear  # with the kept epoch's weights
    val_samples: list[Sample]  # the validation images that could be read, in the order of val_probs
    val_probs: np.ndarray  # (len(val_samples), C) from the kept head
    threshold: dict | None = field(default=None)  # two classes: the decision threshold chosen out of fold
    learning_curve: dict | None = field(default=None)  # --learning-curve: training/curve.py's
