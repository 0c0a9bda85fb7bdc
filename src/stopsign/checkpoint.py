"""The checkpoint: its schema (format, version, required keys), making one, saving and loading it, and what
`stopsign info` says of it. A checkpoint describes itself, so load_classifier() needs nothing else.

torch is imported inside the functions that read or write a .pt file: the core layer stays torch-free, and
predicting with an .onnx file never imports it.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

from .config import positive_index, relevant_settings
from .errors import CheckpointError
from .files import atomic_write_bytes

CHECKPOINT_FORMAT = "stopsign-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "backbone", "weights_sha256", "feature_size", "preprocessing",
                 "class_names", "head")


def make_checkpoint(head_state: dict, backbone: dict, class_names: list[str], config: dict, row: dict, *,
                    model: dict | None = None, resume: dict | None = None, trained_on: dict | None = None,
                    threshold: dict | None = None, tuned: dict | None = None) -> dict:
    """A self-describing checkpoint: everything load_classifier() needs, as tensors and plain data.

    backbone: {"name", "weights_sha256", "feature_size", "preprocessing"}; config: the run's settings, flat (what
    `stopsign info` lists); model: the model's own arguments (model_arguments()); resume: the optimizer, scheduler,
    history and best epoch, so `--resume` continues exactly (last.pt only); trained_on: the training images'
    digests and feature signature (model.signature), so an evaluation can tell copies of them from new photos;
    threshold: the two-class decision threshold chosen out of fold (training/threshold.py), which predict,
    evaluate and serve apply unless told another; tuned: the backbone's stages --finetune trained
    (training/finetune.py), which the feature extractor puts in place of their ImageNet weights.
    """
    from . import __version__

    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stopsign_version": __version__,
        "backbone": backbone["name"], "weights_sha256": backbone["weights_sha256"],
        "feature_size": backbone["feature_size"], "preprocessing": backbone["preprocessing"],
        "class_names": list(class_names), "head": head_state, "config": config,
        "epoch": row["epoch"], "val_acc": row["val_acc"], "val_loss": row["val_loss"],
    }
    if model is not None:
        checkpoint["model"] = model
    if resume is not None:
        checkpoint["resume"] = resume
    if trained_on is not None:
        checkpoint["trained_on"] = trained_on
    if threshold is not None:
        checkpoint["threshold"] = threshold
    if tuned is not None:
        checkpoint["tuned"] = tuned
    return checkpoint


def stored_threshold(checkpoint: dict) -> float | None:
    """The decision threshold the checkpoint's training chose, or None (argmax: more than two classes, or a
    checkpoint written before thresholds were chosen)."""
    return (checkpoint.get("threshold") or {}).get("value")


def model_arguments(checkpoint: dict) -> dict:
    """What defines the checkpoint's model: ModelConfig's fields, and the arguments its head is made from by
    model.pooling.make_head (num_features, num_classes, pooling, positive_index). A checkpoint written before the
    settings were split has none stored: they are read from its settings, and one before 0.2 has average pooling,
    one tile, the backbone's native size and the class called stop as the positive one."""
    if "model" in checkpoint:
        return checkpoint["model"]
    config, names = checkpoint.get("config") or {}, list(checkpoint["class_names"])
    return {"backbone": checkpoint["backbone"], "weights": config.get("weights"),
            "image_size": config.get("image_size"), "pooling": config.get("pooling", "avg"),
            "tiles": config.get("tiles", 1), "head": config.get("head", "sgd"), "positive": config.get("positive"),
            "num_features": checkpoint["feature_size"], "num_classes": len(names),
            "positive_index": positive_index(names, config.get("positive"))}


