"""The decision threshold of a two-class head, chosen out of fold on the training split.

Argmax answers the positive class when p >= 0.5, which on imbalanced data (the normal case: negatives outnumber
stop signs 4:1 to 9:1) favours the majority class. The threshold is chosen where the head has not seen the
images: each grouped fold of the training split is scored by a head fit on the others, with the hyperparameters
the final head was fit with (the chosen C, or the SGD recipe), and the threshold that maximises the balanced
accuracy of those out-of-fold probabilities (or the largest that reaches --target-recall of the positive class)
is stored in the checkpoint and its exports, where predict, evaluate and serve use it unless --threshold says
otherwise. Photos of a new source added to the training split move it: it is chosen again on every train.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.special import expit
from tqdm.auto import tqdm

from ..config import ModelConfig, TrainConfig
from ..data.datasets import Sample, kfold_samples
from ..decision import POSITIVE
from .fitting import fit
from .heads import MAX_FOLDS, fit_quietly, folded_head, in_parallel, logits, make_model, training_rows
from .sources import CachedFeatures

log = logging.getLogger(__name__)
SMOOTHING = 0.5  # log-odds: the width of each image's ramp in the smoothed balanced accuracy
FOLD_TOLERANCE = 1e-3  # the regions head's gradient tolerance in the folds (the final fit's: 1e-4)
GRID_ODDS = 10.0  # thresholds searched from p = 0.00005 to 0.99995


def choose_threshold(y_true, p_positive, target_recall: float | None = None) -> dict:
    """The threshold on p(positive) that maximises balanced accuracy, or with `target_recall` the largest whose
    positive recall reaches it. Returns {"value", "rule", and the balanced accuracy and recalls at it and at 0.5}.

    Balanced accuracy is a step function of the threshold, and a few hundred images give it many near-equal
    peaks, between which the plain argmax jumps with any small change of the fit. So each image's step is
    smoothed into a logistic ramp SMOOTHING wide in log-odds, and the peak of the smoothed curve is taken (ties:
    the log-odds nearest 0): a threshold between the classes' scores rather than on one image's."""
    y_true, p = np.asarray(y_true), np.clip(np.asarray(p_positive, dtype=np.float64), 1e-12, 1 - 1e-12)
    positive = y_true == POSITIVE
    if target_recall is None:
        rule = "balanced accuracy out of fold"
        odds, grid = np.log(p / (1 - p)), np.linspace(-GRID_ODDS, GRID_ODDS, 801)  # steps of SMOOTHING / 20
        above = expit((odds[:, None] - grid[None, :]) / SMOOTHING)  # (images, thresholds): p above t, smoothly
        smooth = (above[positive].mean(0) + (1 - above[~positive]).mean(0)) / 2
        best = np.flatnonzero(smooth >= smooth.max() - 1e-12)
        value = float(expit(grid[best[np.argmin(np.abs(grid[best]))]]))
    else:
        rule = f"recall of the positive class >= {target_recall:g} out of fold"
        ranked = np.sort(p[positive])[::-1]  # the largest threshold that keeps ceil(R × positives) of them
        value = float(ranked[max(0, int(np.ceil(target_recall * len(ranked))) - 1)])
    return {"value": value, "rule": rule, "images": int(len(p)), **scores_at(y_true, p, value, "oof"),
            **scores_at(y_true, p, 0.5, "oof_at_0.5")}


def scores_at(y_true: np.ndarray, p: np.ndarray, threshold: float, prefix: str) -> dict:
    predicted = p >= threshold
    positive = y_true == POSITIVE
    recall = float(predicted[positive].mean()) if positive.any() else None
    specificity = float((~predicted[~positive]).mean()) if (~positive).any() else None
    balanced = None if recall is None or specificity is None else (recall + specificity) / 2
    return {f"{prefix}_balanced_accuracy": balanced, f"{prefix}_recall": recall,
            f"{prefix}_specificity": specificity}


def out_of_fold_threshold(source, samples: list[Sample], class_names: list[str], num_features: int,
                          model: ModelConfig, recipe: TrainConfig, fitted: dict, *,
                          groups: dict[str, int] | None = None, extra_train: list[Sample] = (),
                          oof=None, progress: bool = False) -> dict | None:
    """choose_threshold() on out-of-fold probabilities of the training split: `oof` (Predictions of --folds'
    cross-validation) when given, else grouped folds fit here on cached features with the final head's
    hyperparameters (`fitted`: its history row, whose "C" a logistic head chose). None for other than two
    classes, a class with a single image (nothing to hold out), or --no-cache (every fold would rerun the
    backbone). progress: a bar over the folds."""
    if len(class_names) != 2:
        return None
    if oof is not None:
        return choose_threshold(oof.y_true, np.asarray(oof.probs)[:, POSITIVE], recipe.target_recall)
    if not isinstance(source, CachedFeatures):
        log.info("--no-cache: the decision threshold stays 0.5 (choosing it out of fold would rerun the backbone "
                 "for every fold)")
        return None
    samples = [s for s in samples if s.path in source.train_rows]
    counts = np.bincount([s.label for s in samples], minlength=2)
    if counts.min() < 2:
        log.warning("a class has a single training image: the decision threshold stays 0.5")
        return None
    positive = model.positive_index(class_names)
    folds = kfold_samples(samples, int(min(MAX_FOLDS, counts.min())), recipe.seed, groups=groups)
    extra = [s for s in extra_train if s.path in source.train_rows]

    def score(fold):
        head = fold_head(source, fold[0] + extra, num_features, 2, model, recipe, fitted, positive)
        return held_out_probabilities(head, source, fold[1]), [s.label for s in fold[1]]

    scored = list(tqdm(in_parallel(score, folds, source, model.head), total=len(folds), desc="threshold folds",
                       unit="fold", disable=not progress, leave=False))
    probs, truth = (np.concatenate(part) for part in zip(*scored))
    return choose_threshold(truth, probs[:, POSITIVE], recipe.target_recall)


def fold_head(source: CachedFeatures, samples: list[Sample], num_features: int, num_classes: int,
              model: ModelConfig, recipe: TrainConfig, fitted: dict, positive: int | None):
    """A head fit on `samples` (readable ones) with the final head's hyperparameters (`fitted`: its history row, whose
    "C" a logistic head chose): the out-of-fold fits of the threshold and the learning curve."""
    if model.head != "logistic":
        return fit(source, num_features, num_classes, samples, [], model, recipe, keep="last", positive=positive).head
    pipeline = make_model(model, recipe.replace(class_weight=fitted.get("class_weight", recipe.class_weight)),
                          fitted["C"], positive)
    if model.pooling == "regions":  # a looser tolerance: the threshold moved by < 0.005, in less time
        pipeline.set_params(classifier__tol=FOLD_TOLERANCE)
    fit_quietly(pipeline, *training_rows(source, samples))
    return folded_head(pipeline["scaler"], pipeline["classifier"], num_features, num_classes)


@torch.no_grad()
def held_out_probabilities(head, source: CachedFeatures, samples: list[Sample]) -> np.ndarray:
    """(N, K) probabilities of training-split images from the first view the source cached of each: the plain
    view, or with augmentation (the default) its first draw, a flip and a rotation of at most 5°."""
    rows = np.array([source.train_rows[s.path] for s in samples], dtype=np.int64)
    return logits(head, source.train_features[rows, 0]).softmax(1).numpy()
