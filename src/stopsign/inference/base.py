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
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from ..data.images import IMAGE_EXTENSIONS, list_images, photo_size, read_image
from ..decision import check_threshold, decide
from ..errors import StopsignError
from ..storage import fetch, is_url, join
from ..model.transforms import REGIONS, decode_size, preprocess, tile_views
from .explain import Explanation, explanation, write_explanation

if TYPE_CHECKING:  # model.signature imports torch, which an .onnx deployment lacks
    from ..model.signature import TrainingMatch

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
    # cosine similarity to the nearest training image, and whether it is below the model's cut-off (unlike the
    # training photos); None where the model cannot tell (an exported file; an older checkpoint: unfamiliar only)
    similarity: float | None = None
    unfamiliar: bool | None = None
    explanation: Explanation | None = None  # where the model looked, when asked (predict's explain)

    def to_dict(self) -> dict:
        data = {"path": self.path, "label": self.label, "probabilities": self.probabilities,
                "similarity": self.similarity, "unfamiliar": self.unfamiliar}
        data |= self.explanation.to_dict() if self.explanation else {}
        return data | ({"error": self.error} if self.error else {})


def prediction_lines(rows: Iterable[Prediction], class_names: list[str], format: str = "table",
                     threshold: float | None = None, explain: bool = False) -> Iterator[str]:
    """The rows as `stopsign predict` shows them, each line as soon as its row comes (a table waits for every
    row, to size its columns): "json", one array; "csv", the columns of a run's predictions.csv (one probability
    per class; with `explain`, the box and the winning region's score too); or a "table" of each label and its
    probability (with a threshold, the positive class's: the one the label follows)."""
    if format == "json":
        previous = None  # json.dumps(rows, indent=2), a row at a time: each row's comma once the next comes
        for r in rows:
            yield "[" if previous is None else previous + ","
            previous = textwrap.indent(json.dumps(r.to_dict(), indent=2), "  ")
        yield "[]" if previous is None else previous + "\n]"
        return
    if format == "csv":
        boxes = ["box_left", "box_top", "box_right", "box_bottom", "region_score"] if explain else []
        yield csv_line(["path", "label", *(f"p_{name}" for name in class_names), "error", "similarity", "unfamiliar",
                        *boxes])
        for r in rows:
            probabilities = [f"{r.probabilities[name]:.4f}" if r.label else "" for name in class_names]
            familiarity = ["" if r.similarity is None else f"{r.similarity:.4f}",
                           "" if r.unfamiliar is None else str(r.unfamiliar).lower()]
            looked = r.explanation
            where = ([*looked.box, "" if looked.region_score is None else f"{looked.region_score:.4f}"] if looked
                     else [""] * len(boxes))
            yield csv_line([r.path, r.label or "", *probabilities, r.error or "", *familiarity, *where])
        return
    rows = list(rows)
    shown = class_names[1] if threshold is not None else None
    width, label_width = max([len(r.path) for r in rows] + [4]), max([len(name) for name in class_names] + [5])
    yield f"{'path':<{width}}  {'label':<{label_width}} {f'p({shown})' if shown else 'probability'}"
    for r in rows:
        value = (f"{r.label:<{label_width}} {r.probabilities[shown or r.label]:.3f}" if r.label
                 else f"{'-':<{label_width}} error: {r.error}")
        yield f"{r.path:<{width}}  {value}"


