"""What every classifier shares, free of torch: prediction rows, input expansion, and `predict()`, written once.

A classifier knows its class names and preprocessing and turns image files (`probabilities`) or decoded
images (`image_probabilities`) into class probabilities; everything else, turning them into rows through the
one decision rule (decision.decide), is here. The backends each depend only on this module:
`pytorch.CheckpointClassifier` (a .pt checkpoint), `torchscript.TorchScriptClassifier` and
`onnx.OnnxClassifier` (exported files); `load.load_classifier` picks one by the file's suffix.
"""

from __future__ import annotations

import abc
import csv
import glob
import io
import json
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..data.images import IMAGE_EXTENSIONS, list_images, read_image
from ..decision import check_threshold, decide
from ..errors import StopsignError
from ..storage import fetch, is_url, join
from ..model.transforms import decode_size, preprocess, tile_views

log = logging.getLogger(__name__)
# files predicted at once by predict_iter: large enough for full batches and the cache's bulk reads, small
# enough that a folder of thousands streams
PREDICT_CHUNK = 256


@dataclass
class Prediction:
    path: str
    label: str | None  # None when the image could not be read
    probabilities: dict[str, float]
    error: str | None = None

    def to_dict(self) -> dict:
        data = {"path": self.path, "label": self.label, "probabilities": self.probabilities}
        return data | ({"error": self.error} if self.error else {})


def prediction_lines(rows: Iterable[Prediction], class_names: list[str], format: str = "table",
                     threshold: float | None = None) -> Iterator[str]:
    """The rows as `stopsign predict` shows them, each line as soon as its row comes (a table waits for every
    row, to size its columns): "json", one array; "csv", the columns of a run's predictions.csv (one probability
    per class); or a "table" of each label and its probability (with a threshold, the positive class's: the one
    the label follows)."""
    if format == "json":
        previous = None  # json.dumps(rows, indent=2), a row at a time: each row's comma once the next comes
        for r in rows:
            yield "[" if previous is None else previous + ","
            previous = textwrap.indent(json.dumps(r.to_dict(), indent=2), "  ")
        yield "[]" if previous is None else previous + "\n]"
        return
    if format == "csv":
        yield csv_line(["path", "label", *(f"p_{name}" for name in class_names), "error"])
        for r in rows:
            probabilities = [f"{r.probabilities[name]:.4f}" if r.label else "" for name in class_names]
            yield csv_line([r.path, r.label or "", *probabilities, r.error or ""])
        return
    rows = list(rows)
    shown = class_names[1] if threshold is not None else None
    width, label_width = max([len(r.path) for r in rows] + [4]), max([len(name) for name in class_names] + [5])
    yield f"{'path':<{width}}  {'label':<{label_width}} {f'p({shown})' if shown else 'probability'}"
    for r in rows:
        value = (f"{r.label:<{label_width}} {r.probabilities[shown or r.label]:.3f}" if r.label
                 else f"{'-':<{label_width}} error: {r.error}")
        yield f"{r.path:<{width}}  {value}"


