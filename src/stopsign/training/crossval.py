"""Stratified K-fold cross-validation of the head: every image is validated exactly once.

With 200 photos a single 10% split is 20 images; K folds score every image out of fold, and the spread
across folds says how much one split's number can be trusted. Each fold keeps its last epoch: choosing the
epoch on the held-out fold would flatter the score.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig, TrainConfig
from ..data.datasets import Sample, kfold_samples
from ..reporting.metrics import Predictions, compute_metrics
from .fitting import fit
from .heads import in_parallel

SUMMARISED = ("accuracy", "log_loss", "macro_f1", "roc_auc", "ece")


def held_out_predictions(source, samples: list[Sample], class_names: list[str], num_features: int,
                         model: ModelConfig, recipe: TrainConfig, groups: dict[str, int] | None = None,
                         extra_train: list[Sample] = (), progress: bool = False) -> Iterator[Predictions]:
    """The K-fold loop (K = recipe.folds): for each fold, a head fit on the others (its last epoch kept) and
    its predictions on the held-out fold. `source` is CachedFeatures or LiveImages over all samples; `groups`
    (duplicate groups) stay within one fold; `extra_train` (rendered images) joins every fold's training part
    and is never held out. progress: a bar over the folds (a fold's own epochs show none). A logistic head's folds
    are fit on a thread per core (heads.in_parallel), yielded in order."""
    folds = kfold_samples(samples, recipe.folds, recipe.seed, class_names=class_names, groups=groups)

    def held_out(fold: tuple[list[Sample], list[Sample]]) -> Predictions:
        train_samples, val_samples = fold
        result = fit(source, num_features, len(class_names), train_samples + list(extra_train), val_samples, model,
                     recipe, keep="last", groups=groups, positive=model.positive_index(class_names))
        return Predictions([str(s.path) for s in result.val_samples], [s.label for s in result.val_samples],
                           result.val_probs, class_names)

    yield from tqdm(in_parallel(held_out, folds, source, model.head), total=len(folds), desc="folds", unit="fold",
                    disable=not progress, leave=False)


def cross_validate(source, samples: list[Sample], class_names: list[str], num_features: int,
                   model: ModelConfig, recipe: TrainConfig, groups: dict[str, int] | None = None,
                   extra_train: list[Sample] = (),
                   progress: bool = False) -> dict:
    """Every metric of each fold, their mean and spread, and the out-of-fold predictions (progress: a bar over
    the folds).

    Returns {"folds", "per_fold": [metrics], "mean", "std", "oof_confusion", "oof": Predictions}.
    """
    per_fold, paths, truth, probs = [], [], [], []
    for fold in held_out_predictions(source, samples, class_names, num_features, model, recipe, groups, extra_train,
                                     progress):
        per_fold.append(_summary(compute_metrics(fold)))
        paths += fold.paths
        truth += list(fold.y_true)
        probs.append(fold.probs)
    oof = Predictions(paths, np.array(truth), np.concatenate(probs), class_names)
    keys = [k for k in SUMMARISED if all(f.get(k) is not None for f in per_fold)]
    return {
        "folds": recipe.folds,
        "per_fold": per_fold,
        "mean": {k: float(np.mean([f[k] for f in per_fold])) for k in keys},
        "std": {k: float(np.std([f[k] for f in per_fold], ddof=1)) if len(per_fold) > 1 else 0.0 for k in keys},
        "oof_confusion": compute_metrics(oof)["confusion"],
        "oof": oof,
    }


def _summary(metrics: dict) -> dict:
    values = {k: metrics.get(k) for k in SUMMARISED if k != "ece"}
    values["ece"] = (metrics.get("calibration") or {}).get("ece")
    values["n"] = metrics["n"]
    return values
