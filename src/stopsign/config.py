"""The training settings: one dataclass whose defaults are the seed recipe."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

# The registered backbones, by name, here so that the CLI can list them without importing torch;
# backbones.py checks that its registry matches.
BACKBONE_NAMES = ("resnet18", "efficientnet_lite0")


@dataclass
class TrainConfig:
    # model
    backbone: str = "resnet18"  # a name from BACKBONE_NAMES (backbones.BACKBONES)
    weights: str | None = None  # a local weights file instead of the download (air-gapped machines)
    # data
    val_fraction: float = 0.1  # share of each class drawn into validation when the data gives no split
    seed: int = 0  # drives the split, the shuffling and the augmentation draws
    augment: bool = True  # train-time horizontal flip and rotation
    rotation: float = 5.0  # largest rotation of an augmented view, in degrees either way
    views: int = 1  # augmented views cached per training image; the README says why 1 (bench/choose_views.py)
    # optimisation (the seed recipe)
    epochs: int = 10
    batch_size: int = 32
    lr_base: float = 1e-6  # CyclicLR lower bound
    lr_max: float = 1e-2  # CyclicLR upper bound
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    scheduler: str = "triangular2"  # CyclicLR triangular2 (the seed); "cosine" or "constant" for experiments
    cycle_epochs: int = 5  # CyclicLR: epochs of a cycle's rising half (stepped once per epoch, as the seed)
    # speed
    cache: bool = True  # train the head on cached backbone features (the fast path)
    cache_dir: str | None = None  # default: the user's cache folder
    num_workers: int = 2  # decode processes feeding the backbone
    bf16: bool = False  # bf16 autocast for the backbone pass (only where it predicts exactly as float32)
    folds: int = 0  # K > 1: stratified K-fold cross-validation before the final model
    # output
    out: str = "runs"
    name: str | None = None  # run folder name; default: <backbone>-<timestamp>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Folders under cache_root() besides the features; `stopsign cache info|clear` shows and empties all three.
HASH_CACHE = "hash-cache"  # file hashes for the duplicate checks (checks.py)
THUMBNAILS = "thumbnails"  # the reports' photo thumbnails (photos.py)


def cache_root() -> Path:
    """Where stopsign keeps what it can recompute (features, file hashes, thumbnails): $STOPSIGN_CACHE,
    else $XDG_CACHE_HOME/stopsign, else ~/.cache/stopsign."""
    if os.environ.get("STOPSIGN_CACHE"):
        return Path(os.environ["STOPSIGN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stopsign"
