"""How each layout load_data reads stores a label, edited in place: the editors data/labels.py applies decisions
with (it owns the locking, the log, conflicts and undo). Nothing is deleted from disk but the copy an undone
addition made:

- CV Studio export: the entry's label in `_annotations.json` changes in place (the `labels` list, the key order
  and every field stopsign does not know are kept); an excluded entry keeps its label and gets
  `"stopsign_excluded": true` in its annotation objects, which load_data skips; an added photo is copied into the
  export's image folder and annotated with a new id.
- CSV: the row's label cell changes; an excluded row gets `yes` in an `excluded` column (added to the header when
  missing), which load_data skips; an added photo is copied into images/ (or beside the CSV) and appended as a row.
- class folders and split folders: the file moves to the other class's folder (a rename); an excluded file moves
  to `.excluded/<class>/` beside the class folders (a hidden folder is never a class); an added photo is copied
  into its class's folder (of train/, for split folders).

Each editor has one interface: load() the document (re-read for every decision: someone else may have changed
it), entry(document, key) -> (label or None, the raw entry undo restores), set / exclude / add / restore on the
document, save(document) atomically, key(path) and path(document, key) between image files and entry keys,
lock_file beside the source, and back_up(target) (written to target, a name that ends in backup_suffix).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import uuid
from pathlib import Path

from ..errors import DataError
from ..files import atomic_write_bytes, atomic_write_text, relative, write_csv
from .datasets import (ANNOTATIONS, EXCLUDED_COLUMN, EXCLUDED_KEY, EXCLUDED_VALUES, LabelledData, class_index,
                       csv_folders, export_folders, is_excluded, load_data, locate, named_file)

EXCLUDED_FOLDER = ".excluded"  # class folders: excluded files go to .excluded/<class>/
LOCK_NAME = ".stopsign-review.lock"
BOM = b"\xef\xbb\xbf"


def backend_for(path: Path, loaded: LabelledData):
    """The editor of `loaded`'s files; `path` is what was given to load_data (a folder, or its JSON or CSV)."""
    if loaded.layout == "cvstudio":
        return Annotations(path if path.is_file() else path / ANNOTATIONS)
    if loaded.layout == "csv":
        return Table(path if path.is_file() else path / "labels.csv")
    return Folders(loaded.root, loaded.class_names, loaded.layout)


def _copy_in(photo: Path, folder: Path, taken) -> Path:
    """A copy of `photo` in `folder`, named name-1, name-2 ... where a file of its name is there or `taken(name)`:
    an entry of that name (its file missing, or in another class folder) would be overwritten or made ambiguous."""
    stem, suffix = os.path.splitext(re.sub(r"[\\/]", "_", photo.name))
    name, n = stem + suffix, 0
    while (folder / name).exists() or taken(name):
        n += 1
        name = f"{stem}-{n}{suffix}"
    return atomic_write_bytes(folder / name, photo.read_bytes())


class _LabelFile:
    """A file of labels edited in place (an export's JSON, a CSV), backed up as a copy of itself."""

    backup_suffix = ""

    def __init__(self, file: Path):
        self.source, self.root, self.lock_file = file, file.parent, file.parent / LOCK_NAME

    def back_up(self, target: Path) -> Path:
        return atomic_write_bytes(target, self.source.read_bytes())

    def _remove_added(self, document, key: str, remove) -> None:
        """Undo an addition: `remove()` its entry from the document, save it, then delete the copy it made."""
        file = self.path(document, key)
        remove()
        self.save(document)
        if file is not None:
            file.unlink(missing_ok=True)


