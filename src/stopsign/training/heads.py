"""The logistic head (`--head logistic`): multinomial logistic regression on standardised cached features, its C
chosen by grouped stratified K-fold on the training samples alone, folded into a plain nn.Linear.

A linear head on a few hundred frozen feature vectors is a convex problem: lbfgs solves it exactly in one go, so
there are no epochs, learning rates or schedules to tune, only the regularisation C. The fit is one "epoch" row
(lr None) so the run folder, the checkpoint and the report are those of an SGD run; the StandardScaler is folded
into the weights (W' = W / sigma, b' = b - W' mu), so the checkpoint's head takes raw features like any other.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.datasets import Sample, kfold_samples
from ..errors import StopsignError
from ..model.backbones import RegionHead, get_spec
from .fitting import FitResult, torch_threads
from .sources import CachedFeatures

log = logging.getLogger(__name__)

C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-3, 2.5, 0.5))  # 0.001 … 100, half a decade apart
MAX_ITER = 2000
MAX_FOLDS = 5


def fit_logistic(source, num_features: int, num_classes: int, train_samples: list[Sample],
                 val_samples: list[Sample], config: TrainConfig, *, groups: dict[str, int] | None = None,
                 on_epoch: Callable | None = None, positive: int | None = None, **ignored) -> FitResult:
    """fit() for config.head == "logistic": the same FitResult, with one history row (epoch 1, lr None) that
    also records the chosen C ("C") and each grid value's mean held-out log-loss ("C_scores": [[C, loss]]).

    Every cached view of every readable training image is one row. C is chosen by K-fold over the training
    samples only (K = min(5, the smallest class's count), each image's views and each duplicate group of
    `groups` on one side); validation images are scored once, never used to choose anything. keep, state
    and progress are accepted and ignored: there is one fit, and a resumed run refits.
    """
    if not isinstance(source, CachedFeatures):
        raise StopsignError("--head logistic fits on cached backbone features, and --no-cache recomputes them "
                            "every epoch instead. Fix: drop --no-cache, or use --head sgd with --no-cache")
    with torch_threads(source.threads):
        tick = time.perf_counter()
        readable = [s for s in train_samples if s.path in source.train_rows]
        present = sorted({s.label for s in readable})
        if len(present) < 2:
            raise StopsignError(f"--head logistic needs training images of at least two classes; the readable "
                                f"training images ({len(readable)}) have {len(present)}. Fix: add images of the "
                                "other classes, or check why they could not be read")
        features, labels = training_rows(source, readable)
        chosen, scores = choose_c(source, readable, config, groups, positive)
        scaler, model = fit_model(features, labels, chosen, config, positive=positive)
        head = folded_head(scaler, model, num_features, num_classes)

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
                   seconds=round(time.perf_counter() - tick, 4), C=chosen, C_scores=[[c, s] for c, s in scores])
        log.debug("logistic head: C=%g chosen from %s (mean held-out log-loss)", chosen,
                  ", ".join(f"{c:g}: {s:.4f}" for c, s in scores))
        if on_epoch:
            weights = {k: v.clone() for k, v in head.state_dict().items()}
            on_epoch(row, {"head": head.state_dict(), "history": [row], "best": row, "best_head": weights,
                           "optimizer": {}, "scheduler": {}})
        return FitResult([row], row, head, kept, val_probs)


def training_rows(source: CachedFeatures, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(n * views, F) features and their labels: each cached view of each sample, a sample's views adjacent."""
    if not samples:
        return np.zeros((0, source.train_features.shape[2]), np.float32), np.zeros(0, np.int64)
    rows = np.array([source.train_rows[s.path] for s in samples], dtype=np.int64)
    block = np.asarray(source.train_features[rows])  # (n, views, F)
    views = block.shape[1]
    return block.reshape(len(samples) * views, block.shape[2]), np.repeat([s.label for s in samples], views)


def choose_c(source: CachedFeatures, samples: list[Sample], config: TrainConfig,
             groups: dict[str, int] | None, positive: int | None = None) -> tuple[float, list[tuple[float, float]]]:
    """The grid's C with the lowest mean held-out log-loss over a grouped stratified K-fold of `samples` (ties to
    the smaller C), and every grid value's score. With a class of one image there is nothing to hold out: C = 1."""
    from sklearn.metrics import log_loss

    present = sorted({s.label for s in samples})
    smallest = int(min(np.bincount([s.label for s in samples])[present]))
    if smallest < 2:
        log.warning("a class has a single training image, too few to choose C by cross-validation: "
                    "the logistic head uses C = 1")
        return 1.0, []
    folds = kfold_samples(samples, min(MAX_FOLDS, smallest), config.seed, groups=groups)
    data = [(training_rows(source, fit_on), training_rows(source, held_out)) for fit_on, held_out in folds]
    losses = np.zeros((len(C_GRID), len(data)))
    for fold, ((x, y), (x_held, y_held)) in enumerate(data):
        model = None
        for i, c in enumerate(C_GRID):  # each fit starts from the last (the regions head's L-BFGS: a warm start)
            scaler, model = fit_model(x, y, c, config, quiet=True, start=model, positive=positive)
            probs = np.zeros((len(y_held), len(present)))  # a class this part lacks: probability 0
            probs[:, np.searchsorted(present, model.classes_)] = model.predict_proba(scaler.transform(x_held))
            losses[i, fold] = log_loss(y_held, probs, labels=present)
    scores = [(c, float(loss)) for c, loss in zip(C_GRID, losses.mean(axis=1))]
    best = min(scores, key=lambda pair: pair[1])  # the first of equal scores: the smaller C
    return best[0], scores


def fit_model(features: np.ndarray, labels: np.ndarray, c: float, config: TrainConfig, *, quiet: bool = False,
              start=None, positive: int | None = None):
    """(StandardScaler, LogisticRegression) fit on the rows; lbfgs, multinomial for more than two classes.
    With --pooling regions, (RegionScaler, RegionLogistic): the same objective, an image scored by its best
    region (`positive`: see RegionHead), its L-BFGS started from `start` (a RegionLogistic fit on the same rows
    with another C) when given."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if config.pooling == "regions":
        width = get_spec(config.backbone).feature_size
        scaler = RegionScaler(width).fit(features)
        model = RegionLogistic(c, width, config.class_weight == "balanced", positive)
        model.fit(scaler.transform(features), labels, start=start)
        if not quiet and not model.converged_:
            log.warning("the logistic head did not converge in %d L-BFGS iterations (C=%g); its weights are the "
                        "last iterate", MAX_ITER, c)
        return scaler, model
    features = np.asarray(features, dtype=np.float64)
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=c, max_iter=MAX_ITER,
                               class_weight="balanced" if config.class_weight == "balanced" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(scaler.transform(features), labels)
    if not quiet and any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("the logistic head did not converge in %d lbfgs iterations (C=%g); its weights are the last "
                    "iterate", MAX_ITER, c)
    return scaler, model


class RegionScaler:
    """StandardScaler for --pooling regions: one mean and scale per backbone feature, shared by every region of
    a row (R × width features), so that the folded head scores each region alike."""

    def __init__(self, width: int):
        self.width = width

    def fit(self, features: np.ndarray) -> "RegionScaler":
        regions = np.asarray(features, dtype=np.float64).reshape(-1, self.width)
        self.mean_, self.scale_ = regions.mean(axis=0), regions.std(axis=0)
        self.scale_[self.scale_ == 0] = 1.0  # a constant feature, as StandardScaler leaves it
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        rows = np.asarray(features, dtype=np.float32).reshape(len(features), -1, self.width)
        return ((rows - self.mean_.astype(np.float32)) / self.scale_.astype(np.float32)).reshape(len(features), -1)


class RegionLogistic:
    """Logistic regression of images by their regions (RegionHead's forward), fit by L-BFGS on scikit-learn's
    objective, C · Σ loss + ½‖W‖², with its interface: fit, predict_proba, classes_, coef_, intercept_.

    With a positive class among two: one weight vector, an image's log-odds the largest of its regions' (coef_
    holds the log-odds of classes_[1], as scikit-learn's binary model does). Otherwise each class's logit is its
    largest over the regions (coef_: one row per class). The max makes the problem non-convex; the fit starts
    from zero weights (or from `start`'s), so it is deterministic."""

    def __init__(self, c: float, width: int, balanced: bool = False, positive: int | None = None):
        self.c, self.width, self.balanced, self.positive = c, width, balanced, positive

    def _regions(self, features) -> torch.Tensor:
        return torch.as_tensor(np.asarray(features, dtype=np.float32)).reshape(len(features), -1, self.width)

    def _logits(self, regions: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(N, K) per-class logits, or with a positive class (N,) log-odds of it."""
        scores = (regions @ weight.T + bias).amax(dim=1)
        return scores[:, 0] if self.positive_ is not None else scores

    def fit(self, features: np.ndarray, labels: np.ndarray, start: "RegionLogistic | None" = None
            ) -> "RegionLogistic":
        self.classes_ = np.unique(labels)
        two = len(self.classes_) == 2 and self.positive in self.classes_
        self.positive_ = self.positive if two else None
        targets = torch.from_numpy(np.searchsorted(self.classes_, labels))
        counts = torch.bincount(targets, minlength=len(self.classes_)).float()
        sample_weight = (len(targets) / (len(counts) * counts))[targets] if self.balanced \
            else torch.ones(len(targets))
        regions = self._regions(features)
        rows = 1 if two else len(self.classes_)
        weight, bias = torch.zeros(rows, self.width), torch.zeros(rows)
        if start is not None and np.array_equal(start.classes_, self.classes_) and start.positive_ == self.positive_:
            weight, bias = torch.from_numpy(start._weight).float(), torch.from_numpy(start._bias).float()
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        solver = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, tolerance_grad=1e-4, tolerance_change=1e-7,
                                   history_size=20, line_search_fn="strong_wolfe")
        penalty = 1.0 / (2 * self.c * len(targets))  # sklearn's objective divided by C · n
        is_positive = torch.from_numpy(np.asarray(labels) == self.positive).float() if two else None

        def objective():
            solver.zero_grad()
            logits = self._logits(regions, weight, bias)
            losses = (nn.functional.binary_cross_entropy_with_logits(logits, is_positive, reduction="none") if two
                      else nn.functional.cross_entropy(logits, targets, reduction="none"))
            loss = (losses * sample_weight).mean() + penalty * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            solver.step(objective)
        self.converged_ = solver.state[weight].get("n_iter", 0) < MAX_ITER
        self._weight, self._bias = weight.detach().double().numpy(), bias.detach().double().numpy()
        sign = -1.0 if two and self.positive == self.classes_[0] else 1.0  # coef_: the log-odds of classes_[1]
        self.coef_, self.intercept_ = sign * self._weight, sign * self._bias
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self._logits(self._regions(features), torch.from_numpy(self._weight).float(),
                                  torch.from_numpy(self._bias).float()).double()
        if self.positive_ is None:
            return logits.softmax(dim=1).numpy()
        odds = torch.sigmoid(logits).numpy()
        return np.stack([1 - odds, odds] if self.positive_ == self.classes_[1] else [odds, 1 - odds], axis=1)


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
