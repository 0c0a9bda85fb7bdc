"""How many more photos: a learning curve from the cached features (`train --learning-curve`).

Each grouped fold of the training split is held out in turn; the head is refit, with the final head's
hyperparameters, on growing shares of the other folds (each class subsampled alike, duplicate groups kept whole,
each share inside the next) and scored on the held-out fold. At each size: the mean balanced accuracy over the folds
and its 95% t-interval. A power law err(n) = a · n^-b + c, fit to the mean error against the images per class, is
extrapolated to 2× and 4× the data. That is an estimate: five points say where the curve is heading, not what more
photos will give, and photos of another source can move it either way.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import stats
from scipy.optimize import curve_fit
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from ..config import ModelConfig, TrainConfig
from ..data.datasets import Sample, kfold_samples
from .heads import MAX_FOLDS, in_parallel
from .sources import CachedFeatures
from .threshold import fold_head, held_out_probabilities

log = logging.getLogger(__name__)
SHARES = (0.2, 0.4, 0.6, 0.8, 1.0)  # of each fold's training part
SCALES = (2, 4)  # the extrapolation: times the training split's images per class
FLAT = 0.02  # a rise smaller than this from the smallest share to all of it: a flat curve


def learning_curve(source, samples: list[Sample], class_names: list[str], num_features: int, model: ModelConfig,
                   recipe: TrainConfig, fitted: dict, *, groups: dict[str, int] | None = None,
                   progress: bool = False) -> dict | None:
    """{"metric", "folds", "points": [{"images_per_class", "score", "low", "high"}], "law": {"a", "b", "c"} or None,
    "extrapolated": [{"images_per_class", "score"}]}, or None where it cannot be measured (--no-cache: every fit
    would rerun the backbone; a class with fewer than two images per fold). progress: a bar over the folds."""
    if not isinstance(source, CachedFeatures):
        log.warning("--learning-curve fits on cached features: with --no-cache there is no learning curve")
        return None
    samples = [s for s in samples if s.path in source.train_rows]
    counts = np.bincount([s.label for s in samples], minlength=len(class_names))
    if counts.min() < 4:
        log.warning("--learning-curve: a class has fewer than 4 training images, too few to subsample")
        return None
    folds = kfold_samples(samples, int(min(MAX_FOLDS, counts.min())), recipe.seed, groups=groups)
    positive = model.positive_index(class_names)

    def score(fold: int) -> list[tuple[float, float]]:
        """(images per class, balanced accuracy) of each share of fold `fold`'s training part."""
        fit_on, held_out = folds[fold]
        truth, found = [s.label for s in held_out], []
        for part in nested_shares(fit_on, groups, recipe.seed + fold):
            head = fold_head(source, part, num_features, len(class_names), model, recipe, fitted, positive)
            predicted = held_out_probabilities(head, source, held_out).argmax(1)
            found.append((len(part) / len(class_names), balanced_accuracy_score(truth, predicted)))
        return found

    scored = list(tqdm(in_parallel(score, list(range(len(folds))), source, model.head), total=len(folds),
                       desc="learning curve", unit="fold", disable=not progress, leave=False))
    sizes, scores = np.transpose(np.array(scored), (2, 1, 0))  # each (shares, folds)
    points = [{"images_per_class": float(n), "score": float(mean), "low": float(low), "high": float(high)}
              for n, mean, (low, high) in zip(sizes.mean(1), scores.mean(1), map(interval, scores))]
    law = power_law(sizes.mean(1), 1 - scores.mean(1))
    full = len(samples) / len(class_names)
    extrapolated = [{"images_per_class": full * k, "score": float(1 - (law["a"] * (full * k) ** -law["b"]
                                                                         + law["c"]))} for k in SCALES] if law else []
    return {"metric": "balanced accuracy", "folds": len(folds), "points": points, "law": law,
            "extrapolated": extrapolated, "reading": reading(points, extrapolated)}


def reading(points: list[dict], extrapolated: list[dict]) -> str:
    """One sentence on what the curve says, for the log and the report."""
    first, last = points[0], points[-1]
    said = (f"balanced accuracy {first['score']:.3f} with {first['images_per_class']:.0f} training images per class, "
            f"{last['score']:.3f} with {last['images_per_class']:.0f}")
    if extrapolated:
        said += "; the power law's estimate: " + ", ".join(f"{p['score']:.3f} with {p['images_per_class']:.0f}"
                                                           for p in extrapolated)
    if last["score"] - first["score"] < FLAT:
        return said + (". The curve is flat: more photos like these are unlikely to raise it; photos of what it "
                       "gets wrong, or of a new source, may")
    return said + ". It is still rising: more photos like these should help"


def nested_shares(samples: list[Sample], groups: dict[str, int] | None, seed: int) -> list[list[Sample]]:
    """SHARES of `samples`, each class subsampled alike (at least two images) by whole duplicate groups, drawn in one
    seeded order so that each share holds the one before it."""
    rng = np.random.default_rng(seed)
    units: dict[int, dict] = {}  # label → {group key: [samples]}, in the order met
    for sample in samples:
        key = (groups or {}).get(str(sample.path), str(sample.path))
        units.setdefault(sample.label, {}).setdefault(key, []).append(sample)
    orders = {label: [list(by_key.values())[i] for i in rng.permutation(len(by_key))] for label, by_key in
              sorted(units.items())}
    shares = []
    for share in SHARES:
        part = []
        for label, ordered in orders.items():
            wanted, taken = max(2, math.ceil(share * sum(map(len, ordered)))), []
            for unit in ordered:
                if len(taken) >= wanted:
                    break
                taken += unit
            part += taken
        shares.append(part)
    return shares


def interval(values: np.ndarray) -> tuple[float, float]:
    """The mean's 95% t-interval over folds, within [0, 1]."""
    mean, spread = float(np.mean(values)), float(stats.sem(values)) if len(values) > 1 else 0.0
    half = float(stats.t.ppf(0.975, len(values) - 1)) * spread if spread > 0 else 0.0
    return max(0.0, mean - half), min(1.0, mean + half)


def power_law(sizes: np.ndarray, errors: np.ndarray) -> dict | None:
    """a, b, c of err(n) = a · n^-b + c (a ≥ 0, 0 ≤ b ≤ 3, 0 ≤ c ≤ 1) fit by least squares; None if it fails."""
    def law(n, a, b, c):
        return a * n ** -b + c

    try:
        (a, b, c), _ = curve_fit(law, sizes, errors, p0=(max(errors[0], 1e-3) * sizes[0] ** 0.5, 0.5, 0.0),
                                 bounds=([0, 0, 0], [np.inf, 3, 1]), maxfev=20000)
    except (RuntimeError, ValueError) as error:
        log.warning("the learning curve's power law did not fit (%s): no extrapolation", error)
        return None
    return {"a": float(a), "b": float(b), "c": float(c)}
