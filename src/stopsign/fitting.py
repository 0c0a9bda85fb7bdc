"""The recipe and the one epoch loop, fit(), that training, cross-validation and tuning share.

Two sources of batches train the same head with the same recipe and write the same checkpoint:
- CachedFeatures (default) computes the frozen backbone's features of each image view once (cached on disk)
  and trains the linear head on them;
- LiveImages (`cache=False`) runs the backbone over freshly augmented images every epoch, as the seed
  notebook does; kept for comparison and for later fine-tuning of unfrozen layers.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .backbones import FrozenBackboneClassifier
from .config import TrainConfig
from .data import Sample
from .errors import StopsignError
from .features import FeatureExtractor, ViewsDataset, view_loader

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    history: list[dict]
    best: dict  # the kept epoch's row
    head: nn.Linear  # with the kept epoch's weights
    val_samples: list[Sample]  # the validation images that could be read, in the order of val_probs
    val_probs: np.ndarray  # (len(val_samples), C) from the kept head


# --- the recipe -------------------------------------------------------------------------------------------

SCHEDULERS: dict[str, Callable] = {
    # cycle_momentum off: the recipe's momentum is 0.9 throughout, not cycled against the LR.
    "triangular2": lambda optimizer, c: torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=c.lr_base, max_lr=c.lr_max, step_size_up=c.cycle_epochs, mode="triangular2",
        cycle_momentum=False),
    "cosine": lambda optimizer, c: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, c.epochs), eta_min=c.lr_base),
    "constant": lambda optimizer, c: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0),
}


def make_optimizer(head: nn.Module, config: TrainConfig):
    if config.scheduler not in SCHEDULERS:
        raise StopsignError(f"unknown scheduler {config.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    optimizer = torch.optim.SGD(head.parameters(), lr=config.lr_max, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return optimizer, SCHEDULERS[config.scheduler](optimizer, config)


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
    return total_loss / max(seen, 1), correct / max(seen, 1), torch.cat(probs).numpy() if probs else None


def is_better(row: dict, best: dict | None) -> bool:
    """Highest validation accuracy; ties go to the lower validation loss. Without validation: the latest."""
    if best is None or row["val_acc"] is None:
        return True
    return (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])


# --- sources of batches -----------------------------------------------------------------------------------

class CachedFeatures:
    """The fast path: backbone features of each view, computed once. Training images need only their
    augmented views (one drawn per epoch); validation images their plain view."""

    # A linear head on a few hundred feature rows: splitting its matmuls across threads costs more than it
    # saves, and on a busy machine far more (measured on 2 shared cores: 35 ms a step with 2 threads, 0.3 ms with 1).
    threads = 1

    def __init__(self, extractor: FeatureExtractor, train: list[Sample], val: list[Sample], config: TrainConfig,
                 progress: bool = False):
        views = range(1, config.views + 1) if config.augment and config.views > 0 else [0]
        augmented = extractor.extract([s.path for s in train], views=views, seed=config.seed,
                                      rotation=config.rotation, progress=progress)
        plain = extractor.extract([s.path for s in val], progress=progress)
        self.train_rows = {p: row for row, p in enumerate(augmented.paths)}
        self.val_rows = {p: row for row, p in enumerate(plain.paths)}
        self.train_features, self.val_features = augmented.features, plain.features[:, 0]
        self.skipped = augmented.skipped | plain.skipped
        self.batch_size = config.batch_size
        self.drawn = (config.augment, config.seed, config.rotation)  # what the augmented views were drawn with
        self._last: dict[int, tuple] = {}  # see _indexed

    def for_config(self, config: TrainConfig) -> "CachedFeatures":
        """These features under another recipe: its batch size, and only its first config.views augmented views.

        View k of an image is drawn from (seed, image, k), so the first v views of a larger set are exactly the
        views a CachedFeatures built with views=v computes: tuning extracts the most views once, then narrows.
        """
        views = config.views if config.augment and config.views > 0 else 1
        if (config.augment, config.seed, config.rotation) != self.drawn or views > self.train_features.shape[1]:
            raise ValueError(f"these features hold {self.train_features.shape[1]} views drawn with (augment, seed, "
                             f"rotation) = {self.drawn}; cannot serve {views} views with "
                             f"{(config.augment, config.seed, config.rotation)}")
        narrowed = copy.copy(self)
        narrowed.train_features, narrowed.batch_size = self.train_features[:, :views], config.batch_size
        narrowed._last = {}
        return narrowed

    def _indexed(self, table: dict, samples: list[Sample]) -> tuple[list[Sample], np.ndarray, np.ndarray]:
        """The samples that have features in `table`, their rows and their labels. fit() asks about the same
        lists every epoch, so the answer for the last list asked of each table is kept (a list is not changed
        while a head trains on it); looking up paths every epoch was a tenth of a tuning trial's time."""
        last = self._last.get(id(table))
        if last is None or last[0] is not samples:
            readable = [s for s in samples if s.path in table]
            last = (samples, readable, np.array([table[s.path] for s in readable], dtype=np.int64),
                    np.array([s.label for s in readable], dtype=np.int64))
            self._last[id(table)] = last
        return last[1:]

    def model(self, head: nn.Linear) -> nn.Module:
        return head

    def train_batches(self, samples: list[Sample], rng: np.random.Generator):
        samples, rows, labels = self._indexed(self.train_rows, samples)
        order = rng.permutation(len(samples))
        views = rng.integers(0, self.train_features.shape[1], size=len(samples))
        for start in range(0, len(order), self.batch_size):
            pick = order[start:start + self.batch_size]
            yield torch.from_numpy(np.asarray(self.train_features[rows[pick], views[pick]])), torch.from_numpy(labels[pick])

    def readable(self, samples: list[Sample]) -> list[Sample]:
        return self._indexed(self.val_rows, samples)[0]

    def val_batches(self, samples: list[Sample]):
        _, rows, labels = self._indexed(self.val_rows, samples)
        for start in range(0, len(rows), 256):
            yield (torch.from_numpy(self.val_features[rows[start:start + 256]]),
                   torch.from_numpy(labels[start:start + 256]))


