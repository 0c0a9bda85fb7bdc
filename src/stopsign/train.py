"""train(): data → features → head → epoch loop → run folder.

Two paths train the same head with the same recipe and write the same checkpoint:
- the fast path (default) computes the frozen backbone's features of each image view once (cached on disk)
  and trains the linear head on them;
- the slow path (`cache=False`) runs the backbone over freshly augmented images every epoch, as the seed
  notebook does; kept for comparison and for later fine-tuning of unfrozen layers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .backbones import FrozenBackboneClassifier
from .checks import check_data
from .config import TrainConfig
from .data import LabelledData, Sample, load_data, split_samples
from .errors import StopsignError
from .features import FeatureExtractor, ViewsDataset, default_cache_dir, view_loader
from .metrics import Predictions
from .report import write_report
from .runs import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, METRIC_COLUMNS, create_run_dir, now,
                   save_checkpoint, write_csv, write_json)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_acc: float
    history: list[dict]
    metrics: dict = field(default_factory=dict)


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


def train_one_epoch(model: nn.Module, batches: Iterable, criterion, optimizer) -> tuple[float, float]:
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
def evaluate(model: nn.Module, batches: Iterable, criterion) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and class probabilities (N, C) in the order of the batches."""
    model.eval()
    total_loss, correct, seen, probs = 0.0, 0, 0, []
    for inputs, targets in batches:
        logits = model(inputs)
        total_loss += criterion(logits, targets).item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        probs.append(logits.softmax(1))
    return total_loss / max(seen, 1), correct / max(seen, 1), torch.cat(probs).numpy() if probs else np.zeros((0, 0))


def is_better(row: dict, best: dict | None) -> bool:
    """Highest validation accuracy; ties go to the lower validation loss."""
    return best is None or (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])


# --- batches for the two paths --------------------------------------------------------------------------

def feature_batches(features: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Batches of cached features: shuffled, one of each image's views drawn per epoch, when `rng` is given."""
    index = np.arange(len(labels))
    views = np.zeros(len(labels), dtype=int)
    if rng is not None:
        index = rng.permutation(len(labels))
        views = rng.integers(0, features.shape[1], size=len(labels))
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]
        yield torch.from_numpy(np.asarray(features[rows, views[rows]])), torch.from_numpy(labels[rows])


def image_batches(samples: list[Sample], preprocessing: dict, config: TrainConfig, rng, skipped: dict):
    """Batches of freshly decoded, freshly augmented images (the slow path); unreadable files are skipped."""
    order = rng.permutation(len(samples)) if rng is not None else np.arange(len(samples))
    draws = [[(bool(rng.random() < 0.5), float(rng.uniform(-config.rotation, config.rotation)))]
             if rng is not None and config.augment else [(False, 0.0)] for _ in order]
    dataset = ViewsDataset([samples[i].path for i in order], draws, preprocessing)
    for batch in view_loader(dataset, config.batch_size, config.num_workers):
        good = [(i, tensor) for i, tensor, error in batch if error is None]
        for i, _, error in batch:
            if error is not None:
                skipped[str(samples[order[i]].path)] = error
        if good:
            yield (torch.cat([t for _, t in good]),
                   torch.tensor([samples[order[i]].label for i, _ in good], dtype=torch.long))


# --- train() ---------------------------------------------------------------------------------------------