def familiarity_marks(match: TrainingMatch | None, count: int) -> tuple[list, list]:
    """Each of `count` images' nearest-training similarity and unfamiliar mark (Classifier.training_match), None
    where the model cannot tell."""
    if match is None:
        return [None] * count, [None] * count
    return match.similarity, match.unfamiliar or [None] * count


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
    tile_pixels: int = 0  # > 0: the crops are squares of that many pixels of the photo (model.transforms.pixel_grid)
    threshold: float | None = None  # the model's own decision threshold (training/threshold.py); None: argmax
    unfamiliar_below: float | None = None  # the similarity cut-off of unfamiliar photos (model.signature)
    explains: bool = False  # whether explanations() can say where the model looked (a .pt checkpoint's backbone)

    @property
    def decode_side(self) -> int:
        """The side to decode a photo at (a JPEG draft) so that each tile still has the model's input side."""
        return decode_size(self.preprocessing, self.tiles, self.tile_pixels)

    @abc.abstractmethod
    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        """Class probabilities (N, C) for the readable images, and {path: reason} for the others."""

    @abc.abstractmethod
    def image_probabilities(self, images: list) -> np.ndarray:
        """Class probabilities (N, C) of decoded RGB images (uploads, say)."""

    def training_match(self, paths: list[Path]) -> TrainingMatch | None:
        """How readable image files compare with the model's training images (a model.signature.TrainingMatch:
        copies, nearest similarity, unfamiliar marks), or None where the model keeps no record of them (an
        exported file holds no features to compare)."""
        return None

    def image_match(self, images: list) -> TrainingMatch | None:
        """training_match() of decoded images (uploads); their bytes are unknown, so no exact copies."""
        return None

    def explanations(self, paths: list[Path]) -> list[Explanation]:
        """Where the model looked in each readable image file (inference.explain.Explanation), in order."""
        raise self._cannot_explain()

    def image_explanations(self, images: list, sizes: list | None = None) -> tuple[np.ndarray, list[Explanation]]:
        """image_probabilities() of decoded images and where the model looked in each; `sizes`: the photos'
        upright (width, height) before a reduced decode, the frame of the boxes (default: the images' own)."""
        raise self._cannot_explain()

    def _cannot_explain(self) -> StopsignError:
        return StopsignError(f"{self.backbone_name}: this exported model gives no region scores to explain (its "
                             "pooling is not regions, or it was exported before they were); explain with the run's "
                             "best.pt, or export it again")

    def explained_probabilities(self, paths: list[Path], progress: bool = False
                                ) -> tuple[list[Path], np.ndarray, dict, list[Explanation]]:
        """probabilities() of image files, and where the model looked in each readable one (explanations())."""
        readable, probs, skipped = self.probabilities(paths, progress=progress)
        return readable, probs, skipped, self.explanations(readable) if readable else []

    def score(self, paths: list[Path], progress: bool = False
              ) -> tuple[list[Path], np.ndarray, dict, TrainingMatch | None]:
        """probabilities(), and how the readable images compare with the training images (training_match)."""
        readable, probs, skipped = self.probabilities(paths, progress=progress)
        return readable, probs, skipped, self.training_match(readable)

    def predict(self, images, *, threshold: float | None = None, progress: bool = False,
                explain: bool | str | Path = False) -> list[Prediction]:
        """Predict files, folders and glob patterns: one row per input file, in order; an unreadable file gets
        a row with its error instead of a label. `threshold` (two classes): the second class when p >= it (None:
        the model's own, chosen when it was trained; argmax for a model that has none). `explain`: each row also
        says where the model looked (row.explanation: the box, the winning region's score); a folder: each photo
        is also written into it with its regions shaded by score and the box outlined."""
        return list(self.predict_iter(images, threshold=threshold, progress=progress, explain=explain))

    def predict_iter(self, images, *, threshold: float | None = None, progress: bool = False,
                     chunk: int = PREDICT_CHUNK, explain: bool | str | Path = False) -> Iterator[Prediction]:
        """predict()'s rows as they come, `chunk` files at a time: a folder of any size in bounded memory, its
        first rows out before its last files are read. threshold None: the model's own (self.threshold). No image
        found, a threshold out of range, or `explain` of a model that cannot, raises here, before any row is asked
        for (and any header printed)."""
        if explain and not self.explains:
            raise self._cannot_explain()
        inputs = images if isinstance(images, (list, tuple)) else [images]
        names: dict[str, str] = {}  # local copy → the URL it came from, as the rows name it
        paths = expand_inputs(inputs, names)
        if not paths:
            raise StopsignError(f"no image found in {', '.join(map(str, inputs)) or 'no input'}: give image files, "
                                "folders holding images, or glob patterns that match some")
        threshold = self.threshold if threshold is None else threshold
        if threshold is not None:
            check_threshold(threshold, len(self.class_names))  # before any work
        folder = Path(explain) if explain and explain is not True else None
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StopsignError(f"{folder}: cannot hold the explained photos ({error.strerror or error})") from None
        return self._predict_chunks(paths, names, threshold, progress, chunk, bool(explain), folder)

    def _predict_chunks(self, paths: list[Path], names: dict[str, str], threshold: float | None, progress: bool,
                        chunk: int, explain: bool = False, folder: Path | None = None) -> Iterator[Prediction]:
        """predict_iter's rows, `chunk` files at a time, each named as its input was (`names`: a URL's); with
        `explain`, where the model looked, each photo drawn so into `folder` when one is given."""
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress or len(paths) <= chunk)
        taken: set[str] = set()  # the names written into `folder`
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            if explain:
                readable, probs, skipped, looked = self.explained_probabilities(
                    part, progress=progress and len(paths) <= chunk)
                match = self.training_match(readable)
            else:
                readable, probs, skipped, match = self.score(part, progress=progress and len(paths) <= chunk)
                looked = [None] * len(readable)
            labels = decide(probs, threshold) if len(probs) else []
            similarity, unfamiliar = familiarity_marks(match, len(readable))
            by_path = {str(p): row for p, row in zip(readable, zip(probs, labels, similarity, unfamiliar, looked))}
            for path in part:
                shown = names.get(str(path), str(path))
                if str(path) not in by_path:
                    yield Prediction(shown, None, {}, skipped.get(str(path), "cannot be read"))
                    continue
                row, label, nearest, unlike, explained = by_path[str(path)]
                if folder is not None:
                    write_explanation(path, explained, folder, taken)
                yield Prediction(shown, self.class_names[int(label)],
                                 {name: float(p) for name, p in zip(self.class_names, row)},
                                 similarity=nearest, unfamiliar=unlike, explanation=explained)
            bar.update(len(part))
        bar.close()


