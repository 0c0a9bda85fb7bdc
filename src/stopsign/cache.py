"""Where stopsign keeps what it can recompute, and `stopsign cache info|clear` over all of it.

The stores live under one root: the backbone features, the duplicate checks' file hashes, the reports' thumbnails,
rendered negatives, and the local copies of files at URLs. Deleting one costs time, never results (so `clear`
keeps a run whose upload to a URL has not finished: that copy is the only whole one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from .files import TEMPORARY_SUFFIX
from .store import count_entries

FEATURES = "features"  # model/features.py: one folder per backbone key, each a store.ShardStore
HASH_CACHE = "hash-cache"  # data/checks.py: (sha256, pHash) per file, keyed by name, size and mtime
THUMBNAILS = "thumbnails"  # reporting/photos.py: JPEG thumbnails keyed by the photo's content
SYNTHETIC = "synthetic"  # data/demo.py: rendered negatives for --synthetic-negatives, by count, seed and size
REMOTE = "remote"  # storage.py: local mirrors of data and models at URLs, checked by ETag
UPLOADS = "uploads"  # storage.py: the local copies of runs written to a URL (what --resume URL continues)
UPLOADED = ".uploaded"  # in such a run folder once all of it is in the bucket: until then, its only whole copy
OTHER_STORES = {"file hashes": HASH_CACHE, "thumbnails": THUMBNAILS, "synthetic negatives": SYNTHETIC,
                "downloads": REMOTE, "uploaded runs": UPLOADS}  # small, each recomputed when missing


def cache_root() -> Path:
    """$STOPSIGN_CACHE, else $XDG_CACHE_HOME/stopsign, else ~/.cache/stopsign."""
    if os.environ.get("STOPSIGN_CACHE"):
        return Path(os.environ["STOPSIGN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stopsign"


def store_dir(name: str) -> Path:
    """The folder of one store (FEATURES, HASH_CACHE, ...) under cache_root()."""
    return cache_root() / name


def _usage(folder: Path) -> dict:
    """The files under folder (not a write's temporary ones) and their bytes. A file or folder that goes while
    it is walked (another process writing or clearing) or cannot be read is left out: `clear` must never fail."""
    files = size = 0
    for parent, _, names in os.walk(folder):  # skips a folder it cannot list, or that went meanwhile
        for name in names:
            with contextlib.suppress(OSError):
                found = os.stat(os.path.join(parent, name))
                if stat.S_ISREG(found.st_mode) and not name.endswith(TEMPORARY_SUFFIX):
                    files, size = files + 1, size + found.st_size
    return {"files": files, "bytes": size}


def cache_info(features_dir: str | os.PathLike | None = None) -> dict:
    """The feature cache's size per backbone folder; without a folder of its own, also the other stores'."""
    root = Path(features_dir or store_dir(FEATURES))
    folders = {folder.name: {"entries": count_entries(folder)} | _usage(folder)
               for folder in sorted(p for p in root.glob("*") if p.is_dir())}
    stores = {} if features_dir else {name: {"path": str(store_dir(folder))} | _usage(store_dir(folder))
                                      for name, folder in OTHER_STORES.items()}
    return {"root": str(root), "folders": folders, "stores": stores,
            "entries": sum(f["entries"] for f in folders.values()),
            "bytes": sum(f["bytes"] for f in folders.values())}


def clear_cache(features_dir: str | os.PathLike | None = None) -> dict:
    """Empty the feature cache (and, without a folder of its own, the other stores); return what they held."""
    info = cache_info(features_dir)
    for name in info["folders"]:
        shutil.rmtree(Path(info["root"]) / name, ignore_errors=True)
    for name, store in info["stores"].items():
        if OTHER_STORES[name] == UPLOADS:
            _clear_uploads(Path(store["path"]))
        else:
            shutil.rmtree(store["path"], ignore_errors=True)
    return info


def describe_cache(info: dict, cleared: bool = False) -> list[str]:
    """What `stopsign cache info` (or `clear`, which says what it removed) shows of cache_info()'s dict."""
    verb = "removed" if cleared else "holds"
    return [f"feature cache {info['root']} {verb} {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB",
            *(f"  {name:<32} {folder['entries']:>8} entries {folder['bytes'] / 1e6:>9.1f} MB"
              for name, folder in info["folders"].items()),
            *(f"{name} {store['path']} {verb} {store['files']} files, {store['bytes'] / 1e6:.1f} MB"
              for name, store in info["stores"].items())]


def _clear_uploads(folder: Path) -> None:
    """The local copies of runs at URLs, except those whose upload has not finished: the error that stopped it
    promised that `--resume URL` continues from them, so they are results, not cache."""
    for run in sorted(folder.glob("*/*")):
        if not run.is_dir():
            with contextlib.suppress(OSError):
                run.unlink()  # an exported model: made again from its checkpoint
        elif (run / UPLOADED).is_file():
            shutil.rmtree(run, ignore_errors=True)
    for mirror in folder.glob("*"):
        with contextlib.suppress(OSError):
            mirror.rmdir()  # when nothing is kept in it
