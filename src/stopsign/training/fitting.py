"""The recipe (optimizer, schedulers) and the one epoch loop, fit(), that training, cross-validation and
tuning share. Its batches come from a source (training/sources.py): cached features or live images.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import SCHEDULER_NAMES, ModelConfig, TrainConfig
from ..data.datasets import Sample
from ..errors import StopsignError
from ..model.pooling import make_head
from ..model.devices import torch_threads
from .results import FitResult

log = logging.getLogger(__name__)


def learned_nothing(result: FitResult, train_samples: list[Sample], model: ModelConfig, recipe: TrainConfig
                    ) -> str | None:
    """Why the head is no better than the class prior, or None: its training log-loss (and, for the logistic
    head, the held-out log-loss of its chosen C) not below the prior's. A head stuck at the prior answers every
    photo with the class shares, and its accuracy is the majority class's; this says so instead of "converged".

    With --class-weight balanced the SGD loss is weighted, and the weighted prior is uniform: log K."""
    counts = np.bincount([s.label for s in train_samples])
    shares = counts[counts > 0] / counts.sum()
    weighted = model.head == "sgd" and recipe.class_weight == "balanced"
    prior = float(np.log(len(shares)) if weighted else -(shares * np.log(shares)).sum())
    held_out = min((loss for _, loss in result.best.get("C_scores") or []), default=None)
    # --class-weight auto scores C by the class-balanced log-loss, whose prior is the mean of each class's -log share
    held_prior = float(-np.log(shares).mean()) if recipe.class_weight == "auto" else prior
    fix = ("Fix: check the labels; try --pooling max (a convex fit) or --class-weight balanced; with --head sgd, "
           "more --epochs or a higher --lr-max")
    if result.best["train_loss"] >= prior - 1e-4:
        return (f"the head learned nothing: its training log-loss {result.best['train_loss']:.4f} is not below the "
                f"class prior's {prior:.4f}, so it answers every photo with the class shares. {fix}")
    if held_out is not None and held_out >= held_prior - 1e-4:
        return (f"the head is no better than the class prior out of fold: held-out log-loss {held_out:.4f} against "
                f"the prior's {held_prior:.4f}. {fix}")
    return None


# --- the recipe -------------------------------------------------------------------------------------------

SCHEDULERS: dict[str, Callable] = {
    # cycle_momentum off: the recipe's momentum is 0.9 throughout, not cycled against the LR.
    "triangular2": lambda optimizer, c: torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=c.lr_base, max_lr=c.lr_max, step_size_up=rising_epochs(c), mode="triangular2",
        cycle_momentum=False),
    "cosine": lambda optimizer, c: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, c.epochs), eta_min=c.lr_base),
    "constant": lambda optimizer, c: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0),
}


def rising_epochs(recipe: TrainConfig) -> int:
    """Epochs of the cycle's rising half: cycle_epochs, shortened to fit when training is shorter than one whole
    cycle (rise and fall), so that the learning rate reaches lr_max and comes back down. The seed recipe (10 epochs,
    5 up and 5 down) is unchanged; 3 epochs rise over 1 instead of ending at a third of the way up."""
    return max(1, min(recipe.cycle_epochs, recipe.epochs // 2))


assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "config.SCHEDULER_NAMES must list fitting.SCHEDULERS"


def make_optimizer(head: nn.Module, recipe: TrainConfig):
    if recipe.scheduler not in SCHEDULERS:
        raise StopsignError(f"unknown scheduler {recipe.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    optimizer = torch.optim.SGD(head.parameters(), lr=recipe.lr_max, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    return optimizer, SCHEDULERS[recipe.scheduler](optimizer, recipe)


def train_one_epoch(model: nn.Module, batches, criterion, optimizer) -> tuple[float, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, targets in batches:
        optimizer.zero_grad()
        logits = model(inputs)
        loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, batches, criterion) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and class probabilities (N, C) in the order of the batches."""
    model.eval()
    total_loss, correct, seen, probs = 0.0, 0, 0, []
    for inputs, targets in batches:
        logits = model(inputs)
        total_loss += criterion(logits, targets).item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        probs.append(logits.softmax(1))
    return total_loss / max(seen, 1), correct / max(seen, 1), torch.cat(probs).cpu().numpy() if probs else None


def is_better(row: dict, best: dict | None) -> bool:
    """Highest validation accuracy; ties go to the lower validation loss. Without validation: the latest."""
    if best is None or row["val_acc"] is None:
        return True
    return (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])


# --- the epoch loop -----------------------------------------------------------------------------------------

AUTO_NEEDS_LOGISTIC = ("--class-weight auto is chosen by the logistic head's K-fold, and --head sgd has none. Fix: "
                       "--class-weight none or balanced with --head sgd, or drop --head sgd")


