"""Label decisions written back to a data set's own files, the source of truth, for every layout load_data reads
(how each layout's files change is data/label_files.py's).

A decision sets an entry's label, excludes it, keeps it, or adds a new photo, and is applied at once. The first
change of a LabelStore backs the original up (review/backups/), and every decision is appended to
review/decisions.jsonl (when, by, file, action, before, after, and what undo restores). A decision carries the
label it was made against; if the entry has changed meanwhile it is refused as a Conflict. An advisory file lock
(fcntl.flock, so POSIX only) beside the source serialises the read-modify-write of every thread and process, so
two reviewers never lose each other's update.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from ..errors import DataError, StopsignError
from ..files import now
from .datasets import load_data
from .label_files import backend_for

DECISIONS = "decisions.jsonl"
ACTIONS = ("set", "keep", "exclude")


class Conflict(StopsignError):
    """The entry changed since the reviewer saw it; `current` is its label now (None: not in the data set)."""

    def __init__(self, message: str, current: str | None):
        super().__init__(message)
        self.current = current


class LabelStore:
    """The decisions on one data set: applied to its files at once, logged to review_dir/decisions.jsonl.

    Entries are named by a key (`key(path)`): the JSON key, the CSV's file name cell, or for class folders the
    file's path without its class folder (`train/a.jpg`), which stays the same when the file changes class.
    """

    def __init__(self, data: str | os.PathLike, review_dir: str | os.PathLike):
        loaded = load_data(data)
        self.class_names = loaded.class_names
        self.backend = backend_for(Path(os.path.abspath(data)), loaded)
        self.review_dir = Path(review_dir)
        self.log = self.review_dir / DECISIONS
        self.backup: Path | None = None  # written before the first change this store makes

    # --- reading ---------------------------------------------------------------------------------------

    def key(self, path: str | os.PathLike) -> str:
        return self.backend.key(Path(path))

    def label(self, key: str) -> str | None:
        """The entry's label now; None when it is excluded or not in the data set."""
        return self.backend.entry(self.backend.load(), key)[0]

    def path(self, key: str) -> Path | None:
        """Where the entry's image file is now."""
        return self.backend.path(self.backend.load(), key)

    def decisions(self) -> list[dict]:
        """Every decision logged for this data set, oldest first (a torn last line of a killed writer is skipped)."""
        records = []
        for line in self.log.read_text(encoding="utf-8").splitlines() if self.log.is_file() else []:
            with contextlib.suppress(ValueError):
                if (record := json.loads(line)).get("data") == str(self.backend.source):
                    records.append(record)
        return records

    def _open(self, action: str | None = None, by: str | None = None) -> list[dict]:
        """The decisions not undone (and not undos), of `action` and of `by` when given, oldest first."""
        records = self.decisions()
        undone = {record["undoes"] for record in records if record["action"] == "undo"}
        return [r for r in records if r["action"] != "undo" and r["n"] not in undone
                and action in (None, r["action"]) and by in (None, r.get("by"))]

    # --- deciding --------------------------------------------------------------------------------------

    def decide(self, key: str, action: str, *, label: str | None = None, against: str | None, by: str | None = None
               ) -> dict:
        """Apply one decision to the entry `key`, made by someone who saw it labelled `against` (None: excluded).

        action: "set" (to `label`), "keep" (logged only) or "exclude". Returns the logged record.
        """
        if action not in ACTIONS:
            raise DataError(f"unknown action {action!r}: choose one of {', '.join(ACTIONS)}")
        if action == "set":
            self._check_class(label)
        with self._locked():
            document = self.backend.load()
            current, raw = self.backend.entry(document, key)
            if current != against:
                raise Conflict(f"{key}: changed meanwhile: it was {_shown(against)} when you saw it and is "
                               f"{_shown(current)} now; decide again", current)
            if raw is None:
                raise DataError(f"{key}: no such entry in {self.backend.source}")
            after = label if action == "set" else None if action == "exclude" else current
            if after != current:
                self._back_up()
                if action == "set":
                    self.backend.set(document, key, label)
                else:
                    self.backend.exclude(document, key)
                self.backend.save(document)
            return self._append(key, action, current, after, raw, by)

    def add(self, photo: str | os.PathLike, label: str, *, by: str | None = None) -> dict:
        """Copy a new photo into the data set with `label`. A photo someone else added meanwhile is a Conflict."""
        self._check_class(label)
        photo = Path(os.path.abspath(photo))
        with self._locked():
            if added := [r for r in self._open("add") if r.get("photo") == str(photo)]:
                current = self.label(added[-1]["file"])
                raise Conflict(f"{photo.name}: someone added it meanwhile, as {_shown(current)}", current)
            self._back_up()
            document = self.backend.load()
            key = self.backend.add(document, photo, label)
            self.backend.save(document)
            return self._append(key, "add", None, label, None, by, photo=str(photo))

    def note(self, photo: str | os.PathLike, action: str, *, by: str | None = None) -> dict:
        """Log a decision that changes nothing (a new photo left out), so that it counts and undo finds it."""
        with self._locked():
            return self._append(str(Path(os.path.abspath(photo))), action, None, None, None, by, photo=None)

    def undo(self, *, by: str | None = None) -> dict:
        """Undo the last decision not yet undone (of `by`, when given); returns that decision's record.

        An entry that changed after that decision is a Conflict: undoing it would overwrite the later change."""
        with self._locked():
            if not (candidates := self._open(by=by)):
                raise DataError("nothing to undo")
            record = candidates[-1]
            if record["before"] == record["after"]:  # a keep, a skipped new photo, a label set to itself
                self._append(record["file"], "undo", None, None, None, by, undoes=record["n"])
                return record
            document = self.backend.load()
            current, raw = self.backend.entry(document, record["file"])
            if raw is None and record["restore"] is not None:  # an excluded entry (None) removed meanwhile
                raise Conflict(f"{record['file']}: no longer in the data set {self.backend.source}; not undone", None)
            if current != record["after"]:
                raise Conflict(f"{record['file']}: changed after that decision (it is {_shown(current)} now, not "
                               f"{_shown(record['after'])}); not undone", current)
            self._back_up()
            self.backend.restore(document, record["file"], record["restore"])
            self.backend.save(document)
            self._append(record["file"], "undo", record["after"], record["before"], None, by, undoes=record["n"])
            return record

    # --- helpers -----------------------------------------------------------------------------------------

    def _check_class(self, label: str | None) -> None:
        if label not in self.class_names:
            raise DataError(f"unknown class {label!r}: the classes are {', '.join(self.class_names)}")

    @contextlib.contextmanager
    def _locked(self):
        # One open file description per call: flock then also excludes other threads of this process, and closing
        # it releases the lock.
        lock = self.backend.lock_file
        try:
            handle = open(lock, "a+b")
        except OSError as error:
            raise StopsignError(f"cannot create the lock file {lock} ({error.strerror}): the data folder must be "
                                "writable to change its labels") from None
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield

    def _back_up(self) -> None:
        if self.backup is None:
            stamp, folder = time.strftime("%Y%m%d-%H%M%S"), self.review_dir / "backups"
            # class folders are backed up as a CSV of their labels
            original = self.backend.source.name + self.backend.backup_suffix
            names = (f"{stamp}-{original}", *(f"{stamp}-{n}-{original}" for n in range(1, 1000)))
            self.backup = self.backend.back_up(folder / next(name for name in names if not (folder / name).exists()))

    def _append(self, key, action, before, after, restore, by, **extra) -> dict:
        records = self.decisions()
        record = {"n": (records[-1]["n"] + 1) if records else 1, "when": now(), "by": by,
                  "data": str(self.backend.source), "file": key, "action": action, "before": before,
                  "after": after, "restore": restore, **extra}
        self.review_dir.mkdir(parents=True, exist_ok=True)
        # A log is appended, not rewritten: one short write with O_APPEND, then fsync; a torn line is skipped.
        # After a torn line this record starts a line of its own, or it would be glued to it and skipped too.
        torn = self.log.is_file() and self.log.stat().st_size > 0 and not self.log.read_bytes().endswith(b"\n")
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(("\n" if torn else "") + json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
        return record


def _shown(label: str | None) -> str:
    return "excluded or not in the data set" if label is None else repr(label)