class BatchClassifier(Classifier):
    """A classifier over a whole exported network: preprocessed float32 batches (N, 3, size, size) in,
    probabilities out (`outputs`), and with a regions head each region's score and each tile's class activation
    map at the model's input side, which its explanations() show. Files are decoded and preprocessed here, in
    bounded batches."""

    batch_size = 16
    tiles = 1  # > 1: the network takes each image's tiles (N, tile_count, 3, size, size), cut here
    region_cells: list[int] | None = None  # a regions head's feature-map (rows, columns): region scores are output

    @abc.abstractmethod
    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """The network's outputs on a preprocessed float32 batch (N, 3, size, size), or on tiles (see `tiles`):
        probabilities (N, C), then with region_cells each region's score (N, R) and each cell's (N, T, h, w)."""

    def read_metadata(self, metadata: dict) -> None:
        """What an exported file's metadata (inference/exported.py) sets."""
        self.metadata = metadata
        self.class_names: list[str] = list(metadata["class_names"])
        self.backbone_name: str = metadata["backbone"]
        self.preprocessing: dict = dict(metadata["preprocessing"])
        self.tiles, self.tile_pixels = int(metadata.get("tiles", 1)), int(metadata.get("tile_pixels", 0))
        self.threshold = metadata.get("threshold")  # exports before thresholds were chosen: argmax
        self.region_cells = metadata.get("region_cells")
        self.explains = self.region_cells is not None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) of a preprocessed batch."""
        return self.outputs(batch)[0]

    def prepare(self, image) -> np.ndarray:
        """A decoded image as the network's input: preprocessed, or cut into its tiles and each preprocessed."""
        if self.tiles > 1:
            return np.stack(tile_views(image, self.preprocessing, self.tiles, pixels=self.tile_pixels))
        return preprocess(image, self.preprocessing)

    def explanations(self, paths: list[Path]) -> list[Explanation]:
        return self.explained_probabilities(paths)[3]

    def explained_probabilities(self, paths: list[Path], progress: bool = False
                                ) -> tuple[list[Path], np.ndarray, dict, list[Explanation]]:
        """One pass of the network gives both: the region and cell scores come with the probabilities. Decoded
        batch_size files at a time (bounded memory)."""
        readable, skipped, chunks, looked = [], {}, [], []
        for start in tqdm(range(0, len(paths), self.batch_size), desc="predict", unit="batch",
                          disable=not progress, leave=False):
            images, batch = [], []
            for path in paths[start:start + self.batch_size]:
                try:
                    images.append(read_image(path, draft=(self.decode_side,) * 2))
                    batch.append(Path(path))
                except StopsignError as error:
                    skipped[str(path)] = str(error)
                    log.warning("skipped %s: %s", path, error)
            if images:
                probs, explained = self.image_explanations(images, [photo_size(path) for path in batch])
                readable.extend(batch)
                chunks.append(probs)
                looked.extend(explained)
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(self.class_names)), dtype=np.float32)
        return readable, probs, skipped, looked

    def image_explanations(self, images: list, sizes: list | None = None) -> tuple[np.ndarray, list[Explanation]]:
        if not self.explains:
            raise self._cannot_explain()
        parts = [self.outputs(np.stack([self.prepare(image) for image in images[start:start + self.batch_size]]))
                 for start in range(0, len(images), self.batch_size)]
        probs, scores, *cells = (np.concatenate([part[index] for part in parts]) for index in range(len(parts[0])))
        looked = []
        for index, (image, size) in enumerate(zip(images, sizes or [image.size for image in images])):
            tile = int(scores[index].argmax()) // REGIONS  # the winning region's tile: its map is the box
            cam = cells[0][index, tile] if cells else None  # files exported before cell_scores: the region's box
            looked.append(explanation(image.size, size, self.tiles, scores[index], self.region_cells, cam, tile,
                                      self.tile_pixels))
        return probs, looked

    def image_probabilities(self, images: list) -> np.ndarray:
        return self.run(np.stack([self.prepare(image) for image in images]))

    def probabilities(self, paths: list[Path], progress: bool = False) -> tuple[list[Path], np.ndarray, dict]:
        size = self.decode_side
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