class Annotations(_LabelFile):
    """A CV Studio `_annotations.json`: parsed with its key order, written back in its own layout."""

    def load(self) -> dict:
        self.text = self.source.read_text(encoding="utf-8")
        return json.loads(self.text)  # dicts keep their key order

    def save(self, document: dict) -> None:
        # The export's own layout: CV Studio writes one line; an indented file stays indented as it was.
        indent = re.match(r"\{\s*\n([ \t]+)\"", self.text)
        text = json.dumps(document, ensure_ascii=False,
                          **({"indent": indent.group(1)} if indent else {"separators": (",", ":")}))
        atomic_write_text(self.source, text + ("\n" if self.text.endswith("\n") else ""))

    def key(self, path: Path) -> str:
        return path.name

    def entry(self, document: dict, key: str) -> tuple[str | None, list | None]:
        if (raw := document.get("annotations", {}).get(key)) is None:
            return None, None
        return (None if is_excluded(raw) or not raw else raw[0].get("label")), copy.deepcopy(raw)

    def path(self, document: dict, key: str) -> Path | None:
        return named_file(key, export_folders(self.root))

    def _annotations(self, document: dict, key: str) -> list:
        if not (raw := document.get("annotations", {}).get(key)):
            raise DataError(f"{self.source}: has no entry {key!r}")
        return raw

    def set(self, document: dict, key: str, label: str) -> None:
        raw = self._annotations(document, key)
        for annotation in raw:
            annotation.pop(EXCLUDED_KEY, None)
        raw[0]["label"] = label

    def exclude(self, document: dict, key: str) -> None:
        for annotation in self._annotations(document, key):
            annotation[EXCLUDED_KEY] = True

    def add(self, document: dict, photo: Path, label: str) -> str:
        annotations = document.setdefault("annotations", {})
        target = _copy_in(photo, export_folders(self.root)[0], taken=lambda name: name in annotations)
        annotations[target.name] = [{"label": label, "id": str(uuid.uuid4())}]
        return target.name

    def restore(self, document: dict, key: str, raw: list | None) -> None:
        if raw is None:
            self._remove_added(document, key, lambda: document["annotations"].pop(key, None))
        else:
            document["annotations"][key] = raw  # an existing key keeps its place


class Table(_LabelFile):
    """A CSV of filename,label (and any other columns, kept as they are)."""

    def load(self) -> dict:
        data = self.source.read_bytes()
        self.bom = data.startswith(BOM)
        text = data.decode("utf-8-sig")
        self.newline = "\r\n" if "\r\n" in text else "\n"
        rows = list(csv.reader(io.StringIO(text, newline="")))
        return {"rows": rows, "header": [cell.strip().lower() for cell in rows[0]] if rows else []}

    def save(self, document: dict) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=self.newline).writerows(document["rows"])
        atomic_write_bytes(self.source, (BOM if self.bom else b"") + buffer.getvalue().encode("utf-8"))

    def _column(self, document: dict, name: str, create: bool = False) -> int | None:
        header = document["header"]
        if name not in header and create:
            document["rows"][0].append(name)
            header.append(name)
        return header.index(name) if name in header else None

    def _names(self, document: dict) -> list[tuple[list, str]]:
        """(row, its file name cell) for every row that names a file."""
        column = self._column(document, "filename")
        return [(row, row[column].strip()) for row in document["rows"][1:] if len(row) > column and row[column].strip()]

    def _row(self, document: dict, key: str) -> list | None:
        return next((row for row, name in self._names(document) if name == key), None)

    def key(self, path: Path) -> str:
        names = [name for _, name in self._names(self.load())]
        if (key := next((name for name in names if self.path(None, name) == path), None)) is None:
            raise DataError(f"{self.source}: no row names {path}")
        return key

    def entry(self, document: dict, key: str) -> tuple[str | None, list | None]:
        if (row := self._row(document, key)) is None:
            return None, None
        excluded = self._column(document, EXCLUDED_COLUMN)
        if excluded is not None and len(row) > excluded and is_excluded(row[excluded]):
            return None, list(row)
        label = self._column(document, "label")
        return (row[label].strip() if len(row) > label else None), list(row)

    def path(self, document, key: str) -> Path | None:
        return locate(key, csv_folders(self.root), self.root, [], confined=False)

    def _cell(self, document: dict, key: str, column: int, value: str) -> None:
        if (row := self._row(document, key)) is None:
            raise DataError(f"{self.source}: has no row for {key!r}")
        row.extend([""] * (column + 1 - len(row)))
        row[column] = value

    def set(self, document: dict, key: str, label: str) -> None:
        self._cell(document, key, self._column(document, "label"), label)
        excluded, row = self._column(document, EXCLUDED_COLUMN), self._row(document, key)
        if excluded is not None and len(row) > excluded:
            row[excluded] = ""

    def exclude(self, document: dict, key: str) -> None:
        self._cell(document, key, self._column(document, EXCLUDED_COLUMN, create=True), EXCLUDED_VALUES[0])

    def add(self, document: dict, photo: Path, label: str) -> str:
        folder = csv_folders(self.root)[-1]  # images/ when there
        # a name any row gives, on disk or not (an excluded row's file may have been deleted since)
        named = {os.path.normpath(base / name) for _, name in self._names(document)
                 for base in (self.root, self.root / "images")}
        target = _copy_in(photo, folder, taken=lambda name: os.path.normpath(folder / name) in named)
        key = relative(target, self.root)
        filename, label_column = self._column(document, "filename"), self._column(document, "label")
        row = [""] * (max(filename, label_column) + 1)
        row[filename], row[label_column] = key, label
        document["rows"].append(row)
        return key

    def restore(self, document: dict, key: str, raw: list | None) -> None:
        rows = document["rows"]
        at = next(i for i, row in enumerate(rows) if i and row is self._row(document, key))
        if raw is None:
            self._remove_added(document, key, lambda: rows.pop(at))
            return
        rows[at] = raw
        header = document["header"]
        if len(raw) < len(header) and header[-1] == EXCLUDED_COLUMN and \
                all(len(row) < len(header) or not row[-1].strip() for row in rows[1:]):
            # the column an exclusion added (the row had no such cell before), now empty: gone again, so undoing
            # every decision restores the file; a column the file had before review stays
            header.pop()
            for row in rows:
                del row[len(header):]


