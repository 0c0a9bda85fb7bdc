"""The feature store: arrays keyed by (image digest, view tag), in append-only shard files, one folder per backbone key.

A shard is a pair of files in `folder/shards/`: `NAME.f32`, rows of one shape (e.g. 7 pooled rows × 512 features)
of float32 appended one after another, and `NAME.idx`, the 128-bit keys of its first n rows (an .npy of n × 2
uint64, then the CRC-32 of those bytes, which np.load ignores). Each writing process owns the shards it creates
(NAME holds its host, pid and a random part), so processes and torchrun ranks on one machine or many never write
to one file. A commit fsyncs the rows written since the last one, then replaces the index atomically (temporary
file, fsync, rename): a reader sees exactly the committed rows, and a process killed at any instant leaves at most
bytes past them, which no index names. A shard whose data file is shorter than its index says (truncated or
deleted by something else) or whose index is damaged (any byte: the CRC covers them; an index written before
the CRC is checked for its header and length only) is skipped with a warning and its entries recomputed. Bytes of
a data file overwritten in place are not detected (no checksum: checking one would cost more than the warm read
it protects; an index is read whole anyway, and is small beside its rows).

Reads map the shard files (np.memmap) and look keys up in one sorted array built from every index, so a warm
load is a few numpy calls, not one file per entry. Caches of stopsign <= 0.2 (one .npy per entry under
`folder/xx/`) are moved into shards the first time a folder is read, then removed.

The format is written by hand: no library keeps appendable, memory-mappable arrays that many processes on
many machines write at once without a server or a lock (SQLite's WAL mode needs shared memory, so not over NFS).
An index is parsed by hand too: np.load parses a header with the tokenizer, and damaged bytes raise whatever it
raises (tokenize.TokenError, ...), where a reader must only ever skip the shard. JSON lines would be as safe and
parse 65,536 keys one line at a time, where .npy bytes are one np.frombuffer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import socket
import time
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import StopsignError
from .files import atomic_write

log = logging.getLogger(__name__)

SHARD_BYTES = 256 << 20  # a shard is closed at this size (or SHARD_ROWS rows): few files, each mapped whole
SHARD_ROWS = 1 << 16
COMMIT_ROWS = 2048  # rows between commits; a kill loses at most these (and what COMMIT_SECONDS allows)
COMMIT_SECONDS = 5.0
ORPHAN_SECONDS = 24 * 3600  # a data file with no index this old is a killed writer's, never committed: removed
DATA, INDEX = ".f32", ".idx"
DAMAGED = "ignoring damaged feature shard %s (%s); its entries are computed again"
# The one header np.save writes for an index (n × 2 little-endian uint64), padded with spaces; nothing else is one.
INDEX_HEADER = re.compile(rb"\{'descr': '<u8', 'fortran_order': False, 'shape': \((\d+), 2\), \} *\n")

Key = tuple[str, str]  # (sha256 hex of the image file, view tag)


def _tag_code(tag: str) -> np.ndarray:
    return np.frombuffer(hashlib.blake2b(tag.encode(), digest_size=16).digest(), dtype="<u8")


def keys_array(keys: Sequence[Key]) -> np.ndarray:
    """(len(keys), 2) uint64: the first 128 bits of each digest, xor a hash of its tag (computed once per tag)."""
    if not keys:
        return np.zeros((0, 2), dtype=np.uint64)
    digests = bytes.fromhex("".join([digest[:32] for digest, _ in keys]))
    words = np.frombuffer(digests, dtype="<u8").reshape(len(keys), 2)
    tags = [tag for _, tag in keys]
    number = {tag: i for i, tag in enumerate(dict.fromkeys(tags))}
    codes = np.stack([_tag_code(tag) for tag in number])
    return words ^ codes[np.fromiter((number[tag] for tag in tags), dtype=np.intp, count=len(tags))]


def _shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _parse_shape(name: str) -> tuple[int, ...] | None:
    """NAME.3x512 → (3, 512); None for a name this store did not write."""
    try:
        shape = tuple(int(n) for n in name.rsplit(".", 1)[1].split("x"))
    except (IndexError, ValueError):
        return None
    return shape if all(n > 0 for n in shape) else None


def index_bytes(keys: np.ndarray) -> bytes:
    """What a shard's index holds (see the module)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(keys, dtype="<u8"))
    saved = buffer.getvalue()
    return saved + zlib.crc32(saved).to_bytes(4, "little")