def csv_line(values: list) -> str:
    """One CSV row, without its line end."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def images_under(folder: Path) -> list[Path]:
    """Every image file in `folder` and its subfolders (as Ultralytics and timm search), sorted, hidden ones
    (and those in hidden folders) left out."""
    found = [folder, *(p for p in sorted(folder.rglob("*")) if p.is_dir()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))]
    return [image for sub in found for image in list_images(sub)]


def expand_inputs(inputs, names: dict[str, str] | None = None) -> list[Path]:
    """Files as given, folders to the images in them and their subfolders, glob patterns to their matches; a URL
    (a prefix or one object) to its local copy, recording in `names` the URL each local file stands for."""
    paths: list[Path] = []
    names = {} if names is None else names
    for item in inputs:
        item = str(item)
        if is_url(item):
            local = fetch(item)
            found = images_under(local) if local.is_dir() else [local]
            for file in found:
                names[str(file)] = join(item, file.relative_to(local).as_posix()) if local.is_dir() else item
            paths.extend(found)
            continue
        path = Path(item)
        if path.is_dir():
            paths.extend(images_under(path))
        elif path.exists() or path.is_symlink():
            paths.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            paths.extend(p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(path)  # reported as unreadable, not a crash
    return paths


class Classifier(abc.ABC):
    """A trained classifier: class names, the preprocessing its input needs, and predictions on images.

    Backends set `class_names`, `backbone_name` and `preprocessing` and implement `probabilities` and
    `image_probabilities`.
    """

    class_names: list[str]
    backbone_name: str
    preprocessing: dict
    tiles: int = 1  # > 1: each image is seen whole and as a tiles×tiles grid of crops (model.transforms)
    threshold: float | None = None  # the model's own decision threshold (training/threshold.py); None: argmax

    @abc.abstractmethod
    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        """Class probabilities (N, C) for the readable images, and {path: reason} for the others."""

    @abc.abstractmethod
    def image_probabilities(self, images: list) -> np.ndarray:
        """Class probabilities (N, C) of decoded RGB images (uploads, say)."""

    def score(self, paths: list[Path], progress: bool = False
              ) -> tuple[list[Path], np.ndarray, dict, list[str | None] | None]:
        """probabilities(), and for each readable image whether the model was trained on it ("exact", "near"
        or None; see model.signature), or None where the model does not record what it was trained on."""
        readable, probs, skipped = self.probabilities(paths, progress=progress)
        return readable, probs, skipped, None

    def predict(self, images, *, threshold: float | None = None, progress: bool = False) -> list[Prediction]:
        """Predict files, folders and glob patterns: one row per input file, in order; an unreadable file gets
        a row with its error instead of a label. `threshold` (two classes): the second class when p >= it (None:
        the model's own, chosen when it was trained; argmax for a model that has none)."""
        return list(self.predict_iter(images, threshold=threshold, progress=progress))

    def predict_iter(self, images, *, threshold: float | None = None, progress: bool = False,
                     chunk: int = PREDICT_CHUNK) -> Iterator[Prediction]:
        """predict()'s rows as they come, `chunk` files at a time: a folder of any size in bounded memory, its
        first rows out before its last files are read. threshold None: the model's own (self.threshold). No image
        found, or a threshold out of range, raises here, before any row is asked for (and any header printed)."""
        inputs = images if isinstance(images, (list, tuple)) else [images]
        names: dict[str, str] = {}  # local copy → the URL it came from, as the rows name it
        paths = expand_inputs(inputs, names)
        if not paths:
            raise StopsignError(f"no image found in {', '.join(map(str, inputs)) or 'no input'}: give image files, "
                                "folders holding images, or glob patterns that match some")
        threshold = self.threshold if threshold is None else threshold
        if threshold is not None:
            check_threshold(threshold, len(self.class_names))  # before any work
        return self._predict_chunks(paths, names, threshold, progress, chunk)

    def _predict_chunks(self, paths: list[Path], names: dict[str, str], threshold: float | None, progress: bool,
                        chunk: int) -> Iterator[Prediction]:
        """predict_iter's rows, `chunk` files at a time, each named as its input was (`names`: a URL's)."""
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress or len(paths) <= chunk)
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            readable, probs, skipped = self.probabilities(part, progress=progress and len(paths) <= chunk)
            labels = decide(probs, threshold) if len(probs) else []
            by_path = {str(p): (row, label) for p, row, label in zip(readable, probs, labels)}
            for path in part:
                shown = names.get(str(path), str(path))
                if str(path) not in by_path:
                    yield Prediction(shown, None, {}, skipped.get(str(path), "cannot be read"))
                    continue
                row, label = by_path[str(path)]
                yield Prediction(shown, self.class_names[int(label)],
                                 {name: float(p) for name, p in zip(self.class_names, row)})
            bar.update(len(part))
        bar.close()


class BatchClassifier(Classifier):
    """A classifier over a whole exported network: preprocessed float32 batches (N, 3, size, size) in,
    probabilities out (`run`). Files are decoded and preprocessed here, in bounded batches."""

    batch_size = 16
    tiles = 1  # > 1: the network takes each image's tiles (N, tile_count, 3, size, size), cut here

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) of a preprocessed float32 batch (N, 3, size, size), or of tiles (see `tiles`)."""

    def prepare(self, image) -> np.ndarray:
        """A decoded image as the network's input: preprocessed, or cut into its tiles and each preprocessed."""
        if self.tiles > 1:
            return np.stack(tile_views(image, self.preprocessing, self.tiles))
        return preprocess(image, self.preprocessing)

    def image_probabilities(self, images: list) -> np.ndarray:
        return self.run(np.stack([self.prepare(image) for image in images]))

    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        size = decode_size(self.preprocessing, self.tiles)
        readable, skipped, chunks, pending = [], {}, [], []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
        for path in paths:
            try:
                pending.append(self.prepare(read_image(path, draft=(size, size))))
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
