"""The run folder: atomic writes of every file in it, self-describing checkpoints, and loading them back.

Every file is written to a temporary name in the same folder, fsynced and renamed, so a run killed at any
instant leaves each file either whole or absent.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import tempfile
from datetime import datetime
from pathlib import Path

import torch

from .errors import CheckpointError, StopsignError

CHECKPOINT_FORMAT = "stopsign-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "backbone", "weights_sha256", "feature_size", "preprocessing",
                 "class_names", "head")
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def now() -> str:
    """ISO 8601 with the true UTC offset of this machine's local time."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def create_run_dir(out: str | Path, name: str | None, prefix: str) -> Path:
    """A new folder under `out`; never reuses one. Fails early, naming the path, when `out` is unwritable."""
    out = Path(out)
    base = name or f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
            path = out / f"{base}{suffix}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            probe = path / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
            return path
    except OSError as error:
        raise StopsignError(f"cannot write the run folder under {out}: {error.strerror or error}. "
                            "Fix: choose another folder with --out, or free disk space.") from error
    raise StopsignError(f"no free run name {base}-N under {out}; pass another --name")


def save_checkpoint(path: Path, checkpoint: dict) -> Path:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain data only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data, which could run "
            f"code ({str(error).splitlines()[0][:200]}). Only load checkpoints written by stopsign."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a stopsign checkpoint (no format={CHECKPOINT_FORMAT!r} key)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}; it is damaged or from another tool")
    if checkpoint["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is checkpoint version {checkpoint['version']}; "
                              f"this stopsign reads up to {CHECKPOINT_VERSION}: upgrade stopsign")
    return checkpoint