def save_checkpoint(path: Path, checkpoint: dict) -> Path:
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain data only, never code."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint; a run folder holds best.pt and last.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as file:
        head = file.read(2)
    # torch.save writes a zip archive (since torch 1.6), or a pickle (protocol 2+ starts with 0x80) before it.
    if not zipfile.is_zipfile(path):
        if head == b"PK":
            raise CheckpointError(f"{path} is not a stopsign checkpoint: a damaged or truncated torch.save file")
        if head[:1] != b"\x80":
            raise CheckpointError(f"{path} is not a stopsign checkpoint: it is not a file written by torch.save")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Only the name of what was refused is passed on: the rest of PyTorch's message advises loading the file
        # with weights_only=False, which would run whatever code it holds.
        found = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", str(error))
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data"
            f"{f' ({found.group(1)})' if found else ''}, which could run code when loaded. Fix: load a checkpoint "
            "written by stopsign (a run folder's best.pt); train one from your data with `stopsign train`."
        ) from None
    except Exception as error:  # a damaged archive fails inside torch in many ways (RuntimeError, KeyError, ...)
        raise CheckpointError(f"{path} is not a stopsign checkpoint: it cannot be read ({error!r})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a stopsign checkpoint: no format={CHECKPOINT_FORMAT!r} key")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}; it is damaged or from another tool")
    if checkpoint["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is checkpoint version {checkpoint['version']}; "
                              f"this stopsign reads up to {CHECKPOINT_VERSION}: upgrade stopsign")
    return checkpoint


def short(value) -> str:
    """A value as a person reads it: 4 significant digits, lists joined, None as a dash."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(short(v) for v in value)
    return "-" if value is None else str(value)


def describe(checkpoint: dict, path: str | Path) -> list[tuple[str, str]]:
    """What `stopsign info` shows of the checkpoint loaded from `path`, one (name, text) pair a line."""
    pre = checkpoint["preprocessing"]
    trained_on = checkpoint.get("trained_on")
    lines = [("model", f"{path} (stopsign checkpoint v{checkpoint['version']}, "
                       f"written by stopsign {checkpoint.get('stopsign_version', '?')})"),
             ("backbone", f"{checkpoint['backbone']}, {checkpoint['feature_size']} features, weights sha256 "
                          f"{checkpoint['weights_sha256'][:16]}…"),
             ("classes", ", ".join(checkpoint["class_names"])),
             ("preprocessing", f"{pre['size']}×{pre['size']}, mean {short(pre['mean'])}, std {short(pre['std'])}"),
             ("epoch", f"{checkpoint['epoch']}" + ("" if checkpoint.get("val_acc") is None else
                                                   f" (validation accuracy {checkpoint['val_acc']:.3f}, "
                                                   f"loss {checkpoint['val_loss']:.4f})")),
             ("trained on", f"{len(trained_on['digests'])} images (their digests and features are kept: evaluate "
                            "tells copies of them apart)" if trained_on else "not recorded (before stopsign 0.2)"),
             ("head parameters", str(sum(t.numel() for t in checkpoint["head"].values())))]
    if chosen := checkpoint.get("threshold"):
        lines.append(("threshold", f"p({checkpoint['class_names'][1]}) >= {chosen['value']:.3f}, chosen by "
                                   f"{chosen['rule']} on {chosen['images']} training images"))
    if tuned := checkpoint.get("tuned"):
        lines.append(("fine-tuned", f"the backbone's last {tuned['stages']} stage(s) "
                                    f"({sum(t.numel() for t in tuned['state'].values()):,} parameters and statistics), "
                                    f"kept epoch {tuned['best_epoch']} of {len(tuned['history'])}; state sha256 "
                                    f"{tuned['sha256'][:16]}…"))
    if "resume" in checkpoint:
        lines.append(("resumable", f"yes: the training state after epoch {checkpoint['epoch']}"))
    return lines


def describe_settings(checkpoint: dict) -> list[tuple[str, str]]:
    """The training settings the checkpoint recorded, (name, value) pairs, less those describe() shows already and
    those its head never read (a logistic head's epochs and learning rates: config.relevant_settings)."""
    shown = ("backbone_weights_sha256", "preprocessing", "versions")
    return [(key, short(value)) for key, value in relevant_settings(checkpoint.get("config") or {}).items()
            if key not in shown]