class Folders:
    """Class folders (or split folders of class folders): a label is the folder a file is in."""

    backup_suffix = ".csv"  # the labels as a CSV of filename,label

    def __init__(self, root: Path, class_names: list[str], layout: str):
        self.source = self.root = root
        self.class_names, self.layout, self.lock_file = class_names, layout, root / LOCK_NAME

    def load(self) -> None:
        return None  # the file system itself is the document

    def save(self, document) -> None:
        pass  # every change is a rename, done when it is made

    def key(self, path: Path) -> str:
        container = path.parent.parent
        if container.name == EXCLUDED_FOLDER:
            container = container.parent
        return relative(container / path.name, self.root)

    def _places(self, key: str) -> list[tuple[Path, bool]]:
        """(file, excluded) for each class folder holding the key's file."""
        container, name = (self.root / key).parent, Path(key).name
        places = [(folder / name, excluded)
                  for base, excluded in ((container, False), (container / EXCLUDED_FOLDER, True)) if base.is_dir()
                  for folder in sorted(base.iterdir()) if not folder.name.startswith(".") and (folder / name).is_file()]
        if len(places) > 1:
            raise DataError(f"{key}: a file of this name is in several class folders "
                            f"({', '.join(relative(p, self.root) for p, _ in places)}): rename one to decide on it")
        return places

    def entry(self, document, key: str) -> tuple[str | None, dict | None]:
        if not (places := self._places(key)):
            return None, None
        file, excluded = places[0]
        index = class_index(file.parent.name, self.class_names)
        label = None if excluded or index is None else self.class_names[index]
        return label, {"file": relative(file, self.root), "excluded": excluded}

    def path(self, document, key: str) -> Path | None:
        places = self._places(key)
        return places[0][0] if places else None

    def _class_folder(self, container: Path, label: str) -> Path:
        for folder in sorted(container.iterdir()) if container.is_dir() else []:
            if folder.is_dir() and not folder.name.startswith(".") and \
                    class_index(folder.name, self.class_names) == self.class_names.index(label):
                return folder
        return container / label

    def _move(self, file: Path, folder: Path) -> None:
        if (folder / file.name).exists():
            raise DataError(f"cannot move {relative(file, self.root)} to {relative(folder, self.root)}/: a file of "
                            "that name is already there; rename one of them")
        folder.mkdir(parents=True, exist_ok=True)
        os.rename(file, folder / file.name)  # atomic within the data folder

    def set(self, document, key: str, label: str) -> None:
        self._move(self.path(document, key), self._class_folder((self.root / key).parent, label))

    def exclude(self, document, key: str) -> None:
        file = self.path(document, key)
        self._move(file, (self.root / key).parent / EXCLUDED_FOLDER / file.parent.name)

    def add(self, document, photo: Path, label: str) -> str:
        container = self.root / "train" if self.layout == "splits" else self.root
        target = _copy_in(photo, self._class_folder(container, label),
                          taken=lambda name: bool(self._places(relative(container / name, self.root))))
        return relative(container / target.name, self.root)

    def restore(self, document, key: str, raw: dict | None) -> None:
        file = self.path(document, key)
        if raw is None:
            if file is not None:
                file.unlink()
        elif file is not None and relative(file, self.root) != raw["file"]:
            self._move(file, (self.root / raw["file"]).parent)

    def back_up(self, target: Path) -> Path:
        """The labels before this session's first change, as a CSV of file,label (the images stay where they are)."""
        rows = [{"filename": relative(s.path, self.root), "label": self.class_names[s.label]}
                for s in load_data(self.root).samples]
        return write_csv(target, rows, ["filename", "label"])
