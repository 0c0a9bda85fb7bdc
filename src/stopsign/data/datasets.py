"""Labelled data sets: the four layouts on disk, validation of their labels, the seeded stratified split.

`load_data()` recognises the layout, checks every entry, and either returns a `LabelledData` or raises one
`DataError` that lists every problem found and says how to fix it. Decoding is `images.py`'s business; here a
file only has to exist, where its layout allows:

- class folders and split folders (the user's own): links are followed wherever they lead, as torchvision's
  ImageFolder does; a broken link is skipped.
- CSV (the user's own): a file name is relative to the CSV's folder (looked up there, then in images/), may hold
  subfolders and '../', or is absolute; links are followed, as fastai's from_csv does.
- CV Studio export (`_annotations.json`, made elsewhere and downloaded): each key is a plain file name in the
  export folder (or its images/), and a link out of the export folder is refused, so a crafted export cannot make
  stopsign read, train on or show a file beside it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ..errors import DataError
from ..storage import fetch, is_url
from .images import list_images

logger = logging.getLogger(__name__)

ANNOTATIONS = "_annotations.json"
VAL_FOLDERS = ("val", "valid", "validation")
MAX_LISTED = 20  # problems shown in one error; the rest are counted
# Entries `stopsign review` excluded (data/labels.py): still in the file, never trained on or checked.
EXCLUDED_KEY = "stopsign_excluded"  # CV Studio: true in an entry's annotation objects
EXCLUDED_COLUMN = "excluded"  # CSV: yes, true or 1 in this column
EXCLUDED_VALUES = ("yes", "true", "1")
LAYOUT_HELP = """stopsign reads four layouts:
  1. CV Studio export: DATA/_annotations.json, images in DATA/images/ (or beside the JSON)
  2. class folders:    DATA/<class>/*.jpg
  3. split folders:    DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg (optional DATA/test/)
  4. CSV:              DATA/labels.csv or any DATA.csv with the header filename,label"""
CVSTUDIO_FIX = f"Fix or delete these entries in {ANNOTATIONS} (or export the data set from CV Studio again)."
FOLDERS_FIX = "Give each class its own folder of images: DATA/<class>/, or DATA/train/<class>/ and DATA/val/<class>/."
CSV_FIX = ("Fix these rows of the CSV: each row names one image file (relative to the CSV's folder, or absolute) "
           "and its label.")


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    label: int  # index into class_names


@dataclass
class LabelledData:
    root: Path  # the data folder
    layout: str  # "cvstudio" | "folders" | "splits" | "csv"
    class_names: list[str]
    samples: list[Sample]  # every sample, all splits together
    splits: dict[str, list[Sample]] | None  # None unless the layout fixes "train", "val" (and "test")
    skipped: dict[str, str] = field(default_factory=dict)  # path → reason: class-folder entries that are no file

    def class_counts(self, samples: list[Sample] | None = None) -> dict[str, int]:
        """Images per class name, in class order, zeros included."""
        counts = Counter(sample.label for sample in (self.samples if samples is None else samples))
        return {name: counts[index] for index, name in enumerate(self.class_names)}


def load_data(path: str | os.PathLike, class_names: list[str] | None = None, *, progress: bool = False
              ) -> LabelledData:
    """Load a labelled data set in any of the four layouts (see LAYOUT_HELP), from a folder, a file or a URL
    (s3://bucket/prefix/ and the like: fetched into the local mirror first, see storage.py).

    `class_names` fixes the class order (a trained model's classes); a label outside it is an error.
    """
    if is_url(path):
        path = fetch(path, progress=progress)
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_file() and path.suffix.lower() in (".json", ".csv"):
        return (_load_cvstudio if path.suffix.lower() == ".json" else _load_csv)(path, class_names)
    if path.is_dir():
        if (path / ANNOTATIONS).is_file():
            return _load_cvstudio(path / ANNOTATIONS, class_names)
        if (path / "labels.csv").is_file():
            if set(_subfolders(path)) - {"images"}:  # the CSV wins over folders that look like classes: say so
                logger.warning("%s: reading the labels from labels.csv, not from the class folders beside it "
                               "(move labels.csv away to use the folders)", path)
            return _load_csv(path / "labels.csv", class_names)
        if subfolders := _subfolders(path):
            return _load_folders(path, subfolders, class_names)
    reason = "does not exist" if not path.exists() else "is not a data set stopsign recognises"
    raise DataError(f"{path}: {reason}.\n{LAYOUT_HELP}")


def export_folders(root: Path) -> list[Path]:
    """Where a CV Studio export's images are looked up, in order: its images/ (when there), then its own folder."""
    return [root / "images", root] if (root / "images").is_dir() else [root]


def csv_folders(root: Path) -> list[Path]:
    """Where a CSV's file names are looked up, in order: the CSV's folder, then its images/ (when there)."""
    return [folder for folder in (root, root / "images") if folder.is_dir()]


def _read_json(json_path: Path) -> tuple[dict, list[str]]:
    """The export's document and the keys that appear twice in one object: json.loads keeps the last of two equal
    keys without a word, and a repeated file name is a labelling slip."""
    repeated: list[str] = []

    def keep_pairs(pairs: list[tuple]) -> dict:
        repeated.extend(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        return dict(pairs)

    try:
        document = json.loads(json_path.read_text(encoding="utf-8"), object_pairs_hook=keep_pairs)
    except json.JSONDecodeError as error:
        raise DataError(f"{json_path}: not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.\n"
                        "Repair the file there, or export the data set from CV Studio again.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{json_path}: cannot be read as UTF-8 text ({error}).\n{CVSTUDIO_FIX}") from None
    except (ValueError, RecursionError) as error:  # a number of over 4300 digits; nesting deeper than Python's stack
        raise DataError(f"{json_path}: not a usable JSON document ({str(error)[:200]}).\n{CVSTUDIO_FIX}") from None
    if not isinstance(document, dict):
        raise DataError(f"{json_path}: the top level must be a JSON object.\n{CVSTUDIO_FIX}")
    return document, repeated


def _load_cvstudio(json_path: Path, class_names: list[str] | None) -> LabelledData:
    root = json_path.parent
    document, repeated = _read_json(json_path)
    problems = [f"{key!r}: appears more than once (keep one entry)" for key in repeated]
    if document.get("type", "classification") != "classification":
        problems.append(f"type is {document['type']!r}: stopsign needs a 'classification' export")
    labels = document.get("labels")
    if not (isinstance(labels, list) and all(isinstance(label, str) and label for label in labels)):
        problems.append("'labels' must be a list of class names (strings)")
        labels = None  # entries are still checked, but not against the labels
    elif len(set(labels)) < len(labels):
        problems.append(f"'labels' lists a class twice: {labels}")
    annotations = document.get("annotations")
    if not isinstance(annotations, dict):
        problems.append("'annotations' must be an object mapping each file name to a list of labels")
        annotations = {}
    classes = list(class_names) if class_names is not None else list(labels or [])
    folders = export_folders(root)
    samples, found = [], set()
    for name, entry in annotations.items():
        if is_excluded(entry):
            found.add(named_file(name, folders))  # no "without a label" warning for it
            continue
        label, reasons = _one_label(entry)
        if label is not None and labels is not None and label not in labels:
            reasons.append(f"label {label!r} is not in 'labels' {labels}")
        elif label is not None and class_names is not None and label not in classes:
            reasons.append(f"label {label!r} is not one of the classes {classes}")
        file = locate(name, folders, root, reasons, confined=True)  # an export comes from elsewhere
        found.add(file or named_file(name, folders))  # a refused link is this entry's problem, not an unlisted file
        if reasons:
            problems.append(f"{name!r}: " + "; ".join(reasons))
        elif label in classes:  # not so when 'labels' was unreadable (already a problem)
            samples.append(Sample(file, classes.index(label)))
    _warn_unlisted(folders, found, json_path)
    return _finish(root, "cvstudio", classes, labels, samples, None, problems, json_path, CVSTUDIO_FIX)


def is_excluded(value: object) -> bool:
    """Whether a CV Studio entry (its list of annotation objects) or a CSV `excluded` cell marks it excluded."""
    if isinstance(value, list):
        return any(isinstance(a, dict) and a.get(EXCLUDED_KEY) is True for a in value)
    return str(value or "").strip().lower() in EXCLUDED_VALUES


def _one_label(entry: object) -> tuple[str | None, list[str]]:
    """The entry's one label, or None and why there is not exactly one."""
    if not (isinstance(entry, list) and all(isinstance(a, dict) and isinstance(a.get("label"), str) for a in entry)):
        return None, ['must be a list of {"label": "<class>"} objects']
    names = [annotation["label"] for annotation in entry]
    if len(names) == 1:
        return names[0], []
    if not names:
        return None, ["has no label: label it or delete the entry"]
    return None, [f"has {len(names)} labels ({', '.join(names)}): a classification image needs exactly one"]


def _load_csv(csv_path: Path, class_names: list[str] | None) -> LabelledData:
    root = csv_path.parent
    try:
        reader = csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"), newline=""))
        reader.fieldnames = header = [name.strip().lower() for name in reader.fieldnames or []]
        rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{csv_path}: cannot be read as a UTF-8 CSV file ({error}).\n{CSV_FIX}") from None
    if not {"filename", "label"} <= set(header):
        raise DataError(f"{csv_path}: the header must be 'filename,label', found {','.join(header)!r}.\n{CSV_FIX}")
    # DictReader keeps a row's fields past the header under the key None: a file name with an unquoted comma,
    # say. Its fields cannot be told apart, so the row is one problem, not a missing file and a class.
    problems = [f"line {line}: a malformed row: expected {len(header)} fields ({','.join(header)}), found "
                f"{len(header) + len(row[None])} (quote a file name or label that holds a comma)"
                for line, row in rows if None in row]
    folders = csv_folders(root)
    found, entries = set(), []
    for line, row in rows:
        name = (row["filename"] or "").strip()
        if None in row or is_excluded(row.get(EXCLUDED_COLUMN)):  # set aside: still no "image without a label"
            found.add(locate(name, folders, root, [], confined=False))
        else:
            entries.append((line, name, (row["label"] or "").strip()))
    own = sorted({label for _, _, label in entries if label})
    classes = list(class_names) if class_names is not None else own
    samples, first_line = [], {}
    for line, name, label in entries:
        reasons = []
        if not label:
            reasons.append("has no label")
        elif label not in classes:
            reasons.append(f"label {label!r} is not one of the classes {classes}")
        if name in first_line:
            reasons.append(f"is listed again (first on line {first_line[name]})")
        first_line.setdefault(name, line)
        file = locate(name, folders, root, reasons, confined=False)  # the user's own list: any path
        found.add(file)
        if reasons:
            problems.append(f"line {line} {name!r}: " + "; ".join(reasons))
        else:
            samples.append(Sample(file, classes.index(label)))
    _warn_unlisted(folders, found, csv_path)
    return _finish(root, "csv", classes, own, samples, None, problems, csv_path, CSV_FIX)


def _load_folders(root: Path, subfolders: list[str], class_names: list[str] | None) -> LabelledData:
    """Class folders, or split folders (train/ and val/, optional test/) each holding class folders."""
    problems: list[str] = []
    folders = {None: root}  # split name -> folder of class folders
    if "train" in subfolders:
        if not (val_names := [name for name in VAL_FOLDERS if name in subfolders]):
            raise DataError(f"{root}: has train/ but no val/ (or valid/, validation/) beside it.\n{LAYOUT_HELP}")
        if len(val_names) > 1:
            problems.append(f"several validation folders ({', '.join(val_names)}): keep one")
        folders = {"train": root / "train", "val": root / val_names[0]}
        folders.update({"test": root / "test"} if "test" in subfolders else {})
    own = sorted({name for folder in folders.values() for name in _subfolders(folder)})
    classes = list(class_names) if class_names is not None else own
    skipped: dict[str, str] = {}
    splits = {split: _class_folders(folder, root, classes, problems, skipped) for split, folder in folders.items()}
    for split in [split for split in ("train", "val") if split in splits]:  # each class must be in both
        counts = Counter(classes[sample.label] for sample in splits[split])
        problems += [f"{folders[split].name}/{name}: no images" for name in own if name in classes and not counts[name]]
    if loose := list_images(root):
        logger.warning("%s: %d image(s) outside the class folders were ignored", root, len(loose))
    samples = [sample for split in splits.values() for sample in split]
    layout, splits = ("folders", None) if None in splits else ("splits", splits)
    return _finish(root, layout, classes, own, samples, splits, problems, root, FOLDERS_FIX, skipped)


def _class_folders(folder: Path, root: Path, classes: list[str], problems: list[str],
                   skipped: dict[str, str]) -> list[Sample]:
    """Samples from folder/<class>/*; a folder naming an unknown class is a problem. Links are followed (a data
    set assembled from links into a photo library); broken links and loops go to `skipped`."""
    samples = []
    for name in _subfolders(folder):
        if (index := class_index(name, classes)) is None:
            problems.append(f"{folder.relative_to(root) / name}/: {name!r} is not one of the classes {classes}")
        else:
            samples += [Sample(file, index) for file in list_images(folder / name, skipped)]
    return samples


def class_index(name: str, classes: list[str]) -> int | None:
    """The index of class `name`, spelt as given or, when exactly one class matches, with another case or with
    "-", "_" and spaces for one another (a folder "not-stop" for a model's class "not_stop"); else None."""
    if name in classes:
        return classes.index(name)

    def key(text: str) -> str:
        return re.sub(r"[-_\s]+", "_", text.strip().lower())

    matches = [i for i, known in enumerate(classes) if key(known) == key(name)]
    if len(matches) == 1:
        logger.info("folder %r read as class %r", name, classes[matches[0]])
        return matches[0]
    return None


def _finish(root, layout, classes, own, samples, splits, problems, source, fix, skipped=None) -> LabelledData:
    """Class-level checks, then one error with every problem, or the data set."""
    counts = Counter(classes[sample.label] for sample in samples)
    if own is not None:  # None: the data's own class list was unreadable (already a problem)
        problems += [f"class '{name}' has no images" for name in own if name in classes and not counts[name]]
        if len(own) < 2 and len(classes) < 2:
            problems.append(f"found {len(own)} class(es) {own}: a classifier needs at least two")
    if problems:
        listed = [f"  - {problem}" for problem in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            listed.append(f"  ... and {len(problems) - MAX_LISTED} more")
        raise DataError("\n".join([f"{source}: {len(problems)} problem(s):", *listed, fix]))
    if missing := [name for name in classes if not counts[name]]:
        logger.warning("%s: no images of class(es) %s", source, ", ".join(missing))
    return LabelledData(root, layout, list(classes), samples, splits, skipped or {})


def locate(name: str, folders: list[Path], root: Path, reasons: list[str], *, confined: bool) -> Path | None:
    """The file `name` in the first of `folders` holding it; appends why not to `reasons`. confined (an export's
    keys): a plain file name, the file inside `root` with links followed; else (the user's own CSV) a relative path,
    with subfolders, or with '..' (from `root`, the CSV's folder, only), or an absolute path, links followed anywhere.
    """
    parts = re.split(r"[\\/]", name)
    if not name:
        reasons.append("no file name")
    elif confined and (os.path.isabs(name) or re.match(r"^([A-Za-z]:|[\\/])", name)):
        reasons.append("is an absolute path: name the file relative to the data folder")
    elif confined and ".." in parts:
        reasons.append("contains '..': the file must be inside the data folder")
    elif confined and len(parts) > 1:
        reasons.append("contains a path separator: give the plain file name")
    elif not confined and (Path(name).is_absolute() or ".." in Path(name).parts):
        file = root / name  # root / an absolute path is that path
        file = _directory_resolved(file) if ".." in file.parts else file
        if _is_file(file):
            return file
        reasons.append(f"file not found ({file})")
    else:
        for folder in folders:
            if _is_file(folder / name):  # False for broken links and link loops
                # Resolving both sides follows every link, so a link out of the data folder is never opened.
                if not confined or (folder / name).resolve().is_relative_to(root.resolve()):
                    return folder / name
                reasons.append("links to a file outside the data folder")
                return None
        where = " or ".join(f"{folder.name}/" if folder != root else "the data folder" for folder in folders)
        reasons.append(f"file not found (looked in {where})")
    return None


def named_file(name: str, folders: list[Path]) -> Path | None:
    """The file that an export's key names as a plain file name, in the first of `folders` holding it, whether
    or not `locate` lets it be read (a link out of the export): the key accounts for that file."""
    if not name or len(re.split(r"[\\/]", name)) > 1:
        return None
    return next((folder / name for folder in folders if _is_file(folder / name)), None)


def _directory_resolved(path: Path) -> Path:
    """`path` with its folder's links and '..' resolved as the OS does, its own name (maybe a link) kept."""
    try:
        return Path(os.path.realpath(path.parent)) / path.name
    except ValueError:  # a NUL byte in the name: no such file
        return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, say: no such file
        return False


def _subfolders(folder: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .git) are never classes.
    try:
        return sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith(".") and entry.is_dir())
    except OSError as error:
        raise DataError(f"{folder}: cannot list the folder ({error.strerror or error})") from None


def _warn_unlisted(folders: list[Path], listed: set[Path | None], source: Path) -> None:
    # A CSV may name a file of images/ as '../data/images/a.png': compare the files' real folders.
    listed = {_directory_resolved(file) for file in listed if file is not None}
    if unlisted := [f for folder in folders for f in list_images(folder) if _directory_resolved(f) not in listed]:
        logger.warning("%s: %d image(s) without a label were ignored, e.g. %s", source, len(unlisted), unlisted[0])


def split_samples(samples: list[Sample], val_fraction: float, seed: int, *, class_names: list[str] | None = None,
                  groups: dict[str, int] | None = None) -> tuple[list[Sample], list[Sample]]:
    """A seeded stratified (train, val) split: about `val_fraction` of each class, at least one, in val.

    groups: {path: group} (checks.duplicate_groups): the images of one group go to the same side, so no copy
    of a validation photo is trained on; a group counts for the class of its first image. Without groups, or
    with none, every image is its own group. Written by hand because sklearn's stratified split can leave a
    small class with no validation image.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    ordered = _checked(samples, 2, "to draw a validation split", class_names)
    by_unit: dict[object, list[Sample]] = {}  # the samples that stay together, in path order
    for sample in ordered:
        key = (groups or {}).get(str(sample.path))
        by_unit.setdefault(("group", key) if key is not None else ("image", str(sample.path)), []).append(sample)
    units: dict[int, list[list[Sample]]] = defaultdict(list)  # by the label of each unit's first sample
    for unit in sorted(by_unit.values(), key=lambda members: _order(members[0])):
        units[unit[0].label].append(unit)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, class_units in sorted(units.items()):
        size = sum(len(unit) for unit in class_units)
        count, taken = min(size - 1, max(1, math.floor(val_fraction * size + 0.5))), 0
        for i in rng.permutation(len(class_units)):
            unit = class_units[i]
            # a unit goes to val while that brings val nearer its share and leaves the class some training image
            if abs(taken + len(unit) - count) < abs(taken - count) and taken + len(unit) < size:
                val += unit
                taken += len(unit)
            else:
                train += unit
    return sorted(train, key=_order), sorted(val, key=_order)


def kfold_samples(samples: list[Sample], folds: int, seed: int, *, class_names: list[str] | None = None,
                  groups: dict[str, int] | None = None) -> list[tuple[list[Sample], list[Sample]]]:
    """Seeded stratified K-fold: `folds` (train, val) pairs; every sample is in val exactly once.

    groups: {path: group} (checks.duplicate_groups): each group's images fall in one fold (scikit-learn's
    StratifiedGroupKFold); without groups among these samples, StratifiedKFold.
    """
    if folds < 2:
        raise DataError(f"folds must be 2 or more, got {folds}")
    ordered = _checked(samples, folds, f"for {folds}-fold cross-validation", class_names)
    keys = [(groups or {}).get(str(sample.path)) for sample in ordered]
    ids = tuple(str(key) if key is not None else f"image {i}" for i, key in enumerate(keys)) \
        if any(key is not None for key in keys) else None
    return [([ordered[i] for i in train], [ordered[i] for i in val])
            for train, val in _fold_indices(tuple(s.label for s in ordered), ids, folds, seed)]


@lru_cache(maxsize=16)
def _fold_indices(labels: tuple[int, ...], ids: tuple[str, ...] | None, folds: int, seed: int) -> list:
    """kfold_samples' (train, val) index pairs, remembered: a run asks for the same folds to choose C, then the
    threshold (StratifiedGroupKFold's shuffle takes 60 ms for 200 images)."""
    if ids is not None:
        numbers = {key: n for n, key in enumerate(dict.fromkeys(ids))}  # in order of first appearance
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(labels)), labels, groups=[numbers[key] for key in ids]))
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def _order(sample: Sample) -> tuple[str, int]:
    # Sorting first makes a split depend on the seed only, not on the order the files were listed in.
    return str(sample.path), sample.label


def _checked(samples: list[Sample], minimum: int, purpose: str, class_names: list[str] | None) -> list[Sample]:
    """The samples in path order, once every class has at least `minimum` of them."""
    ordered = sorted(samples, key=_order)
    if not ordered:
        raise DataError(f"no images: at least {minimum} per class are needed {purpose}")
    counts, first = Counter(sample.label for sample in ordered), {s.label: s.path for s in reversed(ordered)}
    small = [f"class {class_names[label]!r}" if class_names else f"class {label} (e.g. {first[label]})"
             for label in sorted(counts) if counts[label] < minimum]
    if small:
        raise DataError(f"{'; '.join(small)}: fewer than {minimum} images, the least needed {purpose}. "
                        "Add images to that class, or remove it from the data set.")
    return ordered