def train(data: str | Path | LabelledData, *, val: str | Path | None = None, config: TrainConfig | None = None,
          progress: bool = True, **overrides) -> RunResult:
    """Train a linear head on a frozen backbone and write a run folder. Overrides are TrainConfig fields."""
    config = (config or TrainConfig()).replace(**overrides)
    started, clock = now(), time.perf_counter()
    phases: dict[str, float] = {}
    torch.manual_seed(config.seed)
    run_dir = create_run_dir(config.out, config.name, config.backbone)

    data = data if isinstance(data, LabelledData) else load_data(data)
    if val is not None:
        train_samples, val_samples = data.samples, load_data(val, class_names=data.class_names).samples
    elif data.splits:
        train_samples, val_samples = data.splits["train"], data.splits["val"]
    else:
        train_samples, val_samples = split_samples(data.samples, config.val_fraction, config.seed)
    checks = check_data({"train": train_samples, "val": val_samples}, data.class_names)
    for warning in checks.get("warnings", []):
        log.warning("%s", warning)
    phases["load and check data"] = time.perf_counter() - clock

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    extractor = FeatureExtractor(config.backbone, config.weights, cache_dir=cache_dir if config.cache else None,
                                 num_workers=config.num_workers, batch_size=config.batch_size, bf16=config.bf16)
    head = nn.Linear(extractor.feature_size, len(data.class_names))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer, scheduler = make_optimizer(head, config)
    skipped: dict[str, str] = {}

    clock = time.perf_counter()
    if config.cache:
        # Training images need only their augmented views; the plain view is for validation and prediction.
        views = range(1, config.views + 1) if config.augment and config.views > 0 else [0]
        train_set = extractor.extract([s.path for s in train_samples], views=views, seed=config.seed,
                                      rotation=config.rotation, progress=progress)
        val_set = extractor.extract([s.path for s in val_samples], progress=progress)
        skipped.update(train_set.skipped | val_set.skipped)
        label_of = {s.path: s.label for s in train_samples + val_samples}
        y_train = np.array([label_of[p] for p in train_set.paths], dtype=np.int64)
        y_val = np.array([label_of[p] for p in val_set.paths], dtype=np.int64)
        model = head
        epoch_batches = lambda rng: feature_batches(train_set.features, y_train, config.batch_size, rng)
        val_batches = lambda: feature_batches(val_set.features, y_val, 256, None)
        val_paths = val_set.paths
        phases["features"] = time.perf_counter() - clock
    else:
        model = FrozenBackboneClassifier(extractor.backbone.model, head)
        epoch_batches = lambda rng: image_batches(train_samples, extractor.preprocessing, config, rng, skipped)
        val_batches = lambda: image_batches(val_samples, extractor.preprocessing, config, None, skipped)
        val_paths = None

    clock = time.perf_counter()
    history, best, best_state = [], None, None
    bar = tqdm(range(config.epochs), desc="epochs", unit="epoch", disable=not progress)
    for epoch in bar:
        tick = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        rng = np.random.default_rng([config.seed, epoch])
        train_loss, train_acc = train_one_epoch(model, epoch_batches(rng), criterion, optimizer)
        val_loss, val_acc, probs = evaluate(model, val_batches(), criterion)
        scheduler.step()
        row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                   val_acc=val_acc, seconds=round(time.perf_counter() - tick, 4))
        history.append(row)
        if is_better(row, best):
            best, best_state, best_probs = row, {k: v.clone() for k, v in head.state_dict().items()}, probs
        bar.set_postfix(val_acc=f"{val_acc:.3f}", best=f"{best['val_acc']:.3f}")
        write_csv(run_dir / "metrics.csv", history, METRIC_COLUMNS)
        save_checkpoint(run_dir / "last.pt", checkpoint(head.state_dict(), extractor, data.class_names, config,
                                                        row, optimizer=optimizer, scheduler=scheduler))
    phases["train head"] = time.perf_counter() - clock
    if val_paths is None:  # slow path: unreadable files were found while training
        val_paths = [s.path for s in val_samples if str(s.path) not in skipped]
    save_checkpoint(run_dir / "best.pt", checkpoint(best_state, extractor, data.class_names, config, best))

    clock = time.perf_counter()
    label_of = {s.path: s.label for s in val_samples}
    predictions = Predictions([str(p) for p in val_paths], np.array([label_of[p] for p in val_paths]),
                              best_probs, list(data.class_names))
    kept_train = [s for s in train_samples if str(s.path) not in skipped]
    kept_val = [s for s in val_samples if str(s.path) not in skipped]
    write_json(run_dir / "config.json", config.to_dict() | {
        "backbone_weights_sha256": extractor.weights_sha256, "preprocessing": extractor.preprocessing,
        "feature_size": extractor.feature_size, "versions": versions()})
    write_json(run_dir / "data.json", data_record(data, kept_train, kept_val, skipped, config))
    completed = now()
    write_json(run_dir / "summary.json", summary(config, history, best, started, completed))
    run_info = {
        "data": {"source": str(data.root), "layout": data.layout, "classes": list(data.class_names),
                 "train": data.class_counts(kept_train), "validation": data.class_counts(kept_val)},
        "skipped files": skipped or "none",
        "backbone": {"name": config.backbone, "weights sha256": extractor.weights_sha256,
                     "features": "cached" if config.cache else "recomputed every epoch"},
        "settings": config.to_dict(), "started": started, "completed": completed,
        "seconds per phase": {k: round(v, 3) for k, v in phases.items()},
    }
    metrics = write_report(run_dir, predictions, history=history, run_info=run_info, checks=checks,
                           title=f"stopsign run {run_dir.name}")
    phases["report"] = time.perf_counter() - clock
    log.info("phases: %s", {k: round(v, 2) for k, v in phases.items()})
    return RunResult(run_dir, best["epoch"], best["val_acc"], history, metrics)