def class_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """The "balanced" weights: n / (num_classes * count_c) for each class c over `samples`' labels (0 for a class
    with none), so every class weighs as much in the loss as if the classes were equally common."""
    counts = np.bincount([s.label for s in samples], minlength=num_classes)[:num_classes]
    weights = np.divide(len(samples), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def make_criterion(recipe: TrainConfig, train_samples: list[Sample], num_classes: int) -> nn.CrossEntropyLoss:
    """The training loss: cross-entropy, weighted by class when recipe.class_weight is "balanced"."""
    if recipe.class_weight == "balanced":
        return nn.CrossEntropyLoss(weight=class_weights(train_samples, num_classes),
                                   label_smoothing=recipe.label_smoothing)
    if recipe.class_weight == "auto":
        raise StopsignError(AUTO_NEEDS_LOGISTIC)
    if recipe.class_weight != "none":
        raise StopsignError(f"unknown class weight {recipe.class_weight!r}; choose none, balanced or auto")
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def fit(source, num_features: int, num_classes: int, train_samples: list[Sample], val_samples: list[Sample],
        model: ModelConfig, recipe: TrainConfig, *, keep: str = "best", state: dict | None = None,
        on_epoch: Callable | None = None, progress: bool = False, groups: dict[str, int] | None = None,
        positive: int | None = None, on_chosen: Callable[[dict], None] | None = None) -> FitResult:
    """Train a new head for recipe.epochs epochs and keep its best epoch, or its last (`keep="last"`, and
    always without validation images): cross-validation must not choose epochs on its held-out fold.

    `state` resumes from a checkpoint's head/optimizer/scheduler/history; `on_epoch(row, state)` is called
    after each epoch with everything needed to resume. Each epoch's randomness comes from (seed, epoch),
    so a resumed run draws exactly what an uninterrupted one would.

    model.head == "logistic" fits the head by logistic regression instead (training/heads.py), choosing C by
    K-fold over the training samples that keeps each of `groups` (duplicate groups) on one side, and calls
    `on_chosen` with them before its final fit (heads.fit_logistic); the SGD recipe ignores groups and on_chosen.
    With recipe.class_weight == "balanced" the training loss weighs each class by n / (classes * count); the
    validation loss stays unweighted, comparable across runs. `positive`: the positive class of two-class data
    (model.positive_index), which a --pooling regions head scores regions by.
    """
    if model.head == "logistic":
        from .heads import fit_logistic  # scikit-learn's solver: imported only when asked for

        return fit_logistic(source, num_features, num_classes, train_samples, val_samples, model, recipe,
                            on_epoch=on_epoch, on_chosen=on_chosen, groups=groups,
                            positive=positive)  # one fit: nothing to keep or resume
    if model.head != "sgd":
        raise StopsignError(f"unknown head {model.head!r}; choose sgd or logistic")
    with torch_threads(source.threads):
        torch.manual_seed(recipe.seed)
        head = make_head(num_features, num_classes, model.pooling, positive)  # drawn on the CPU: one start anywhere
        device = getattr(source, "device", torch.device("cpu"))
        head.to(device)
        network = source.model(head)
        criterion = make_criterion(recipe, train_samples, num_classes).to(device)
        scorer = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing) if criterion.weight is not None \
            else criterion  # how validation is scored: unweighted
        optimizer, scheduler = make_optimizer(head, recipe)
        history, best, best_head = [], None, None
        if state:
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history, best, best_head = list(state["history"]), state["best"], state["best_head"]
        bar = tqdm(range(len(history), recipe.epochs), desc="epochs", unit="epoch", disable=not progress,
                   initial=len(history), total=recipe.epochs)
        for epoch in bar:
            tick = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_one_epoch(network, source.train_batches(train_samples, epoch,
                                                    np.random.default_rng([recipe.seed, epoch])), criterion, optimizer)
            val_loss, val_acc, _ = (evaluate(network, source.val_batches(val_samples), scorer) if val_samples
                                    else (None,) * 3)
            scheduler.step()
            row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                       val_acc=val_acc, seconds=round(time.perf_counter() - tick, 4))
            history.append(row)
            if keep == "last" or is_better(row, best):
                best, best_head = row, {k: v.clone() for k, v in head.state_dict().items()}
            if val_acc is not None:
                bar.set_postfix(val_acc=f"{val_acc:.3f}", best=f"{best['val_acc']:.3f}")
            if on_epoch:  # checkpoints hold CPU tensors: a run trained on a GPU resumes anywhere
                on_epoch(row, _on_cpu({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "history": history, "best": best,
                                       "best_head": best_head}))
        head.load_state_dict(best_head)
        kept = source.readable(val_samples) if val_samples else []
        probs = evaluate(network, source.val_batches(val_samples), scorer)[2] if val_samples else None
        return FitResult(history, best, head.cpu(), kept, probs)


def _on_cpu(state):
    """`state` with every tensor in it on the CPU (the same objects when they are there already)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _on_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(value) for value in state)
    return state


@contextmanager
def stop_after_epoch():
    """While training, the first Ctrl-C asks to stop after the current epoch's files are written."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        requested.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C stops at once
        log.warning("stopping after this epoch's files are written (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)
