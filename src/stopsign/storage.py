"""Object storage: data, runs and models at a URL (s3://, gs://, az://, https://, zip::...) through fsspec.

A URL never reaches the code that decodes photos or writes run files. Data and models are fetched into a local
mirror, each file checked by its ETag from one paginated listing, so a second run downloads nothing and the feature
cache, keyed by content, still hits. A run is written locally and uploaded as it grows (RunUpload). Credentials
come each backend's usual way (for S3: the AWS variables, ~/.aws/credentials, AWS_PROFILE, AWS_ENDPOINT_URL), plus
fsspec options from $STOPSIGN_STORAGE_OPTIONS (a JSON object) and `--storage-option key=value`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from tqdm.auto import tqdm

from .cache import REMOTE, UPLOADED, UPLOADS, store_dir
from .errors import StorageError
from .files import TEMPORARY_SUFFIX, atomic_write_text, read_json

log = logging.getLogger(__name__)

OPTIONS_ENV = "STOPSIGN_STORAGE_OPTIONS"
FETCH_WORKERS = 16  # objects fetched at once: enough to hide a request's latency, few enough for any endpoint
RETRIES = 4  # attempts of an upload after the first, each after BACKOFF × 2^k seconds
BACKOFF = 0.5
MODEL_SUFFIXES = (".pt", ".onnx", ".torchscript")  # a URL ending so names a model, not a run folder
INDEX = "index.json"  # a mirror's {relative path: ETag}, beside its files/
WRITE_PROBE = ".write-test"  # what proves a run folder writable; never uploaded
# An S3 endpoint that does not answer fails in seconds, not botocore's minutes (the user's options win).
S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}}
# The package each protocol's fsspec backend imports: without it, a URL is one line naming the install.
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "http": "aiohttp", "https": "aiohttp"}
CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (for IBM Cloud Object Storage: the HMAC keys), "
                   "or a profile in ~/.aws/credentials with AWS_PROFILE, or --storage-option key=... "
                   "--storage-option secret=...")
CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                     "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ConnectionError",
                     "ConnectionRefusedError", "ConnectionResetError", "TimeoutError", "IncompleteRead"}

_given_options: dict = {}
_filesystems: dict = {}


def is_url(path) -> bool:
    """True for "scheme://..." (fsspec's chained "zip::https://..." too), False for local paths and file://."""
    return isinstance(path, str) and bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*(::|://)", path)) \
        and not path.startswith("file://")


def set_storage_options(pairs: list[str]) -> None:
    """--storage-option key=value (repeatable): a value is read as JSON where it is JSON (true, 3, {...}), else as
    text; a dotted key sets a nested option (client_kwargs.region_name=us-south)."""
    options: dict = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise StorageError(f"--storage-option {pair!r}: expected key=value, e.g. endpoint_url=https://...")
        with suppress(ValueError):  # else text, as given
            value = json.loads(value)
        *parents, last = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    _given_options.clear()
    _given_options.update(options)


def storage_options(protocol: str) -> dict:
    """The keyword options for the filesystem: backend defaults, then $STOPSIGN_STORAGE_OPTIONS, then the flags."""
    try:
        from_env = json.loads(os.environ.get(OPTIONS_ENV) or "{}")
    except ValueError as error:
        raise StorageError(f"${OPTIONS_ENV} is not a JSON object ({error}); e.g. "
                           '{"endpoint_url": "https://s3.us-south.cloud-object-storage.appdomain.cloud"}') from error
    options = copy.deepcopy(S3_DEFAULTS) if protocol in ("s3", "s3a") else {}
    for layer in (from_env, _given_options):
        for key, value in layer.items():
            merge = isinstance(value, dict) and isinstance(options.get(key), dict)
            options[key] = options[key] | value if merge else value
    return options


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; a backend that is not installed says which package to add."""
    import fsspec.core

    protocol = url.split("::")[-1].split("://")[0]
    options = storage_options(protocol)
    # One filesystem per protocol, options and credentials in the environment (fsspec's own instance cache would
    # keep the credentials it first resolved); a chained URL (zip::...) gets its own each time.
    key = (protocol, json.dumps(options, sort_keys=True, default=str),
           tuple((k, v) for k, v in sorted(os.environ.items()) if k.startswith(("AWS_", "GOOGLE_", "AZURE_"))))
    chained = "::" in url
    if not chained and key in _filesystems:
        return _filesystems[key], _filesystems[key]._strip_protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except (ImportError, ValueError) as error:  # the backend is not installed; fsspec knows no such protocol
        package = BACKENDS.get(protocol.lower())
        if isinstance(error, ImportError) and package:
            command = "pip install 'stopsign[cloud]'" if package == "s3fs" else f"pip install {package}"
            raise StorageError(f"{url}: {protocol}:// URLs need {package}: {command}") from error
        raise StorageError(f"{url}: cannot open {protocol}:// ({error}). Fix: install the fsspec backend for "
                           f"{protocol}://") from error
    if not chained:
        _filesystems[key] = fs
    return fs, path


@contextmanager
def storage_errors(url: str):
    """Any failure of the storage backend as one StorageError naming the URL and the fix."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        raise StorageError(explain(url, error)) from error


def explain(url: str, error: BaseException) -> str:
    name, first = type(error).__name__, _first_line(str(error))
    codes = [str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")) for e in _chain(error)]
    text = " ".join([str(error), *codes])  # s3fs turns botocore's error codes into OSErrors with their messages
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return f"{url}: no credentials. Fix: {CREDENTIALS_FIX}"
    if name == "PartialCredentialsError":
        return f"{url}: incomplete credentials ({first}). Fix: {CREDENTIALS_FIX}"
    if any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                                     "signature we calculated", "Access Key Id you provided does not exist")):
        return f"{url}: the credentials were refused ({first}). Fix: check the key and secret ({CREDENTIALS_FIX})"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return (f"{url}: access denied ({first}). Fix: grant these credentials read (data, models) or "
                "write (--out) access to the bucket, or use other credentials")
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        return f"{url}: no such bucket or object ({first}). Fix: check the URL (bucket name, prefix, key)"
    if _is_connection_error(error):
        endpoint = storage_options("s3").get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "the default"
        return (f"{url}: cannot reach the storage endpoint {endpoint} ({first}). Fix: check the network "
                "and the endpoint (AWS_ENDPOINT_URL, or --storage-option endpoint_url=https://...)")
    return f"{url}: {name}: {first}"


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _is_connection_error(error: BaseException) -> bool:
    return isinstance(error, (ConnectionError, TimeoutError)) or \
        any(type(e).__name__ in CONNECTION_ERRORS for e in _chain(error))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


# --- fetching: a URL's files into a local mirror ---------------------------------------------------------

def mirror_dir(url: str, store: str = REMOTE) -> Path:
    """The local folder that stands for a URL: readable, and unique to the URL."""
    url = url.rstrip("/")
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rsplit("/", 1)[-1])[:60] or "root"
    return store_dir(store) / f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def fetch(url: str, *, progress: bool = False) -> Path:
    """The local copy of a URL: its folder of files (a prefix) or the file. A .zip archive is unpacked and its
    folder returned. Files whose ETag the mirror already holds are not downloaded again."""
    fs, path = filesystem(url)
    listing = _list(fs, url, path)
    if not listing:
        raise StorageError(f"{url}: no such bucket, prefix or object (nothing listed there). "
                           "Fix: check the URL (bucket name, prefix, key)")
    root, files = mirror_dir(url), _below(url, path.rstrip("/"), listing)
    single = not files  # the URL names one object (s3fs lists a key as itself)
    if single:
        if len(listing) != 1:
            raise StorageError(f"{url}: names {len(listing)} objects but no folder of them; give the prefix ending in /")
        files = {Path(key).name: (key, info) for key, info in listing.items()}
    _mirror(fs, url, files, root, progress)
    local = root / "files" / (next(iter(files)) if single else "")
    if single and local.suffix.lower() == ".zip":
        return _unpacked(local, root / "unzipped", files[local.name][1])
    return local


