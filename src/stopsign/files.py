"""Writing and naming files: atomic writes (bytes, text, JSON, CSV, .npy), staging folders, sha256, relative paths.

Every write goes to a temporary name in the destination folder, is flushed (and fsynced, unless the caller is a
cache that checks what it reads) and renamed, so a process killed at any instant leaves each file whole or absent.
Files and folders take the umask's permissions, like any the user creates.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import StopsignError

TEMPORARY_SUFFIX = ".tmp"  # an atomic write's file until it is renamed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, *, durable: bool = True) -> Path:
    """Call `write(binary file)` on a temporary file beside `path`, then rename it to `path`. A full disk or an
    unwritable folder is a StopsignError naming the path. durable=False skips the fsync, for caches that check
    what they read: after a power cut such a file may be empty or end in zeros."""
    path = Path(path)
    handle = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX,
                                         delete=False) as handle:
            write(handle)
            handle.flush()
            os.chmod(handle.name, 0o666 & ~_umask())  # not NamedTemporaryFile's 0600
            if durable:
                os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException as error:
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(handle.name)
        if not isinstance(error, OSError):
            raise
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        raise StopsignError(
            f"cannot write {path}: {'the disk is full' if full else error.strerror or error}. "
            f"Fix: {'free disk space' if full else 'make the folder writable'} or choose another --out; "
            "an interrupted `stopsign train` continues from its last epoch with --resume RUN_DIR."
        ) from error
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda handle: handle.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(array)), durable=durable)


def write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def staging_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder in `parent`, named `prefix` and a unique tail, to fill and then rename into place, so
    the folder it becomes is whole or absent. It takes the umask's permissions, not mkdtemp's 0700."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (equal for equal content, whatever the name); OSError propagates."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """How records name a file: relative to `root` when inside it, else as given."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def now() -> str:
    """ISO 8601 with the true UTC offset of this machine's local time."""
    return datetime.now().astimezone().isoformat(timespec="seconds")