def parse_index(raw: bytes) -> np.ndarray:
    """The (n, 2) keys in an index's bytes; ValueError, saying what is wrong, for any bytes index_bytes did not
    write (or an index of before the CRC, which ends 4 bytes sooner)."""
    start = 10 + int.from_bytes(raw[8:10], "little")
    header = INDEX_HEADER.fullmatch(raw[10:start]) if raw[:8] == b"\x93NUMPY\x01\x00" else None
    if header is None:
        raise ValueError("not an index of this store")
    rows = int(header[1])
    end = start + 16 * rows
    if len(raw) not in (end, end + 4):
        raise ValueError(f"{len(raw)} bytes where its header says {end} (+ 4)")
    if len(raw) == end + 4 and zlib.crc32(raw[:end]) != int.from_bytes(raw[end:], "little"):
        raise ValueError("its checksum does not match its bytes")
    return np.frombuffer(raw, dtype="<u8", count=2 * rows, offset=start).reshape(rows, 2)


class _Shard:
    """One committed shard as a reader sees it: its keys, and its rows mapped on demand."""

    def __init__(self, data: Path, keys: np.ndarray, shape: tuple[int, ...]):
        self.data, self.keys, self.shape = data, keys, shape

    def read(self, rows: np.ndarray, select: int | slice | None = None) -> np.ndarray:
        """A copy of those rows. The mapping is dropped at once: a mapping holds its file open, and a store of
        thousands of shards would otherwise run out of file descriptors (ulimit -n is often 1,024)."""
        mapped = np.memmap(self.data, dtype=np.float32, mode="r", shape=(len(self.keys), *self.shape))
        return np.array(mapped[rows] if select is None else mapped[rows, select])