def checkpoint(head_state: dict, extractor: FeatureExtractor, class_names: list[str], config: TrainConfig,
               row: dict, optimizer=None, scheduler=None) -> dict:
    """A self-describing checkpoint: everything load_classifier() needs, as tensors and plain data."""
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stopsign_version": __version__,
        "backbone": extractor.name, "weights_sha256": extractor.weights_sha256,
        "feature_size": extractor.feature_size, "preprocessing": extractor.preprocessing,
        "class_names": list(class_names), "head": head_state, "config": config.to_dict(),
        "epoch": row["epoch"], "val_acc": row["val_acc"], "val_loss": row["val_loss"],
    }
    if optimizer is not None:
        state["optimizer"], state["scheduler"] = optimizer.state_dict(), scheduler.state_dict()
    return state


def data_record(data: LabelledData, train_samples, val_samples, skipped: dict, config: TrainConfig) -> dict:
    def rel(path: Path) -> str:
        try:
            return str(Path(path).relative_to(data.root))
        except ValueError:
            return str(path)

    split = [{"file": rel(s.path), "label": data.class_names[s.label], "split": name}
             for name, samples in (("train", train_samples), ("val", val_samples)) for s in samples]
    return {"source": str(data.root), "layout": data.layout, "class_names": list(data.class_names),
            "val_fraction": config.val_fraction, "seed": config.seed,
            "counts": {"train": data.class_counts(train_samples), "val": data.class_counts(val_samples),
                       "skipped": len(skipped)},
            "split": split, "skipped": [{"file": rel(Path(p)), "reason": r} for p, r in sorted(skipped.items())]}


def summary(config: TrainConfig, history: list[dict], best: dict, started: str, completed: str) -> dict:
    """The shape of CV Studio's run report, plus the best epoch."""
    return {
        "started": started, "completed": completed,
        "parameters": {
            "epochs": config.epochs, "learningRate": config.lr_max, "momentum": config.momentum,
            "percentage used training": round(100 * (1 - config.val_fraction)),
            "learningRatescheduler": {"lr_scheduler": config.scheduler, "base_lr": config.lr_base,
                                      "max_lr": config.lr_max},
        },
        "accuracy": {"accuracy": [row["val_acc"] for row in history], "loss": [row["train_loss"] for row in history]},
        "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
    }


def versions() -> dict:
    import platform

    import sklearn
    import torchvision

    return {"stopsign": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}
