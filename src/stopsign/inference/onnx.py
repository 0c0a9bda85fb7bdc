"""OnnxClassifier: an exported .onnx classifier run by onnxruntime alone, with no torch or torchvision.

The file holds the whole network and its metadata (inference/exported.py); decoding and preprocessing are
numpy and Pillow (data/images.py, model/transforms.py), exactly as the PyTorch path does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime

from ..errors import CheckpointError
from .base import BatchClassifier
from .exported import parse_onnx_properties


class OnnxClassifier(BatchClassifier):
    """An ONNX Runtime session over an exported classifier."""

    def __init__(self, path: str | Path, *, batch_size: int = 16):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"model file {path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise CheckpointError(f"{path} is not a readable ONNX model ({str(error).splitlines()[0]})") from error
        self.read_metadata(parse_onnx_properties(self.session.get_modelmeta().custom_metadata_map, path))
        self.path, self.batch_size = path, batch_size
        self.input_name = self.session.get_inputs()[0].name

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
