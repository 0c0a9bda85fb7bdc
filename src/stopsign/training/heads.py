"""The logistic head (`--head logistic`): multinomial logistic regression on standardised cached features, its C
chosen by grouped stratified K-fold on the training samples alone, folded into a plain nn.Linear.

A linear head on a few hundred frozen feature vectors is a convex problem: lbfgs solves it exactly in one go, so
there are no epochs, learning rates or schedules to tune, only the regularisation C. The fit is one "epoch" row
(lr None) so the run folder, the checkpoint and the report are those of an SGD run; the StandardScaler is folded
into the weights (W' = W / sigma, b' = b - W' mu), so the checkpoint's head takes raw features like any other.

With --pooling regions the head scores every region and an image takes its best (RegionLogistic): no longer convex,
so its fit starts from a convex problem's solution, and its C is chosen on the convex max-pooled problem (choose_c).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from scipy.special import expit, log_expit, logsumexp, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits
from torch import nn

from ..config import ModelConfig, TrainConfig, available_cores
from ..data.datasets import Sample, kfold_samples
from ..errors import StopsignError
from ..model.backbones import get_spec
from ..model.devices import torch_threads
from ..model.pooling import RegionHead, region_logits
from .results import FitResult
from .sources import CachedFeatures

log = logging.getLogger(__name__)

C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-3, 2.5, 0.5))  # 0.001 … 100, half a decade apart
MAX_ITER = 2000
EPSILON = float(np.finfo(np.float64).eps)  # sklearn.metrics.log_loss's clip
MAX_FOLDS = 5
# The regions head scores an image by the best of its regions: with little regularisation a negative's best region
# turns confidently positive, even where the max-pooled proxy is best at a larger C (bench/regions_fit.py and
# bench/heads.py measure it). So its C is chosen among the grid's values up to this one.
REGIONS_MAX_C = 1.0
# Fits at once, on any thread: the threshold's fold fits run beside the final fit (trainer.fit_and_save), and a
# third fit on two cores only slows the other two (each pass over the rows is bound by memory).
FIT_SLOTS = threading.BoundedSemaphore(available_cores())


def fit_logistic(source, num_features: int, num_classes: int, train_samples: list[Sample],
                 val_samples: list[Sample], model: ModelConfig, recipe: TrainConfig, *,
                 groups: dict[str, int] | None = None, on_epoch: Callable | None = None,
                 on_chosen: Callable[[dict], None] | None = None, positive: int | None = None) -> FitResult:
    """fit() for model.head == "logistic": the same FitResult, with one history row (epoch 1, lr None) that
    also records the chosen C ("C") and each grid value's mean held-out log-loss ("C_scores": [[C, loss]]).

    Every cached view of every readable training image is one row. C is chosen by K-fold over the training
    samples only (K = min(5, the smallest class's count), each image's views and each duplicate group of
    `groups` on one side); validation images are scored once, never used to choose anything. There is one fit:
    no epoch to keep, and a resumed run refits. on_chosen({"C", "class_weight"}) is called once they are chosen,
    before the final fit: work that needs only them (the threshold's fold fits) can run beside it.
    """
    if not isinstance(source, CachedFeatures):
        raise StopsignError("--head logistic fits on cached backbone features, and --no-cache recomputes them "
                            "every epoch instead. Fix: drop --no-cache, or use --head sgd with --no-cache")
    with head_threads(source):
        tick = time.perf_counter()
        readable = [s for s in train_samples if s.path in source.train_rows]
        present = sorted({s.label for s in readable})
        if len(present) < 2:
            raise StopsignError(f"--head logistic needs training images of at least two classes; the readable "
                                f"training images ({len(readable)}) have {len(present)}. Fix: add images of the "
                                "other classes, or check why they could not be read")
        features, labels = training_rows(source, readable)
        chosen, scores, weight = choose_c(source, readable, model, recipe, groups, positive)
        if on_chosen:
            on_chosen({"C": chosen, "class_weight": weight})
        pipeline = fit_model(features, labels, chosen, model, recipe.replace(class_weight=weight), positive=positive)
        head = folded_head(pipeline["scaler"], pipeline["classifier"], num_features, num_classes)

        train_logits = logits(head, features)
        train_loss, train_acc = scores_of(train_logits, labels)
        kept = [s for s in val_samples if s.path in source.val_rows] if val_samples else []
        val_probs, val_loss, val_acc = None, None, None
        if kept:
            val_features = source.val_features[np.array([source.val_rows[s.path] for s in kept], dtype=np.int64)]
            val_logits = logits(head, val_features)
            val_loss, val_acc = scores_of(val_logits, np.array([s.label for s in kept], dtype=np.int64))
            val_probs = val_logits.softmax(1).numpy()
        row = dict(epoch=1, lr=None, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                   seconds=round(time.perf_counter() - tick, 4), C=chosen, C_scores=[[c, s] for c, s in scores],
                   class_weight=weight)
        log.debug("logistic head: C=%g, class weight %s, chosen from %s (mean held-out log-loss)", chosen, weight,
                  ", ".join(f"{c:g}: {s:.4f}" for c, s in scores))
        if on_epoch:
            weights = {k: v.clone() for k, v in head.state_dict().items()}
            on_epoch(row, {"head": head.state_dict(), "history": [row], "best": row, "best_head": weights,
                           "optimizer": {}, "scheduler": {}})
        return FitResult([row], row, head, kept, val_probs)


@contextmanager
def head_threads(source):
    """The logistic head's fits' threads: torch's as the source asks, and one BLAS thread (the fits multiply
    matrices of a few hundred rows, where more threads only wait on each other: bench/bench_speed.py, warm). Both
    are process-wide, so fits on several threads at once run inside one such block around them all, or the
    first to end would change the others' settings mid-fit."""
    with torch_threads(source.threads), threadpool_limits(1, user_api="blas"):
        yield


def in_parallel(function, items: list, source, head: str):
    """map(function, items): a logistic head's fits (its folds) on a thread per core, inside one head_threads block;
    they spend their time in numpy and scipy, which release the GIL, and only read the cached features
    (bench/bench_speed.py, warm). An SGD head's fits share the source's batch state: one at a time."""
    if head != "logistic" or len(items) < 2:
        yield from map(function, items)
        return
    with head_threads(source), ThreadPoolExecutor(min(len(items), available_cores())) as pool:
        yield from pool.map(function, items)


def training_rows(source: CachedFeatures, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(n * views, F) features and their labels: each cached view of each sample, a sample's views adjacent."""
    if not samples:
        return np.zeros((0, source.train_features.shape[2]), np.float32), np.zeros(0, np.int64)
    rows = np.array([source.train_rows[s.path] for s in samples], dtype=np.int64)
    block = np.asarray(source.train_features[rows])  # (n, views, F)
    views = block.shape[1]
    return block.reshape(len(samples) * views, block.shape[2]), np.repeat([s.label for s in samples], views)


def choose_c(source: CachedFeatures, samples: list[Sample], model: ModelConfig, recipe: TrainConfig,
             groups: dict[str, int] | None, positive: int | None = None
             ) -> tuple[float, list[tuple[float, float]], str]:
    """The grid's C with the lowest mean held-out log-loss over a grouped stratified K-fold of `samples` (ties to
    the smaller C), every grid value's score, and the class weight fit with. With a class of one image there is
    nothing to hold out: C = 1.

    recipe.class_weight "auto": the folds fit both weights, none and balanced, each scored by the class-balanced
    log-loss (the mean of each class's mean, which balanced accuracy's goal asks for, and which a plain log-loss,
    dominated by the larger class, would not); the weight and C with the lowest win, ties to none.

    With --pooling regions, C is chosen for the max-pooled logistic regression of the same rows (the best region's
    features, a convex problem, a twentieth of the width) over the grid up to REGIONS_MAX_C, and the regions head is
    fit once at that C:
    bench/heads.py measured this choice as good as choosing by the regions head itself, on grouped
    cross-validation, on photos of another source and at 1:4 and 1:9 imbalance, at a fraction of the fits.

    Hand-written rather than GridSearchCV: each fold walks the grid from the smallest C with warm starts, and a
    class a fold's part lacks gets probability 0 in the log-loss. GridSearchCV over the same folds refits every C
    from scratch and chose the same C, at more than the 1.5× the time that would have justified it."""
    present = sorted({s.label for s in samples})
    smallest = int(min(np.bincount([s.label for s in samples])[present]))
    weights = ("none", "balanced") if recipe.class_weight == "auto" else (recipe.class_weight,)
    if smallest < 2:
        log.warning("a class has a single training image, too few to choose C by cross-validation: "
                    "the logistic head uses C = 1")
        return 1.0, [], weights[0]
    folds = kfold_samples(samples, min(MAX_FOLDS, smallest), recipe.seed, groups=groups)
    regions = model.pooling == "regions"
    grid = [c for c in C_GRID if c <= REGIONS_MAX_C] if regions else C_GRID  # no larger C is fit: none is scored
    losses = np.zeros((len(weights), len(grid), len(folds)))
    proxy = model.replace(pooling="max") if regions else model
    pooled, truth = pooled_rows(training_rows(source, samples), model)  # once: each fold's rows are some of them
    views, at = len(pooled) // len(samples), {s.path: i for i, s in enumerate(samples)}
    for fold, (fit_on, held_out) in enumerate(folds):
        (x, y), (x_held, y_held) = ((pooled[rows], truth[rows]) for rows in (
            (np.array([at[s.path] for s in part])[:, None] * views + np.arange(views)).ravel()
            for part in (fit_on, held_out)))
        scaler = make_model(proxy, recipe, grid[0], positive)["scaler"]  # the same for either class weight
        x, x_held = scaler.fit_transform(x), scaler.transform(x_held)
        for w, weight in enumerate(weights):
            classifier = make_model(proxy, recipe.replace(class_weight=weight), grid[0], positive,
                                    warm_start=True)["classifier"]
            for i, c in enumerate(grid):
                fit_quietly(classifier.set_params(C=c), x, y)
                losses[w, i, fold] = held_out_log_loss(classifier, x_held, y_held, balanced=len(weights) > 1)
    mean = losses.mean(axis=2)
    w = int(np.unravel_index(np.argmin(mean), mean.shape)[0])  # the first of equal scores: none, the smaller C
    scores = [(c, float(loss)) for c, loss in zip(grid, mean[w])]
    return min(scores, key=lambda pair: pair[1])[0], scores, weights[w]


def held_out_log_loss(classifier, x: np.ndarray, y: np.ndarray, balanced: bool = False) -> float:
    """The mean log-loss of `classifier` on (x, y), or with `balanced` the mean over classes of each class's mean;
    a class its fit lacked has probability 0, clipped as scikit-learn's log_loss clips it (which costs more in
    parameter checks than the fit, on these small folds)."""
    probs = np.zeros((len(y), max(int(y.max()), int(classifier.classes_.max())) + 1))
    probs[:, classifier.classes_] = classifier.predict_proba(x)
    losses = -np.log(np.clip(probs[np.arange(len(y)), y], EPSILON, 1))
    return float(np.mean([losses[y == k].mean() for k in np.unique(y)]) if balanced else losses.mean())


def pooled_rows(rows: tuple[np.ndarray, np.ndarray], model: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rows of --pooling regions as --pooling max would have them (the max over the regions, which tile the
    feature map: the map's max, of every tile); other rows as they are."""
    features, labels = rows
    if model.pooling != "regions":
        return features, labels
    width = get_spec(model.backbone).feature_size
    return features.reshape(len(features), -1, width).max(axis=1), labels


def make_model(model: ModelConfig, recipe: TrainConfig, c: float, positive: int | None = None,
               warm_start: bool = False) -> Pipeline:
    """The logistic head as a scikit-learn pipeline (scaler, classifier): StandardScaler and LogisticRegression
    (lbfgs, multinomial for more than two classes), or with --pooling regions RegionScaler and RegionLogistic, the
    same objective with an image scored by its best region (`positive`: see RegionHead)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    class_weight = "balanced" if recipe.class_weight == "balanced" else None
    if model.pooling == "regions":
        width = get_spec(model.backbone).feature_size
        return Pipeline([("scaler", RegionScaler(width)),
                         ("classifier", RegionLogistic(c, width, class_weight, positive, warm_start))])
    return Pipeline([("scaler", StandardScaler()), ("classifier", LogisticRegression(
        C=c, max_iter=MAX_ITER, class_weight=class_weight, warm_start=warm_start))])


def fit_quietly(model, features: np.ndarray, labels: np.ndarray) -> bool:
    """Fit the model (a pipeline or a classifier); whether its solver converged (scikit-learn's
    ConvergenceWarning, or RegionLogistic.converged_)."""
    from sklearn.exceptions import ConvergenceWarning

    with FIT_SLOTS, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, labels)
    classifier = model[-1] if isinstance(model, Pipeline) else model
    return getattr(classifier, "converged_", not any(issubclass(w.category, ConvergenceWarning) for w in caught))


def fit_model(features: np.ndarray, labels: np.ndarray, c: float, model: ModelConfig, recipe: TrainConfig, *,
              positive: int | None = None) -> Pipeline:
    """The logistic head fit on the rows at this C, with a warning when its solver did not converge."""
    pipeline = make_model(model, recipe, c, positive)
    if not fit_quietly(pipeline, features, labels):
        log.warning("the logistic head's solver did not converge at C=%g (%d iterations at most, or it never left "
                    "its start); its weights are the last iterate", c, MAX_ITER)
    return pipeline


class RegionScaler(TransformerMixin, BaseEstimator):
    """StandardScaler for --pooling regions: one mean and scale per backbone feature, shared by every region of
    a row (R × width features), so that the folded head scores each region alike."""

    def __init__(self, width: int = 1):
        self.width = width

    def fit(self, features: np.ndarray, labels=None) -> "RegionScaler":
        regions = np.asarray(features, dtype=np.float32).reshape(-1, self.width)  # summed in float64
        self.mean_ = regions.mean(axis=0, dtype=np.float64)
        deviations = regions - self.mean_.astype(np.float32)
        self.scale_ = np.sqrt(np.square(deviations, out=deviations).mean(axis=0, dtype=np.float64))
        self.scale_[self.scale_ == 0] = 1.0  # a constant feature, as StandardScaler leaves it
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        rows = np.asarray(features, dtype=np.float32).reshape(len(features), -1, self.width)
        return ((rows - self.mean_.astype(np.float32)) / self.scale_.astype(np.float32)).reshape(len(features), -1)


class RegionLogistic(ClassifierMixin, BaseEstimator):
    """Logistic regression of images by their regions (RegionHead's forward), fit by L-BFGS on scikit-learn's
    objective, C · Σ loss + ½‖W‖², as a scikit-learn estimator: fit, predict_proba, classes_, coef_, intercept_,
    and warm_start (a refit with another C starts from the last solution).

    With a positive class among two: one weight vector, an image's log-odds the largest of its regions' (coef_
    holds the log-odds of classes_[1], as scikit-learn's binary model does). Otherwise each class's logit is its
    largest over the regions (coef_: one row per class).

    The max makes the problem non-convex, and zero weights are a trap: there every region ties, the gradient is
    the regions' average, and along it the max picks whichever region rises, so every line-search step can raise
    the loss and the solver stops where it began, every photo at the class prior. The fit therefore starts from
    a convex problem's solution: a logistic regression of every region labelled as its image (bench/heads.py
    compares starts: this one held up best on photos of another source and on other signs). It is deterministic.
    converged_ is true only when the solver moved from that start and met its tolerance."""

    def __init__(self, C: float = 1.0, width: int = 1, class_weight: str | None = None, positive: int | None = None,
                 warm_start: bool = False, tol: float = 1e-4):
        self.C, self.width, self.class_weight, self.positive, self.warm_start, self.tol = C, width, class_weight, \
            positive, warm_start, tol

    def _regions(self, features) -> np.ndarray:
        return np.asarray(features, dtype=np.float32).reshape(len(features), -1, self.width)

    def _starts(self, regions: np.ndarray, targets: np.ndarray, two: bool):
        """The weights to start from, best first: the last fit's (warm_start), then two convex problems'
        solutions: every region labelled as its image (at C / regions: the same total weight), and the regions'
        max-pooled features, whose max breaks a symmetry the first cannot (regions whose average says nothing)."""
        from sklearn.linear_model import LogisticRegression

        if self.warm_start and getattr(self, "_weight", np.zeros(0)).shape[0] == (1 if two else len(self.classes_)):
            yield self._weight, self._bias
        count = regions.shape[1]
        problems = [(self.C / count, regions.reshape(-1, self.width), np.repeat(targets, count)),
                    (self.C, regions.max(axis=1), targets)]
        for c, features, labels in problems:
            convex = LogisticRegression(C=c, max_iter=MAX_ITER, class_weight=self.class_weight)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a start, refined by fit: its own convergence does not matter
                convex.fit(features, labels)
            coef, intercept = convex.coef_, convex.intercept_
            if not two and len(self.classes_) == 2:  # scikit-learn's one binary row: a row per class, ±half of it
                coef, intercept = np.vstack([-coef / 2, coef / 2]), np.hstack([-intercept / 2, intercept / 2])
            yield coef, intercept

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "RegionLogistic":
        classes = np.unique(labels)
        two = len(classes) == 2 and self.positive in classes
        if hasattr(self, "classes_") and not np.array_equal(classes, self.classes_):
            self.__dict__.pop("_weight", None)  # another problem: nothing to warm-start from
        self.classes_, self.positive_ = classes, (self.positive if two else None)
        targets = np.searchsorted(self.classes_, labels)
        counts = np.bincount(targets, minlength=len(self.classes_))
        sample_weight = (len(targets) / (len(counts) * counts))[targets] if self.class_weight == "balanced" \
            else np.ones(len(targets))
        regions = self._regions(features)
        truth = (np.asarray(labels) == self.positive).astype(np.float64) if two else targets
        shares = np.bincount(targets, weights=sample_weight) / sample_weight.sum()
        prior = float(-(sample_weight * np.log(shares[targets])).mean())  # the best constant's loss
        for start in self._starts(regions, truth.astype(np.int64) if two else targets, two):
            weight, bias, self.n_iter_, solved, loss = self._solve(regions, truth, sample_weight, start, two)
            # stuck: a stationary point no better than the prior (as where every region ties), or a solver that
            # stopped where it began without meeting its tolerance: then the next start
            moved = not np.array_equal(weight, np.asarray(start[0], dtype=np.float64))
            stuck = (not moved and not solved) or loss >= prior - 1e-6
            self.converged_ = not stuck and self.n_iter_ < MAX_ITER
            if not stuck:
                break
        self._weight, self._bias = weight, bias
        sign = -1.0 if two and self.positive == self.classes_[0] else 1.0  # coef_: the log-odds of classes_[1]
        self.coef_, self.intercept_ = sign * self._weight, sign * self._bias
        return self

    def _solve(self, regions: np.ndarray, truth: np.ndarray, sample_weight: np.ndarray, start: tuple, two: bool
               ) -> tuple[np.ndarray, np.ndarray, int, bool, float]:
        """scipy's L-BFGS-B on the objective from `start`: the weights, the bias, the iterations, whether it met
        its tolerance, and the weighted training loss without the penalty."""
        from scipy.optimize import minimize

        weight, bias = (np.asarray(value, dtype=np.float64) for value in start)
        classes = len(bias)
        penalty = 1.0 / (2 * self.C * len(truth))  # sklearn's objective divided by C · n
        flat = regions.reshape(-1, self.width)
        result = minimize(region_objective, np.concatenate([weight.ravel(), bias]), jac=True, method="L-BFGS-B",
                          args=(flat, len(truth), truth, sample_weight, penalty, classes, two),
                          options=dict(maxiter=MAX_ITER, gtol=self.tol, ftol=self.tol / 1000, maxcor=20))
        weight, bias = result.x[:-classes].reshape(classes, self.width), result.x[-classes:]
        loss = region_objective(result.x, flat, len(truth), truth, sample_weight, 0.0, classes, two)[0]
        return weight, bias, int(result.nit), bool(result.success), loss

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = region_logits(torch.from_numpy(self._regions(features)), torch.from_numpy(self._weight).float(),
                                   torch.from_numpy(self._bias).float(), self.positive_ is not None).double()
        if self.positive_ is None:
            return logits.softmax(dim=1).numpy()
        odds = torch.sigmoid(logits).numpy()
        return np.stack([1 - odds, odds] if self.positive_ == self.classes_[1] else [odds, 1 - odds], axis=1)


def region_objective(params: np.ndarray, flat: np.ndarray, count: int, truth: np.ndarray, sample_weight: np.ndarray,
                     penalty: float, classes: int, binary: bool) -> tuple[float, np.ndarray]:
    """RegionLogistic's objective and its gradient, as scipy's L-BFGS-B takes them: the weighted mean log-loss of
    RegionHead's forward (model/pooling.region_logits: each class's logit its best region's score; `binary`, one
    row of log-odds) plus penalty · ‖W‖². `params` is W (classes × width) then the biases; `flat` the regions
    (count × R, width), an image's R adjacent. The gradient of a max is its winning region's: a tie takes the first.
    One matrix-vector product per class, on one BLAS thread (fit_logistic sets it): the rows are few and wide."""
    width = flat.shape[1]
    weight, bias = params[:-classes].reshape(classes, width), params[-classes:]
    scores = np.stack([flat @ row for row in weight.astype(np.float32)], axis=1).reshape(count, -1, classes)
    winners = scores.argmax(axis=1)  # (count, classes)
    logit = np.take_along_axis(scores, winners[:, None], axis=1)[:, 0] + bias
    if binary:
        logit = logit[:, 0]
        losses = -(truth * log_expit(logit) + (1 - truth) * log_expit(-logit))
        slope = ((expit(logit) - truth) * sample_weight / count)[:, None]
    else:
        rows = np.arange(count)
        losses = logsumexp(logit, axis=1) - logit[rows, truth]
        slope = softmax(logit, axis=1)
        slope[rows, truth] -= 1
        slope *= (sample_weight / count)[:, None]
    rows = np.arange(count)[:, None] * (len(flat) // count) + winners  # each winner's row of `flat`
    gradient = np.stack([slope[:, k].astype(np.float32) @ flat[rows[:, k]] for k in range(classes)])
    loss = float((losses * sample_weight).mean() + penalty * np.square(weight).sum())
    return loss, np.concatenate([(gradient + 2 * penalty * weight).ravel(), slope.sum(axis=0)])


def folded_head(scaler, model, num_features: int, num_classes: int) -> nn.Linear:
    """An nn.Linear (a RegionHead for RegionLogistic) on raw features whose softmax is the model's predict_proba on
    standardised ones.

    Two classes: sklearn keeps one weight vector w (the log-odds of classes_[1]); logits (-z/2, +z/2) have
    softmax sigmoid(z). A class the training images lack gets zero weights and a bias of -1e4: probability 0."""
    coef, intercept = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
    if len(model.classes_) == 2 and coef.shape[0] == 1:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / scaler.scale_  # W' = W / sigma
    bias = intercept - weight @ scaler.mean_  # b' = b - W' mu
    full_weight = np.zeros((num_classes, num_features))
    full_bias = np.full(num_classes, -1e4)
    full_weight[model.classes_], full_bias[model.classes_] = weight, bias
    head = RegionHead(num_features, num_classes, model.positive_) if isinstance(model, RegionLogistic) \
        else nn.Linear(num_features, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(full_weight))
        head.bias.copy_(torch.from_numpy(full_bias))
    return head


@torch.no_grad()
def logits(head: nn.Linear, features: np.ndarray) -> torch.Tensor:
    return head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))


def scores_of(logit: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy (unweighted) and accuracy."""
    targets = torch.from_numpy(labels)
    return nn.functional.cross_entropy(logit, targets).item(), (logit.argmax(1) == targets).sum().item() / len(labels)
