"""The run folder, not what is in it: a new one under --out (local, or the local copy of a URL's), what a killed
run left half-done in it, its upload to a URL as it grows (storage.RunUpload) and, for --resume, its local copy.
Training and evaluation both make one here; what a training run records in it is training/records.py's.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from pathlib import Path

from .cache import UPLOADS
from .errors import StopsignError
from .files import TEMPORARY_SUFFIX
from .storage import WRITE_PROBE, RunUpload, check_writable, download_folder, exists, is_url, join, mirror_dir

log = logging.getLogger(__name__)


def remove_partial_files(run_dir: Path) -> None:
    """Delete what a killed run left half-done, never a finished file: the write probe, and the temporary files
    of atomic writes in the run folder and the folders directly in it."""
    run_dir = Path(run_dir)
    for path in [run_dir / WRITE_PROBE, *run_dir.glob(f".*{TEMPORARY_SUFFIX}"),
                 *run_dir.glob(f"*/.*{TEMPORARY_SUFFIX}")]:
        path.unlink(missing_ok=True)


def create_run_dir(out: str | Path, name: str | None, prefix: str) -> Path:
    """A new folder under `out`; never reuses one. Fails early, naming the path, when `out` is unwritable.

    `out` may be a URL (s3://bucket/runs): the folder is then made in the local copy of it (cache.UPLOADS),
    under a name free both there and in the bucket, once a probe object proved the bucket writable.
    """
    remote = is_url(str(out))
    if remote:
        check_writable(str(out))
    local_out = mirror_dir(str(out), UPLOADS) if remote else Path(out)
    shown = (lambda folder: join(str(out), folder)) if remote else (lambda folder: local_out / folder)
    base = name or f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        local_out.mkdir(parents=True, exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
            path = local_out / f"{base}{suffix}"
            if remote and exists(join(str(out), path.name)):
                continue
            try:
                path.mkdir()
            except FileExistsError:
                continue
            try:
                (path / WRITE_PROBE).write_bytes(b"ok")
                (path / WRITE_PROBE).unlink()
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)  # a folder we could not write is no run: leave none
                raise
            if suffix and name:
                log.warning("%s already exists; this run goes to %s", shown(base), shown(path.name))
            return path
    except OSError as error:
        raise StopsignError(f"cannot write the run folder under {local_out}: {error.strerror or error}. "
                            "Fix: choose another folder with --out, or free disk space.") from error
    raise StopsignError(f"no free run name {base}-N under {out}; pass another --name")


def run_upload(out: str | Path, run_dir: Path, url: str | None = None) -> RunUpload | None:
    """For a run whose --out is a URL (or a resumed one at `url`): what uploads its folder as it grows."""
    if url or is_url(str(out)):
        return RunUpload(run_dir, url or join(str(out), run_dir.name))
    return None


def local_run(url: str) -> Path:
    """The local folder of a run at a URL, for --resume: the local copy when this machine wrote it (it may hold
    files the upload did not finish), else the bucket's files, downloaded."""
    parent, _, name = url.rstrip("/").rpartition("/")
    local = mirror_dir(parent, UPLOADS) / name
    if not (local / "config.json").is_file():
        download_folder(url, local)
    return local
