"""What a training run records in its folder: the split (data.json), the metrics' columns, the summary, the
versions, and the state to resume from. The folder itself (making it, its upload) is stopsign/runs.py's; the
checkpoints in it are checkpoint.py's.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import numpy
import sklearn
import torch

from .. import __version__
from ..checkpoint import load_checkpoint
from ..config import relevant_settings
from ..errors import CheckpointError
from ..files import relative

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]


def resume_state(run_dir: Path) -> dict | None:
    """The training state saved after the last finished epoch, or None when no epoch finished."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    if "resume" not in checkpoint:
        raise CheckpointError(f"{path} holds no training state to resume from")
    return checkpoint["resume"]


def data_record(root: Path, layout: str, class_names: list[str], splits: dict[str, list], skipped: dict,
                config: dict, groups: dict[str, int] | None = None, folds: dict[str, int] | None = None,
                synthetic: list | None = None) -> dict:
    """data.json: the split (file, label, split, and its duplicate group and fold where it has one) relative to
    the data folder, and the skipped files."""
    rendered, groups, folds = {s.path for s in synthetic or []}, groups or {}, folds or {}

    def counts(samples) -> dict:
        return {name: sum(s.label == i for s in samples) for i, name in enumerate(class_names)}

    return {"source": str(root), "layout": layout, "class_names": list(class_names),
            "val_fraction": config["val_fraction"], "seed": config["seed"],
            "counts": {name: counts(samples) for name, samples in splits.items()} | {"skipped": len(skipped)},
            "split": [{"file": relative(s.path, root), "label": class_names[s.label], "split": name}
                      | ({"group": groups[str(s.path)]} if str(s.path) in groups else {})
                      | ({"fold": folds[str(s.path)]} if str(s.path) in folds else {})
                      | ({"synthetic": True} if s.path in rendered else {})
                      for name, samples in splits.items() for s in samples],
            "skipped": [{"file": relative(p, root), "reason": r} for p, r in sorted(skipped.items())]}


def summary(config: dict, history: list[dict], best: dict, started: str, completed: str, *,
            share_trained: float, cv_accuracy: float | None = None, metrics: dict | None = None,
            threshold: dict | None = None) -> dict:
    """summary.json in the shape of CV Studio's run report, plus the best epoch.

    share_trained: the share of the labelled images the model was trained on (1 with --folds or a separate
    --val). accuracy/loss are per epoch, of the validation set; a model trained on everything (--folds) has
    none, so they are the training set's, as "measured_on" says, and cv_accuracy is the figure to trust.
    metrics: the report's (compute_metrics): its figures beside their baselines go in "evaluation".
    threshold: the decision threshold chosen out of fold (training/threshold.py), or None (argmax).
    """
    validated = any(row["val_acc"] is not None for row in history)
    prefix = "val" if validated else "train"
    return {
        "started": started, "completed": completed,
        "parameters": parameters(config, best, share_trained),
        "accuracy": {"accuracy": [row[f"{prefix}_acc"] for row in history],
                     "loss": [row[f"{prefix}_loss"] for row in history],
                     "measured_on": "validation" if validated else "training"},
        "cv_accuracy": cv_accuracy,
        "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
        "evaluation": {key: metrics[key] for key in ("n", "accuracy", "balanced_accuracy", "log_loss", "baseline",
                                                     "verdict")} if metrics else None,
        "threshold": threshold,
    }


def parameters(config: dict, best: dict, share_trained: float) -> dict:
    """summary.json's "parameters": CV Studio's optimisation settings for the SGD head; for the logistic head,
    which has none of them (config.relevant_settings), the C and class weight its K-fold chose."""
    share = {"percentage used training": round(100 * share_trained)}
    if "lr_max" not in relevant_settings(config):
        return {"head": config["head"], "C": best.get("C"), "class_weight": best.get("class_weight")} | share
    return {"epochs": config["epochs"], "learningRate": config["lr_max"], "momentum": config["momentum"]} | share | {
        "learningRatescheduler": {"lr_scheduler": config["scheduler"], "base_lr": config["lr_base"],
                                  "max_lr": config["lr_max"]}}


def versions() -> dict:
    # torchvision's from its metadata: importing it (only a backbone needs it, model/backbones.py) costs seconds
    return {"stopsign": __version__, "torch": str(torch.__version__), "torchvision": metadata.version("torchvision"),
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}
