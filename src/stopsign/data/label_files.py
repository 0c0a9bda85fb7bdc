"""How each layout load_data reads stores a label, and how to change it in place: the editors that
data/labels.py applies decisions with (it owns the locking, the log, conflicts and undo).

Each editor has one interface: load() the document (re-read for every decision: someone else may have changed
it), entry(document, key) -> (label or None, the raw entry undo restores), set / exclude / add / restore on the
document, save(document) atomically, key(path) and path(document, key) between image files and entry keys,
lock_file beside the source, and back_up(target) (written to target, a name that ends in backup_suffix).
Class folders have no document: each change is a rename.
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
from .datasets import (ANNOTATIONS, EXCLUDED_COLUMN, EXCLUDED_KEY, EXCLUDED_VALUES, LabelledData, locate, class_index,
                       is_excluded, load_data)

EXCLUDED_FOLDER = ".excluded"  # class folders: excluded files go to .excluded/<class>/
LOCK_NAME = ".stopsign-review.lock"


def backend_for(path: Path, loaded: LabelledData):
    """The editor of `loaded`'s files; `path` is what was given to load_data (a folder, or its JSON or CSV)."""
    if loaded.layout == "cvstudio":
        return Annotations(path if path.is_file() else path / ANNOTATIONS)
    if loaded.layout == "csv":
        return Table(path if path.is_file() else path / "labels.csv")
    return Folders(loaded.root, loaded.class_names, loaded.layout)


def _new_name(folder: Path, name: str, taken=lambda name: False) -> str:
    """`name`, or name-1, name-2 ... where a file of that name is already in `folder` or `taken(name)`: an entry
    of that name (its file missing, or in another class folder) would otherwise be overwritten or made ambiguous."""
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 0
    while (folder / candidate).exists() or taken(candidate):
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    return candidate


def _copy_in(photo: Path, folder: Path, taken=lambda name: False) -> Path:
    target = folder / _new_name(folder, re.sub(r"[\\/]", "_", photo.name), taken)
    atomic_write_bytes(target, photo.read_bytes())
    return target


class Annotations:
    """A CV Studio `_annotations.json`: parsed with its key order, written back in its own layout."""

    def __init__(self, file: Path):
        self.source, self.root = file, file.parent
        self.lock_file = self.root / LOCK_NAME
        self.backup_suffix = ""  # a copy of the file itself
        self.folder = self.root / "images" if (self.root / "images").is_dir() else self.root

    def load(self) -> dict:
        self.text = self.source.read_text(encoding="utf-8")
        return json.loads(self.text)  # dicts keep their key order

    def save(self, document: dict) -> None:
        # The export's own layout: CV Studio writes one line; an indented file stays indented as it was.
        indent = re.match(r"\{\s*\n([ \t]+)\"", self.text)
        if indent:
            text = json.dumps(document, indent=indent.group(1), ensure_ascii=False)
        else:
            text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        atomic_write_text(self.source, text + ("\n" if self.text.endswith("\n") else ""))

    def key(self, path: Path) -> str:
        return path.name

    def entry(self, document: dict, key: str) -> tuple[str | None, list | None]:
        raw = document.get("annotations", {}).get(key)
        if raw is None:
            return None, None
        label = None if is_excluded(raw) or not raw else raw[0].get("label")
        return label, copy.deepcopy(raw)

    def path(self, document: dict, key: str) -> Path | None:
        return next((folder / key for folder in (self.folder, self.root) if (folder / key).is_file()), None)

    def _annotations(self, document: dict, key: str) -> list:
        raw = document.get("annotations", {}).get(key)
        if not raw:
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
        target = _copy_in(photo, self.folder, taken=lambda name: name in document.get("annotations", {}))
        document.setdefault("annotations", {})[target.name] = [{"label": label, "id": str(uuid.uuid4())}]
        return target.name

    def restore(self, document: dict, key: str, raw: list | None) -> None:
        if raw is None:  # undoing an addition: the entry and the copy it made
            file = self.path(document, key)
            document["annotations"].pop(key, None)
            self.save(document)
            if file is not None:
                file.unlink(missing_ok=True)
        else:
            document["annotations"][key] = raw  # an existing key keeps its place

    def back_up(self, target: Path) -> Path:
        return atomic_write_bytes(target, self.source.read_bytes())


