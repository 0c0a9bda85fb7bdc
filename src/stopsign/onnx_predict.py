"""OnnxClassifier: an exported .onnx classifier run by onnxruntime alone, with no torch or torchvision.

The file holds the whole network (backbone, head, softmax) and, as metadata, the class names and the
preprocessing its input needs (`stopsign export` writes them), so this module needs nothing else: it
decodes and preprocesses with numpy and Pillow (images.py) exactly as the PyTorch path does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime
from tqdm.auto import tqdm

from .errors import CheckpointError, StopsignError
from .images import preprocess, read_image
from .prediction import Prediction, predict_paths

log = logging.getLogger(__name__)

EXPORT_FORMAT = "stopsign-export"
EXPORT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class OnnxClassifier:
    """An ONNX Runtime session over an exported classifier, with the same predict API as predict.Classifier."""

    def __init__(self, path: str | Path, *, batch_size: int = 16):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"model file {path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise CheckpointError(f"{path} is not a readable ONNX model ({str(error).splitlines()[0]})") from error
        self.metadata = read_onnx_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.path, self.batch_size = path, batch_size
        self.class_names: list[str] = list(self.metadata["class_names"])
        self.backbone_name: str = self.metadata["backbone"]
        self.preprocessing: dict = dict(self.metadata["preprocessing"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) of a preprocessed float32 batch (N, 3, size, size)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def image_probabilities(self, images: list) -> np.ndarray:
        """Class probabilities (N, C) of decoded RGB images (uploads, say)."""
        return self.run(np.stack([preprocess(image, self.preprocessing) for image in images]))

    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        """Class probabilities (N, C) for the readable images, and {path: reason} for the others."""
        size = self.preprocessing["size"]
        readable, skipped, chunks, pending = [], {}, [], []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
        for path in paths:
            try:
                pending.append(preprocess(read_image(path, draft=(size, size)), self.preprocessing))
                readable.append(Path(path))
            except StopsignError as error:
                skipped[str(path)] = str(error)
                log.warning("skipped %s: %s", path, error)
            if len(pending) == self.batch_size:  # bounded memory on a folder of thousands
                chunks.append(self.run(np.stack(pending)))
                pending = []
            bar.update(1)
        if pending:
            chunks.append(self.run(np.stack(pending)))
        bar.close()
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(self.class_names)), dtype=np.float32)
        return readable, probs, skipped

    def predict(self, images, *, threshold: float | None = None, progress: bool = False) -> list[Prediction]:
        """Predict files, folders and glob patterns; unreadable files get a row with their error."""
        return predict_paths(self, images, threshold=threshold, progress=progress)


def read_onnx_metadata(properties: dict[str, str], path: Path) -> dict:
    """The metadata `stopsign export` wrote: each metadata_props value is a JSON string."""
    try:
        metadata = {key: json.loads(value) for key, value in properties.items()}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: its metadata is not stopsign's ({error})") from error
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} was not exported by stopsign (no format={EXPORT_FORMAT!r} metadata); "
                              "export a checkpoint with `stopsign export runs/NAME/best.pt`")
    if metadata.get("version", 0) > EXPORT_VERSION:
        raise CheckpointError(f"{path} is export version {metadata['version']}; this stopsign reads up to "
                              f"{EXPORT_VERSION}: upgrade stopsign")
    return metadata
