"""TorchScriptClassifier: an exported .torchscript classifier, run by torch.jit alone (no torchvision, no
backbone code): the file holds the whole network and, as the extra file EXTRA_FILE, its metadata."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .base import BatchClassifier
from .exported import EXTRA_FILE, check_metadata


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's deprecation notices for TorchScript and its ONNX exporter, and its constant-folding
    remarks: noise to a user, since every export is checked numerically against PyTorch before it is kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        yield


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The module and the stopsign metadata of an exported TorchScript file; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    extra = {EXTRA_FILE: ""}
    try:
        with quiet_torch():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        metadata = json.loads(extra[EXTRA_FILE])
    except (RuntimeError, ValueError) as error:  # not TorchScript, or TorchScript without stopsign's metadata
        raise CheckpointError(f"{path} is not a TorchScript model exported by stopsign "
                              f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from error
    return module.eval(), check_metadata(metadata, path)


class TorchScriptClassifier(BatchClassifier):
    def __init__(self, path: str | Path, *, batch_size: int = 16):
        self.path, self.batch_size = Path(path), batch_size
        self.module, metadata = load_torchscript(path)
        self.read_metadata(metadata)

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            result = self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return [tensor.numpy() for tensor in (result if isinstance(result, tuple) else (result,))]