class Table:
    """A CSV of filename,label (and any other columns, kept as they are)."""

    def __init__(self, file: Path):
        self.source, self.root = file, file.parent
        self.lock_file = self.root / LOCK_NAME
        self.backup_suffix = ""  # a copy of the file itself

    def load(self) -> dict:
        text = self.source.read_text(encoding="utf-8-sig")
        self.bom = self.source.read_bytes().startswith(b"\xef\xbb\xbf")
        self.newline = "\r\n" if "\r\n" in text else "\n"
        rows = list(csv.reader(io.StringIO(text, newline="")))
        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        return {"rows": rows, "header": header}

    def save(self, document: dict) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=self.newline).writerows(document["rows"])
        atomic_write_bytes(self.source, (b"\xef\xbb\xbf" if self.bom else b"") + buffer.getvalue().encode("utf-8"))

    def _column(self, document: dict, name: str, create: bool = False) -> int | None:
        header = document["header"]
        if name not in header and create:
            document["rows"][0].append(name)
            header.append(name)
        return header.index(name) if name in header else None

    def _row(self, document: dict, key: str) -> list | None:
        column = self._column(document, "filename")
        return next((row for row in document["rows"][1:] if len(row) > column and row[column].strip() == key), None)

    def key(self, path: Path) -> str:
        document = self.load()
        column = self._column(document, "filename")
        folders = [folder for folder in (self.root, self.root / "images") if folder.is_dir()]
        for row in document["rows"][1:]:
            if len(row) > column and row[column].strip():
                name = row[column].strip()
                if locate(name, folders, self.root, [], confined=False) == path:
                    return name
        raise DataError(f"{self.source}: no row names {path}")

    def _named(self, document: dict, file: Path) -> bool:
        """Whether a row names `file`, on disk or not (an excluded row's file may have been deleted since)."""
        column = self._column(document, "filename")
        named = {os.path.normpath(folder / row[column].strip()) for row in document["rows"][1:]
                 if len(row) > column and row[column].strip() for folder in (self.root, self.root / "images")}
        return os.path.normpath(file) in named

    def entry(self, document: dict, key: str) -> tuple[str | None, list | None]:
        row = self._row(document, key)
        if row is None:
            return None, None
        excluded = self._column(document, EXCLUDED_COLUMN)
        if excluded is not None and len(row) > excluded and is_excluded(row[excluded]):
            return None, list(row)
        label = self._column(document, "label")
        return (row[label].strip() if len(row) > label else None), list(row)

    def path(self, document: dict, key: str) -> Path | None:
        folders = [folder for folder in (self.root, self.root / "images") if folder.is_dir()]
        return locate(key, folders, self.root, [], confined=False)

    def _cell(self, document: dict, key: str, column: int, value: str) -> None:
        row = self._row(document, key)
        if row is None:
            raise DataError(f"{self.source}: has no row for {key!r}")
        row.extend([""] * (column + 1 - len(row)))
        row[column] = value

    def set(self, document: dict, key: str, label: str) -> None:
        self._cell(document, key, self._column(document, "label"), label)
        excluded = self._column(document, EXCLUDED_COLUMN)
        row = self._row(document, key)
        if excluded is not None and len(row) > excluded:
            row[excluded] = ""

    def exclude(self, document: dict, key: str) -> None:
        self._cell(document, key, self._column(document, EXCLUDED_COLUMN, create=True), EXCLUDED_VALUES[0])

    def add(self, document: dict, photo: Path, label: str) -> str:
        folder = self.root / "images" if (self.root / "images").is_dir() else self.root

        target = _copy_in(photo, folder, taken=lambda name: self._named(document, folder / name))
        key = relative(target, self.root) if folder != self.root else target.name
        row = [""] * (max(self._column(document, "filename"), self._column(document, "label")) + 1)
        row[self._column(document, "filename")], row[self._column(document, "label")] = key, label
        document["rows"].append(row)
        return key

    def restore(self, document: dict, key: str, raw: list | None) -> None:
        rows = document["rows"]
        at = next(i for i, row in enumerate(rows) if i and row is self._row(document, key))
        if raw is None:
            file = self.path(document, key)
            del rows[at]
            self.save(document)
            if file is not None:
                file.unlink(missing_ok=True)
        else:
            rows[at] = raw
        header = document["header"]
        if raw is not None and len(raw) < len(header) and header[-1] == EXCLUDED_COLUMN and \
                all(len(row) < len(header) or not row[-1].strip() for row in rows[1:]):
            # the column an exclusion added (the row had no such cell before), now empty: gone again, so undoing
            # every decision restores the file; a column the file had before review stays
            header.pop()
            for row in rows:
                del row[len(header):]

    def back_up(self, target: Path) -> Path:
        return atomic_write_bytes(target, self.source.read_bytes())


class Folders:
    """Class folders (or split folders of class folders): a label is the folder a file is in."""

    def __init__(self, root: Path, class_names: list[str], layout: str):
        self.source = self.root = root
        self.class_names, self.layout = class_names, layout
        self.lock_file = root / LOCK_NAME
        self.backup_suffix = ".csv"  # the labels as a CSV of filename,label

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
        places = []
        for base, excluded in ((container, False), (container / EXCLUDED_FOLDER, True)):
            if base.is_dir():
                for folder in sorted(base.iterdir()):
                    if not folder.name.startswith(".") and (folder / name).is_file():
                        places.append((folder / name, excluded))
        if len(places) > 1:
            raise DataError(f"{key}: a file of this name is in several class folders "
                            f"({', '.join(relative(p, self.root) for p, _ in places)}): rename one to decide on it")
        return places

    def entry(self, document, key: str) -> tuple[str | None, dict | None]:
        places = self._places(key)
        if not places:
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
        target = folder / file.name
        if target.exists():
            raise DataError(f"cannot move {relative(file, self.root)} to {relative(folder, self.root)}/: a file of "
                            "that name is already there; rename one of them")
        folder.mkdir(parents=True, exist_ok=True)
        os.rename(file, target)  # atomic within the data folder

    def set(self, document, key: str, label: str) -> None:
        file = self.path(document, key)
        self._move(file, self._class_folder((self.root / key).parent, label))

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
        data = load_data(self.root)
        rows = [{"filename": relative(s.path, self.root), "label": self.class_names[s.label]} for s in data.samples]
        return write_csv(target, rows, ["filename", "label"])