class LiveImages:
    """The slow path: decode and augment every image and run the backbone over it, every epoch."""

    def __init__(self, extractor: FeatureExtractor, config: TrainConfig):
        self.backbone, self.preprocessing, self.config = extractor.backbone.model, extractor.preprocessing, config
        self.skipped: dict[str, str] = {}
        self.threads = None  # the backbone runs here: keep torch's thread count

    def model(self, head: nn.Linear) -> nn.Module:
        return FrozenBackboneClassifier(self.backbone, head)

    def _batches(self, samples: list[Sample], order, draws):
        dataset = ViewsDataset([samples[i].path for i in order], draws, self.preprocessing)
        for batch in view_loader(dataset, self.config.batch_size, self.config.num_workers):
            good = [(i, tensor) for i, tensor, error in batch if error is None]
            self.skipped.update({str(samples[order[i]].path): error for i, _, error in batch if error})
            if good:
                yield (torch.cat([t for _, t in good]),
                       torch.tensor([samples[order[i]].label for i, _ in good], dtype=torch.long))

    def train_batches(self, samples: list[Sample], rng: np.random.Generator):
        order = rng.permutation(len(samples))
        rotation = self.config.rotation if self.config.augment else 0.0
        draws = [[(bool(rng.random() < 0.5) and self.config.augment, float(rng.uniform(-rotation, rotation)))]
                 for _ in order]
        return self._batches(samples, order, draws)

    def readable(self, samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if str(s.path) not in self.skipped]

    def val_batches(self, samples: list[Sample]):
        return self._batches(samples, np.arange(len(samples)), [[(False, 0.0)]] * len(samples))


# --- the epoch loop -----------------------------------------------------------------------------------------

def fit(source, num_features: int, num_classes: int, train_samples: list[Sample], val_samples: list[Sample],
        config: TrainConfig, *, keep: str = "best", state: dict | None = None, on_epoch: Callable | None = None,
        progress: bool = False) -> FitResult:
    """Train a new head for config.epochs epochs and keep its best epoch, or its last (`keep="last"`, and
    always without validation images): cross-validation must not choose epochs on its held-out fold.

    `state` resumes from a checkpoint's head/optimizer/scheduler/history; `on_epoch(row, state)` is called
    after each epoch with everything needed to resume. Each epoch's randomness comes from (seed, epoch),
    so a resumed run draws exactly what an uninterrupted one would.
    """
    with torch_threads(source.threads):
        torch.manual_seed(config.seed)
        head = nn.Linear(num_features, num_classes)
        model = source.model(head)
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        optimizer, scheduler = make_optimizer(head, config)
        history, best, best_head = [], None, None
        if state:
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history, best, best_head = list(state["history"]), state["best"], state["best_head"]
        bar = tqdm(range(len(history), config.epochs), desc="epochs", unit="epoch", disable=not progress,
                   initial=len(history), total=config.epochs)
        for epoch in bar:
            tick = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_one_epoch(model, source.train_batches(train_samples,
                                                    np.random.default_rng([config.seed, epoch])), criterion, optimizer)
            val_loss, val_acc, _ = evaluate(model, source.val_batches(val_samples), criterion) if val_samples else (None,) * 3
            scheduler.step()
            row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                       val_acc=val_acc, seconds=round(time.perf_counter() - tick, 4))
            history.append(row)
            if keep == "last" or is_better(row, best):
                best, best_head = row, {k: v.clone() for k, v in head.state_dict().items()}
            if val_acc is not None:
                bar.set_postfix(val_acc=f"{val_acc:.3f}", best=f"{best['val_acc']:.3f}")
            if on_epoch:
                on_epoch(row, {"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "history": history, "best": best,
                               "best_head": best_head})
        head.load_state_dict(best_head)
        kept = source.readable(val_samples) if val_samples else []
        probs = evaluate(model, source.val_batches(val_samples), criterion)[2] if val_samples else None
        return FitResult(history, best, head, kept, probs)


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: unchanged) for the block, then restored."""
    previous = torch.get_num_threads()
    if not threads or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
