"""Data checks before training: class counts and imbalance, exact and near-duplicate images.

A copy of a photo in both train and validation makes validation accuracy a memory test, and with
~20 validation images one leaked copy moves accuracy by five points; these checks find such copies.
Files that fail to open are skipped here without a word: the data module reports them.
Each file's (sha256, pHash) pair is kept in a small on-disk map per folder (HashCache), so a second run over
the same photos decodes none of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from ..cache import HASH_CACHE, store_dir
from ..errors import StopsignError
from ..files import atomic_write_text

logger = logging.getLogger(__name__)

NEAR_THRESHOLD = 6  # Hamming distance (of 64 bits) at or under which two images count as near duplicates
IMBALANCE_WARNING = 3.0  # warn when the largest class has this many times the images of the smallest
_HASH_SIDE = 8  # 8 x 8 low-frequency DCT coefficients = a 64-bit hash
_SAMPLE_SIDE = 32  # the image is reduced to 32 x 32 grey before the DCT, as in the usual pHash


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash (pHash) of an image.

    Bit i is set when the i-th of the 8 x 8 lowest-frequency DCT-II coefficients (scipy's) of the 32 x 32 grey
    image lies above their median, so resizing, re-encoding and small colour changes leave most bits unchanged.
    These few lines stand in for imagehash, which would add PyWavelets (scipy already comes with scikit-learn).
    """
    grey = image.convert("L").resize((_SAMPLE_SIDE, _SAMPLE_SIDE), Image.Resampling.LANCZOS)
    low = dctn(np.asarray(grey, dtype=float), type=2)[:_HASH_SIDE, :_HASH_SIDE]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _open_small(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    # A JPEG decodes straight to grey at 1/2 to 1/8 scale: most of the speed on full-size photos.
    image.draft("L", (4 * _SAMPLE_SIDE, 4 * _SAMPLE_SIDE))
    image = ImageOps.exif_transpose(image)  # a copy rotated by EXIF and one rotated in pixels look alike
    image.thumbnail((4 * _SAMPLE_SIDE, 4 * _SAMPLE_SIDE))
    return image


def _hamming_distances(hashes: np.ndarray, rows: slice) -> np.ndarray:
    differing = hashes[rows, None] ^ hashes[None, :]
    return np.unpackbits(differing.view(np.uint8).reshape(*differing.shape, 8), axis=-1).sum(axis=-1)


class HashCache:
    """(sha256, pHash) per file, one JSON map per folder, keyed by file name, size and mtime_ns.

    A damaged or unreadable map is ignored (its files are hashed again) and a map that cannot be written
    costs speed, never the check. An edited file changes its size or mtime, so it misses and is hashed again.
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder else None
        self.maps: dict[str, dict] = {}  # resolved image folder -> {file name: [size, mtime_ns, sha256, phash]}
        self.changed: set[str] = set()

    def _file(self, image_folder: str) -> Path:
        return self.folder / f"{hashlib.sha256(image_folder.encode()).hexdigest()[:24]}.json"

    def _map(self, image_folder: str) -> dict:
        if image_folder not in self.maps:
            self.maps[image_folder] = {}
            try:
                stored = json.loads(self._file(image_folder).read_text(encoding="utf-8"))
                if stored.get("folder") == image_folder and isinstance(stored.get("files"), dict):
                    self.maps[image_folder] = stored["files"]
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as error:
                logger.warning("ignoring the damaged hash cache %s (%s)", self._file(image_folder), error)
        return self.maps[image_folder]

    def get(self, path: str, info: os.stat_result) -> tuple[str, int] | None:
        if self.folder is None:
            return None
        folder, name = os.path.split(os.path.realpath(path))
        entry = self._map(folder).get(name)
        if (isinstance(entry, list) and len(entry) == 4 and entry[:2] == [info.st_size, info.st_mtime_ns]
                and isinstance(entry[2], str) and isinstance(entry[3], int)):
            return entry[2], entry[3]
        return None

    def put(self, path: str, info: os.stat_result, digest: str, phash: int) -> None:
        if self.folder is None:
            return
        folder, name = os.path.split(os.path.realpath(path))
        self._map(folder)[name] = [info.st_size, info.st_mtime_ns, digest, phash]
        self.changed.add(folder)

    def save(self) -> None:
        for image_folder in sorted(self.changed):
            try:
                atomic_write_text(self._file(image_folder), json.dumps({"folder": image_folder,
                                                                        "files": self.maps[image_folder]}))
            except StopsignError as error:
                logger.warning("cannot write the hash cache (%s); continuing without it", error)
        self.changed.clear()


def find_duplicates(paths: list[Path], *, near_threshold: int = NEAR_THRESHOLD, cache_dir: Path | None = None,
                    progress: bool = False) -> dict:
    """Groups of identical files (sha256 of the bytes) and of look-alike images (pHash within near_threshold).

    Returns {"exact": [[path, ...]], "near": [{"paths": [...], "max_distance": d}], "unreadable": [...]}.
    A near group lists every file of each look-alike content, exact copies included,
    and is reported only when it holds at least two different contents. cache_dir: where HashCache keeps
    the hashes of files already seen (None: hash every file). progress: a bar over the files (a first run
    decodes every photo).
    """
    cache = HashCache(cache_dir)
    by_digest: dict[str, list[str]] = defaultdict(list)
    hash_of: dict[str, int] = {}
    unreadable = []
    for path in tqdm(list(map(str, paths)), desc="hashing", unit="img", disable=not progress, leave=False):
        try:
            info = os.stat(path)  # before reading: a later edit changes the mtime, so the entry misses
            if known := cache.get(path, info):
                digest, hash_of[digest] = known
            else:
                data = Path(path).read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest not in hash_of:  # decode one file per content
                    hash_of[digest] = perceptual_hash(_open_small(data))
                cache.put(path, info, digest, hash_of[digest])
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable.append(path)
            continue
        by_digest[digest].append(path)
    cache.save()

    exact = [sorted(group) for group in by_digest.values() if len(group) > 1]
    digests = list(by_digest)
    hashes = np.array([hash_of[d] for d in digests], dtype=np.uint64)
    near = [{"paths": sorted(p for m in members for p in by_digest[digests[m]]),
             "max_distance": int(_hamming_distances(hashes[members], slice(None)).max())}
            for members in _linked_groups(hashes, near_threshold)]
    logger.debug("hashed %d files: %d exact and %d near-duplicate groups", len(paths), len(exact), len(near))
    return {"exact": sorted(exact), "near": sorted(near, key=lambda g: g["paths"]), "unreadable": unreadable}


def _linked_groups(hashes: np.ndarray, threshold: int, block: int = 512) -> list[np.ndarray]:
    """The connected components (two or more members, as index arrays) of the graph "Hamming distance <= threshold"."""
    if not len(hashes):
        return []
    pairs = [np.argwhere(_hamming_distances(hashes, slice(first, first + block)) <= threshold) + (first, 0)
             for first in range(0, len(hashes), block)]  # blocks of rows keep the distance matrix small
    rows, columns = np.concatenate(pairs).T
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(hashes), len(hashes)))
    components = connected_components(graph, directed=False)[1]
    return [np.flatnonzero(components == c) for c in np.flatnonzero(np.bincount(components) > 1)]


def duplicate_groups(paths, *, cache_dir: Path | None = None, progress: bool = False) -> dict[str, int]:
    """Each image that has an exact or near copy among `paths` → the number of its group (0, 1, ... in path
    order); images with no copy are left out. The split, the folds and tune keep each group on one side."""
    found = find_duplicates(list(paths), cache_dir=cache_dir or store_dir(HASH_CACHE), progress=progress)
    # A near group holds every copy of each of its contents, so the groups below never overlap.
    near = [group["paths"] for group in found["near"]]
    in_near = {path for group in near for path in group}
    groups = sorted(near + [group for group in found["exact"] if group[0] not in in_near])
    return dict(sorted((path, number) for number, group in enumerate(groups) for path in group))


def check_data(splits: dict[str, list], class_names: list[str], *, cache_dir: Path | None = None) -> dict:
    """Class counts, imbalance and duplicates of a split data set, with a plain sentence per problem.

    `splits` maps a split name ("train", "val", "test") to its samples (anything with .path and .label).
    A duplicate group is cross-split when its files lie in more than one split: the held-out copies
    were seen in training (or are counted twice), so held-out scores are inflated. cache_dir: where the
    per-file hashes are kept (default: the cache's hash store).
    """
    class_counts = {split: {name: Counter(s.label for s in samples)[k] for k, name in enumerate(class_names)}
                    for split, samples in splits.items()}
    imbalance = _imbalance(class_counts, class_names)
    warnings = [imbalance["warning"]] if imbalance["warning"] else []
    for split, counts in class_counts.items():
        missing = [name for name, count in counts.items() if count == 0]
        if split != "train" and missing and sum(counts.values()):
            warnings.append(f"The {split} split has no images of {', '.join(map(repr, missing))}: their recall "
                            "(and the ROC AUC) cannot be measured on it.")
    where: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for split, samples in splits.items():
        for sample in samples:
            where[str(sample.path)].append((split, int(sample.label)))
    if listed_twice := [path for path, places in where.items() if len(places) > 1]:
        warnings.append(f"Files listed more than once: {len(listed_twice)} (first: {listed_twice[0]}).")
    found = find_duplicates(list(where), cache_dir=cache_dir or store_dir(HASH_CACHE))

    def describe(paths: list[str]) -> dict:
        files = [{"path": path, "split": split, "label": class_names[label]}
                 for path in paths for split, label in where[path]]
        return {"files": files, "cross_split": len({f["split"] for f in files}) > 1,
                "labels_disagree": len({f["label"] for f in files}) > 1}

    exact = [describe(paths) for paths in found["exact"]]
    near = [{**describe(group["paths"]), "max_distance": group["max_distance"]} for group in found["near"]]
    cross_split = sum(group["cross_split"] for group in exact + near)
    disagree = sum(group["labels_disagree"] for group in exact + near)
    if exact:
        copies = sum(len(group["files"]) - 1 for group in exact)
        warnings.append(f"Images stored more than once under different names: {len(exact)} ({copies} extra files).")
    if near:
        warnings.append(f"Groups of near-duplicate images (resized, re-encoded or lightly edited copies): {len(near)}.")
    if cross_split:
        warnings.append(f"Duplicate groups spanning more than one split: {cross_split}. The held-out copies were seen "
                        "in training, so held-out accuracy is inflated; keep each group in one split or remove the "
                        "copies.")
    if disagree:
        warnings.append(f"Duplicate groups whose copies carry different labels: {disagree}. Fix the labels.")
    return {"class_counts": class_counts, "imbalance": imbalance, "exact_duplicates": exact, "near_duplicates": near,
            "cross_split": cross_split, "warnings": warnings}


def _imbalance(class_counts: dict[str, dict[str, int]], class_names: list[str]) -> dict:
    totals = {name: sum(counts[name] for counts in class_counts.values()) for name in class_names}
    largest, smallest = max(totals, key=totals.get), min(totals, key=totals.get)
    if totals[smallest] == 0:
        return {"ratio": None, "warning": f"Class {smallest!r} has no images at all: add some or drop the class."}
    ratio = totals[largest] / totals[smallest]
    warning = (f"Classes are imbalanced: {largest!r} has {totals[largest]} images, {smallest!r} only "
               f"{totals[smallest]} (ratio {ratio:.1f}). Accuracy flatters a model that favours {largest!r}; "
               "read per-class recall and macro F1.") if ratio >= IMBALANCE_WARNING else None
    return {"ratio": ratio, "warning": warning}