def _list(fs, url: str, path: str) -> dict[str, dict]:
    """{key: info} of every object at or below `path`: one listing (s3fs pages through it, 1,000 keys a request)."""
    with storage_errors(url):
        fs.invalidate_cache()  # one process may list a prefix again after writing to it
        return {key: info for key, info in fs.find(path, detail=True).items() if info.get("type") != "directory"}


def _below(url: str, prefix: str, listing: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """{relative path: (key, info)} of the objects below `prefix`, folder markers left out, each path checked."""
    return {inside(url, key[len(prefix) + 1:]): (key, info) for key, info in listing.items()
            if key.startswith(prefix + "/") and len(key) > len(prefix) + 1}


def _download(fs, key: str, target: Path) -> None:
    """One object to one local file, whole or absent (a temporary name of this process's, then a rename). Not
    files.atomic_write: FETCH_WORKERS threads run this, and reading the umask, as atomic_write does, sets it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    with storage_errors(fs.unstrip_protocol(key)):
        fs.get_file(key, str(partial))
    os.replace(partial, target)


def inside(url: str, name: str) -> str:
    """An object's name below a prefix, as a relative path that stays inside the local folder: a key may hold
    "../" or begin with "/" (S3 allows any bytes), which joined to the folder would write anywhere on disk."""
    if name.startswith("/") or ".." in name.split("/"):
        raise StorageError(f"{join(url, name)}: an object whose key below the prefix starts with '/' or holds '..' "
                           "cannot be copied into a local folder (it would land outside it). "
                           "Fix: rename or remove that object")
    return name


def _mirror(fs, url: str, files: dict[str, tuple[str, dict]], root: Path, progress: bool) -> None:
    """Bring root/files/ to `files` ({relative path: (key, info)}): fetch what the index does not hold at its
    version, concurrently; remove what is no longer listed; record each file's version in root/index.json."""
    index_path, local_root = root / INDEX, root / "files"
    known = read_json(index_path) if index_path.is_file() else {}
    index = {rel: tag for rel, tag in known.items() if rel in files}
    wanted = {rel: info for rel, (_, info) in files.items() if index.get(rel) != version_tag(info)
              or not (local_root / rel).is_file() or (local_root / rel).stat().st_size != info.get("size", -1)}
    _prune(local_root, files)
    bar = tqdm(total=sum(int(info.get("size") or 0) for info in wanted.values()), unit="B", unit_scale=True,
               desc=f"download {len(wanted)} files", disable=not (progress and wanted), leave=False)

    def get(rel: str) -> str:
        _download(fs, files[rel][0], local_root / rel)
        bar.update(int(wanted[rel].get("size") or 0))
        return rel

    try:
        with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
            for done, rel in enumerate(pool.map(get, sorted(wanted)), start=1):
                index[rel] = version_tag(wanted[rel])
                bar.set_postfix_str(f"{done}/{len(wanted)} files", refresh=False)
    finally:
        bar.close()
        if index != known or not index_path.is_file():  # what arrived stays known, even when a fetch failed
            atomic_write_text(index_path, json.dumps(index, indent=0, sort_keys=True))
    log.debug("fetched %d of %d files of %s", len(wanted), len(files), url)


def _prune(local_root: Path, files: dict) -> None:
    """Gone from the bucket: gone from the mirror, so the data is the same. The folder is walked, not the index:
    a fetch that failed part way leaves files it renamed into place but never indexed."""
    for path in [p for p in local_root.rglob("*") if p.is_file()]:
        if path.relative_to(local_root).as_posix() not in files and not path.name.endswith(TEMPORARY_SUFFIX):
            path.unlink(missing_ok=True)  # (a temporary file is another fetch's, in progress)
    for folder in sorted((p for p in local_root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with suppress(OSError):  # not empty, or another fetch just put a file there
            folder.rmdir()  # an emptied class folder would be read as a class with no images


def version_tag(info: dict) -> str:
    """What identifies an object's content without reading it: ETag or version where the backend gives one."""
    for key in ("ETag", "etag", "VersionId", "version_id", "md5Hash", "content_md5", "Content-MD5", "Digest"):
        if info.get(key):
            return str(info[key]).strip('"')
    modified = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("updated")
    return f"size {info.get('size')} modified {modified}"


def _unpacked(archive: Path, folder: Path, info: dict) -> Path:
    """A downloaded .zip's contents, unpacked again only when the archive changed (zipfile keeps names inside)."""
    marker, tag = folder / ".archive", version_tag(info)
    if not (marker.is_file() and marker.read_text() == tag):
        shutil.rmtree(folder, ignore_errors=True)
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(folder)
        marker.write_text(tag)
    entries = [p for p in folder.iterdir() if p.name != ".archive" and not p.name.startswith("__MACOSX")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder  # export.zip holding one folder


def fetch_model(url: str) -> Path:
    """A model file at a URL, or a run folder's best.pt, from the mirror when its ETag is unchanged."""
    fs, path = filesystem(url)
    with storage_errors(url):
        is_file = fs.isfile(path)
    if not is_file and Path(path).suffix.lower() in MODEL_SUFFIXES:  # a model file that is not there: say so
        raise StorageError(f"{url}: no such bucket or object. Fix: check the URL (bucket name, prefix, key)")
    return fetch(url if is_file else url.rstrip("/") + "/best.pt")


# --- uploading: a local folder that grows, mirrored to a URL -------------------------------------------------

def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def check_writable(url: str) -> None:
    """Write and delete a small object under `url`: credentials, bucket and write access, checked up front."""
    fs, path = filesystem(url)
    probe = join(path, f".stopsign-write-test-{os.getpid()}")
    with storage_errors(url):
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with storage_errors(url):
        fs.invalidate_cache()
        return bool(fs.exists(path))


def download_folder(url: str, local: Path) -> None:
    """Every object under a prefix into a local folder (a run to resume): each file whole or absent."""
    fs, path = filesystem(url)
    files = _below(url, path.rstrip("/"), _list(fs, url, path.rstrip("/")))
    if not files:
        raise StorageError(f"{url}: nothing there to resume. Fix: check the URL (the run folder's, ending in its name)")
    for rel, (key, _) in files.items():
        _download(fs, key, Path(local) / rel)


def upload_file(local: Path, url: str) -> None:
    """One file to one key, with retries. An S3 PUT is atomic and a multipart upload becomes visible only when
    completed (s3fs aborts it on error), so a reader never sees a half-written object under the final key."""
    fs, path = filesystem(url)
    for attempt in range(RETRIES + 1):
        try:
            fs.put_file(str(local), path)
            return
        except Exception as error:
            if attempt == RETRIES or not _is_connection_error(error):
                raise StorageError(explain(url, error) + (f" (after {RETRIES + 1} attempts)" if attempt else "")) \
                    from error
            delay = BACKOFF * 2 ** attempt
            log.warning("upload of %s failed (%s); retrying in %.1f s", url, _first_line(str(error)), delay)
            time.sleep(delay)
            fs.invalidate_cache()


class RunUpload:
    """A run folder written locally (atomically, as every run) and uploaded to `url` as it grows.

    sync() sends each file that changed since it was last sent; `last` (summary.json) waits for finish(), so a
    reader who finds it knows the run is whole. The local folder stays: it is what `--resume URL` continues from
    when it is there, and what the caller reads the run's files from; `stopsign cache clear` deletes it only once
    finish() has marked it uploaded (cache.UPLOADED).
    """

    def __init__(self, local: Path, url: str, last: tuple[str, ...] = ("summary.json",)):
        self.local, self.url, self.last = Path(local), url.rstrip("/"), last
        self.sent: dict[str, tuple[int, int]] = {}

    def sync(self, *, finish: bool = False) -> None:
        (self.local / UPLOADED).unlink(missing_ok=True)  # a resumed run grows again: not whole in the bucket now
        files = sorted(p for p in self.local.rglob("*") if p.is_file() and not p.name.endswith(TEMPORARY_SUFFIX)
                       and p.name not in (WRITE_PROBE, UPLOADED))
        held = [p for p in files if p.parent == self.local and p.name in self.last]
        for path in [p for p in files if p not in held] + (held if finish else []):
            rel, stat = path.relative_to(self.local).as_posix(), path.stat()
            if self.sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                try:
                    upload_file(path, join(self.url, rel))
                except StorageError as error:
                    raise StorageError(f"{error}. Nothing is lost: the run's files are in {self.local}, and "
                                       f"`stopsign train --resume {self.url}` continues it and its upload") from error
                self.sent[rel] = (stat.st_size, stat.st_mtime_ns)

    def finish(self) -> None:
        self.sync(finish=True)
        atomic_write_text(self.local / UPLOADED, self.url + "\n")  # `cache clear` may delete this copy now