class _Writer:
    """The shard this process appends to, and the keys written since its last commit."""

    def __init__(self, folder: Path, shape: tuple[int, ...]):
        self.pid, self.shape = os.getpid(), shape
        self.row_bytes = int(np.prod(shape)) * 4
        self.limit = max(1, min(SHARD_ROWS, SHARD_BYTES // self.row_bytes))
        stem = f"{socket.gethostname()}-{self.pid}-{secrets.token_hex(4)}.{_shape_name(shape)}"
        folder.mkdir(parents=True, exist_ok=True)
        self.data, self.index = folder / (stem + DATA), folder / (stem + INDEX)
        # Unbuffered: a forked child that drops this writer must not flush the parent's buffered rows into the
        # parent's file a second time, which would shift every row the parent appends after them.
        self.file = open(self.data, "ab", buffering=0)
        self.committed = np.zeros((0, 2), dtype=np.uint64)
        self.pending: list[np.ndarray] = []
        self.pending_rows, self.last_commit = 0, time.monotonic()

    @property
    def rows(self) -> int:
        return len(self.committed) + self.pending_rows

    def append(self, keys: np.ndarray, arrays: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(arrays, dtype=np.float32)).cast("B")
        while data:  # an unbuffered write may be short
            data = data[self.file.write(data):]
        self.pending.append(keys)
        self.pending_rows += len(keys)

    def removed(self) -> bool:
        """Whether the data file is gone (`cache clear` ran): an index written now would name rows no file holds."""
        return not self.data.exists()

    def commit(self) -> None:
        """Data first, on disk; then the index that names it (see the module)."""
        if not self.pending_rows:
            return
        if self.removed():
            raise FileNotFoundError(f"{self.data.name} was removed while being written; its rows are dropped")
        os.fsync(self.file.fileno())
        keys = np.concatenate([self.committed, *self.pending])
        atomic_write(self.index, lambda handle: handle.write(index_bytes(keys)))
        self.committed, self.pending, self.pending_rows = keys, [], 0
        self.last_commit = time.monotonic()

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.file.close()


class ShardStore:
    """Features of (digest, tag) keys in one folder (see the module). get/put serve one entry; get_many and
    put_many are the batched path extraction uses. Call flush() (or close()) to commit what was put."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.shards_dir = self.folder / "shards"
        self._shards: dict[str, tuple[tuple, _Shard | None]] = {}  # index name → ((size, mtime), shard)
        self._lookup: tuple | None = None  # (sorted first words, second words, shard number, row), shards
        self._writer: _Writer | None = None
        self._migrated = False

    # --- reading --------------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the indexes that are new or changed since the last call, and rebuild the lookup if any was."""
        if not self._migrated:
            self._migrated = True
            self._migrate_legacy()
        seen, changed = set(), False
        try:
            entries = list(os.scandir(self.shards_dir))
        except OSError:  # no shard yet, or no folder that can be read: nothing is stored
            entries = []
        for entry in entries:
            if not entry.name.endswith(INDEX):
                continue
            try:
                stat = entry.stat()
            except OSError:  # removed since the listing (cache clear)
                continue
            seen.add(entry.name)
            stamp = (stat.st_size, stat.st_mtime_ns)
            if self._shards.get(entry.name, (None,))[0] != stamp:
                self._shards[entry.name] = (stamp, self._open_shard(Path(entry.path)))
                changed = True
        for gone in set(self._shards) - seen:
            del self._shards[gone]
            changed = True
        if changed or self._lookup is None:
            shards = [shard for _, shard in self._shards.values() if shard is not None and len(shard.keys)]
            keys = np.concatenate([s.keys for s in shards]) if shards else np.zeros((0, 2), np.uint64)
            number = np.concatenate([np.full(len(s.keys), i, np.int32) for i, s in enumerate(shards)]) \
                if shards else np.zeros(0, np.int32)
            row = np.concatenate([np.arange(len(s.keys), dtype=np.int64) for s in shards]) \
                if shards else np.zeros(0, np.int64)
            order = np.argsort(keys[:, 0], kind="stable")
            self._lookup = (keys[order, 0], keys[order, 1], number[order], row[order]), shards

    def _open_shard(self, index: Path) -> _Shard | None:
        data = index.with_suffix(DATA)
        shape = _parse_shape(index.stem)
        try:
            if shape is None:
                raise ValueError("not a shard of this store")
            keys = parse_index(index.read_bytes())
            if data.stat().st_size < len(keys) * int(np.prod(shape)) * 4:
                raise ValueError(f"{data.name} holds fewer rows than its index names")
        except (OSError, ValueError) as error:  # damaged by something outside our commits
            log.warning(DAMAGED, index, error)
            return None
        return _Shard(data, keys, shape)

    def _locate(self, keys: Sequence[Key]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions in keys that are stored, their shard numbers, their rows)."""
        self._refresh()
        (first, second, number, row), _ = self._lookup
        if not len(first) or not len(keys):
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        wanted = keys_array(keys)
        at = np.minimum(np.searchsorted(first, wanted[:, 0]), len(first) - 1)
        positions = np.flatnonzero((first[at] == wanted[:, 0]) & (second[at] == wanted[:, 1]))
        return positions, number[at[positions]], row[at[positions]]

    def get_many(self, keys: Sequence[Key], shape: tuple[int, ...], select: int | slice | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The stored entries of `keys` of this shape, as (positions in keys, arrays) groups, one per shard.
        select: only that index (or slice) of each entry's first axis (one pooling of a backbone pass)."""
        positions, numbers, rows = self._locate(keys)
        shards = self._lookup[1]
        for number in np.unique(numbers):
            if shards[number].shape == tuple(shape):
                mine = np.flatnonzero(numbers == number)
                mine = mine[np.argsort(rows[mine], kind="stable")]  # read the shard front to back
                try:
                    arrays = shards[number].read(rows[mine], select)
                except (OSError, ValueError) as error:  # removed or truncated since its index was read
                    log.warning("ignoring feature shard %s (%s); its entries are computed again",
                                shards[number].data, error)
                    continue
                yield positions[mine], arrays

    def get(self, digest: str, tag: str) -> np.ndarray | None:
        """One entry, of whatever shape it was stored with (extraction uses get_many)."""
        positions, numbers, _ = self._locate([(digest, tag)])
        if len(positions):
            for _, arrays in self.get_many([(digest, tag)], self._lookup[1][numbers[0]].shape):
                return arrays[0]
        return None

    # --- writing --------------------------------------------------------------------------------------

    def put_many(self, keys: Sequence[Key], arrays: np.ndarray) -> None:
        """Append entries (arrays: len(keys) × shape); committed every COMMIT_ROWS rows, COMMIT_SECONDS seconds
        and by flush(). A full or read-only disk costs speed, never the run: it is logged and the entries dropped."""
        if not len(keys):
            return
        arrays = np.asarray(arrays)
        shape = tuple(arrays.shape[1:])
        try:
            writer = self._writer
            if writer is not None and writer.pid != os.getpid():  # a forked child: the parent's shard is its own
                writer = self._writer = None
            if writer is not None and writer.removed():  # the cache was cleared: a new shard in the new folder
                writer.file.close()
                writer = self._writer = None
            if writer is not None and (writer.shape != shape or writer.rows + len(keys) > writer.limit):
                writer.close()
                writer = self._writer = None
            if writer is None:
                writer = self._writer = _Writer(self.shards_dir, shape)
            writer.append(keys_array(keys), arrays)
            if writer.pending_rows >= COMMIT_ROWS or time.monotonic() - writer.last_commit > COMMIT_SECONDS:
                writer.commit()
        except (OSError, StopsignError) as error:
            log.warning("cannot write the feature cache at %s (%s); continuing without it", self.folder, error)
            self._writer = None

    def put(self, digest: str, tag: str, array: np.ndarray) -> None:
        self.put_many([(digest, tag)], np.asarray(array)[None])

    def flush(self) -> None:
        """Commit what was put: after this a kill loses none of it, and other processes read it."""
        if self._writer is not None and self._writer.pid == os.getpid():
            try:
                self._writer.commit()
            except (OSError, StopsignError) as error:
                log.warning("cannot write the feature cache at %s (%s); continuing without it", self.folder, error)
                self._writer = None

    def close(self) -> None:
        self.flush()
        if self._writer is not None and self._writer.pid == os.getpid():
            self._writer.file.close()
        self._writer = None

    # --- old caches and housekeeping -----------------------------------------------------------------

    def _migrate_legacy(self) -> None:
        """Move the entries of a stopsign <= 0.2 cache (FOLDER/xx/DIGEST-TAG.npy) into shards, then remove
        them; and remove data files of shards that were never committed by writers long gone."""
        legacy = [p for p in self.folder.glob("[0-9a-f][0-9a-f]/*.npy")] if self.folder.is_dir() else []
        if legacy:
            log.info("moving %d cached features of an older stopsign into %s", len(legacy), self.shards_dir)
            moved, keys = [], []
            for path in legacy:
                digest, _, tag = path.stem.partition("-")
                try:
                    self.put(digest, tag, np.load(path))
                    moved.append(path)
                    keys.append((digest, tag))
                except (ValueError, EOFError):  # a damaged old entry is simply computed again
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                except OSError:
                    pass  # unreadable now: kept, and read (or migrated) another time
            self.flush()
            # Remove only what a reader now finds in a shard: an entry whose write failed (a full disk) is kept.
            for i in self._locate(keys)[0].tolist():
                with contextlib.suppress(OSError):  # a read-only cache is read, not emptied
                    moved[i].unlink(missing_ok=True)
            for folder in {path.parent for path in legacy}:
                try:
                    folder.rmdir()
                except OSError:
                    pass  # another process is still writing old entries there, or a temporary file is left
        if self.shards_dir.is_dir():
            old = time.time() - ORPHAN_SECONDS
            for data in self.shards_dir.glob(f"*{DATA}"):
                try:
                    if not data.with_suffix(INDEX).exists() and data.stat().st_mtime < old:
                        data.unlink()
                except OSError:
                    pass  # gone already, or not ours to remove: nothing depends on it


class MemoryStore:
    """Without a cache folder: the features an extractor computed, kept in memory for its lifetime (so the plain
    view a prediction computes also serves the comparison with the training images), up to `limit` entries."""

    folder = None

    def __init__(self, limit: int = 50_000):
        self.entries: dict[Key, np.ndarray] = {}
        self.limit = limit

    def get(self, digest: str, tag: str) -> np.ndarray | None:
        return self.entries.get((digest, tag))

    def put(self, digest: str, tag: str, array: np.ndarray) -> None:
        if len(self.entries) < self.limit:
            self.entries[(digest, tag)] = np.array(array)

    def get_many(self, keys: Sequence[Key], shape: tuple[int, ...], select: int | slice | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        found = [(i, self.entries[key]) for i, key in enumerate(keys) if key in self.entries]
        found = [(i, array) for i, array in found if array.shape == tuple(shape)]
        if found:
            arrays = np.stack([array for _, array in found])
            yield np.array([i for i, _ in found], dtype=np.int64), arrays if select is None else arrays[:, select]

    def put_many(self, keys: Sequence[Key], arrays: np.ndarray) -> None:
        for key, array in zip(keys, arrays):
            self.put(*key, array)

    def flush(self) -> None:
        """Nothing to commit: the entries live in this process's memory (FeatureStore's interface)."""

    def close(self) -> None:
        """Nothing to close (FeatureStore's interface)."""


def count_entries(folder: str | os.PathLike) -> int:
    """The committed entries of one store folder, as `stopsign cache info` shows them (an entry of an older
    stopsign's cache, not yet moved into shards, counts as one); a damaged index is named and counts none."""
    folder = Path(folder)
    entries = 0
    for path in folder.glob(f"shards/*{INDEX}"):
        try:
            entries += len(parse_index(path.read_bytes()))
        except (OSError, ValueError) as error:  # gone since the listing (not damaged) is not worth a warning
            if path.exists():
                log.warning(DAMAGED, path, error)
    return entries + sum(1 for _ in folder.glob("[0-9a-f][0-9a-f]/*.npy"))
