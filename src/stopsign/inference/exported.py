"""The exported-model format that `stopsign export` writes and the ONNX and TorchScript classifiers read.

An exported file holds the whole network (backbone, head, softmax): a preprocessed float32 batch `images`
(N, 3, size, size) in, `probabilities` (N, C) out, and with a regions head `region_scores` (N, R), each region's
score, whose boxes the metadata's `region_cells` gives, and `cell_scores` (N, T, h, w), each cell's of every tile's
last feature map (inference/explain.py). Beside it, as metadata, everything a deployment needs
besides pixels: ONNX keeps each key in metadata_props as a JSON string; TorchScript keeps one JSON object in
the extra file EXTRA_FILE. Plain JSON here: neither torch nor onnxruntime is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import short
from ..errors import CheckpointError

EXPORT_FORMAT = "stopsign-export"
EXPORT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
REGIONS_NAME = "region_scores"  # a regions head's second output (N, R): where the model looked
CELLS_NAME = "cell_scores"  # and its third (N, T, h, w): each tile's class activation map
EXTRA_FILE = "stopsign.json"  # TorchScript: the extra file holding the metadata
REQUIRED_KEYS = ("class_names", "preprocessing", "backbone")


def check_metadata(metadata: dict, path: str | Path) -> dict:
    """The metadata of an exported file, if stopsign wrote it and this version reads it; else CheckpointError."""
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} was not exported by stopsign (no format={EXPORT_FORMAT!r} metadata); "
                              "export a checkpoint with `stopsign export runs/NAME/best.pt`")
    if metadata.get("version", 0) > EXPORT_VERSION:
        raise CheckpointError(f"{path} is export version {metadata['version']}; this stopsign reads up to "
                              f"{EXPORT_VERSION}: upgrade stopsign")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: its stopsign metadata lacks {', '.join(missing)}; export it again")
    return metadata


def describe_metadata(metadata: dict) -> list[tuple[str, str]]:
    """What `stopsign info` shows of an exported file: its metadata, one (name, text) pair a key."""
    return [(key, ", ".join(f"{k} {short(v)}" for k, v in value.items()) if isinstance(value, dict) else short(value))
            for key, value in metadata.items()]


def parse_onnx_properties(properties: dict[str, str], path: str | Path) -> dict:
    """ONNX metadata_props (each value a JSON string) to the metadata dict, checked."""
    try:
        metadata = {key: json.loads(value) for key, value in properties.items()}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its metadata is not stopsign's ({error})") from error
    return check_metadata(metadata, path)
