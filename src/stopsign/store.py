"""The feature store: arrays keyed by (image digest, view tag) in append-only shard files, one folder per backbone key.

A shard is `shards/NAME.f32`, float32 rows of one shape (NAME ends in it: .7x512) appended one after another, and
`NAME.idx`, the 128-bit keys of its first n rows (an .npy of n × 2 uint64, then the CRC-32 of those bytes). NAME
holds its writer's host, pid and a random part, so processes and torchrun ranks never write to one file. A commit
fsyncs the new rows, then replaces the index atomically: a reader sees exactly the committed rows, and a kill leaves
at most bytes past them, which no index names. A shard whose data file is shorter than its index says, or whose
index is damaged (the CRC covers every byte; an index of before the CRC is checked for its header and length), is
skipped with a warning and its entries recomputed. Rows overwritten in place go undetected: a checksum would cost
more than the warm read it protects. Reads map the shard files and look keys up in one sorted array built from
every index. Caches of stopsign <= 0.2 (one .npy per entry under `xx/`) are moved into shards when first read.

Written by hand: no library keeps appendable, memory-mappable arrays that many processes on many machines write at
once without a server or a lock (SQLite's WAL mode needs shared memory, so not over NFS). The index is parsed by
hand too: np.load parses its header with the tokenizer, and damaged bytes raise whatever that raises.
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
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from .errors import StopsignError
from .files import atomic_write_bytes

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
NO_KEYS = np.zeros((0, 2), dtype=np.uint64)

Key = tuple[str, str]  # (sha256 hex of the image file, view tag)


def keys_array(keys: Sequence[Key]) -> np.ndarray:
    """(len(keys), 2) uint64: the first 128 bits of each digest, xor a hash of its tag (computed once per tag)."""
    if not keys:
        return NO_KEYS
    words = np.frombuffer(bytes.fromhex("".join([digest[:32] for digest, _ in keys])), dtype="<u8").reshape(-1, 2)
    tags = [tag for _, tag in keys]
    number = {tag: i for i, tag in enumerate(dict.fromkeys(tags))}
    codes = np.stack([np.frombuffer(hashlib.blake2b(tag.encode(), digest_size=16).digest(), "<u8") for tag in number])
    return words ^ codes[np.fromiter((number[tag] for tag in tags), dtype=np.intp, count=len(tags))]


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


class _Shard(NamedTuple):
    """One committed shard as a reader sees it: its data file, its keys, the shape of its rows."""
    data: Path
    keys: np.ndarray
    shape: tuple[int, ...]

    def read(self, rows: np.ndarray, select: int | slice | None = None) -> np.ndarray:
        """A copy of those rows. The mapping is dropped at once: a mapping holds its file open, and a store of
        thousands of shards would otherwise run out of file descriptors (ulimit -n is often 1,024)."""
        mapped = np.memmap(self.data, dtype=np.float32, mode="r", shape=(len(self.keys), *self.shape))
        return np.array(mapped[rows] if select is None else mapped[rows, select])


class _Writer:
    """The shard this process appends to, and the keys written since its last commit."""

    def __init__(self, folder: Path, shape: tuple[int, ...]):
        self.pid, self.shape = os.getpid(), shape
        self.limit = max(1, min(SHARD_ROWS, SHARD_BYTES // (int(np.prod(shape)) * 4)))
        stem = f"{socket.gethostname()}-{self.pid}-{secrets.token_hex(4)}.{'x'.join(map(str, shape))}"
        folder.mkdir(parents=True, exist_ok=True)
        self.data, self.index = folder / (stem + DATA), folder / (stem + INDEX)
        # Unbuffered: a forked child that drops this writer must not flush the parent's buffered rows into the
        # parent's file a second time, which would shift every row the parent appends after them.
        self.file = open(self.data, "ab", buffering=0)
        self.committed, self.pending, self.pending_rows = NO_KEYS, [], 0
        self.last_commit = time.monotonic()

    def full(self, shape: tuple[int, ...], rows: int) -> bool:
        """Whether rows of this shape need another shard: another shape, no room, or the file removed (`cache
        clear` ran: an index written now would name rows no file holds)."""
        return shape != self.shape or len(self.committed) + self.pending_rows + rows > self.limit or \
            not self.data.exists()

    def append(self, keys: np.ndarray, arrays: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(arrays, dtype=np.float32)).cast("B")
        while data:  # an unbuffered write may be short
            data = data[self.file.write(data):]
        self.pending.append(keys)
        self.pending_rows += len(keys)

    def commit(self) -> None:
        """Data first, on disk; then the index that names it (see the module)."""
        if not self.pending_rows:
            return
        if not self.data.exists():
            raise FileNotFoundError(f"{self.data.name} was removed while being written; its rows are dropped")
        os.fsync(self.file.fileno())
        keys = np.concatenate([self.committed, *self.pending])
        atomic_write_bytes(self.index, index_bytes(keys))
        self.committed, self.pending, self.pending_rows = keys, [], 0
        self.last_commit = time.monotonic()

    def close(self) -> None:
        try:
            if self.data.exists():
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
        stamps = {}
        with contextlib.suppress(OSError):  # no shard yet, or no folder that can be read: nothing is stored
            for entry in os.scandir(self.shards_dir):
                with contextlib.suppress(OSError):  # removed since the listing (cache clear)
                    if entry.name.endswith(INDEX):
                        stamps[entry.name] = (entry.stat().st_size, entry.stat().st_mtime_ns)
        if self._lookup is not None and stamps == {name: stamp for name, (stamp, _) in self._shards.items()}:
            return
        self._shards = {name: self._shards[name] if self._shards.get(name, (None,))[0] == stamp
                        else (stamp, self._open_shard(self.shards_dir / name)) for name, stamp in stamps.items()}
        shards = [shard for _, shard in self._shards.values() if shard is not None and len(shard.keys)]
        sizes = [len(shard.keys) for shard in shards]
        keys = np.concatenate([NO_KEYS, *(shard.keys for shard in shards)])
        number = np.repeat(np.arange(len(shards), dtype=np.int32), sizes)
        row = np.arange(len(keys)) - np.repeat(np.cumsum([0, *sizes])[:-1], sizes)
        order = np.argsort(keys[:, 0], kind="stable")
        self._lookup = (keys[order, 0], keys[order, 1], number[order], row[order]), shards

    def _open_shard(self, index: Path) -> _Shard | None:
        data, shape = index.with_suffix(DATA), _parse_shape(index.stem)
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

    def _own_writer(self) -> _Writer | None:
        """This process's writer; a forked child drops its parent's, whose shard is the parent's own."""
        if self._writer is not None and self._writer.pid != os.getpid():
            self._writer = None
        return self._writer

    def _cannot_write(self, error: Exception) -> None:
        log.warning("cannot write the feature cache at %s (%s); continuing without it", self.folder, error)
        self._writer = None

    def put_many(self, keys: Sequence[Key], arrays: np.ndarray) -> None:
        """Append entries (arrays: len(keys) × shape); committed every COMMIT_ROWS rows, COMMIT_SECONDS seconds
        and by flush(). A full or read-only disk costs speed, never the run: it is logged and the entries dropped."""
        if not len(keys):
            return
        arrays = np.asarray(arrays)
        try:
            writer = self._own_writer()
            if writer is not None and writer.full(arrays.shape[1:], len(keys)):
                self._writer = None
                writer.close()
            writer = self._writer = self._writer or _Writer(self.shards_dir, arrays.shape[1:])
            writer.append(keys_array(keys), arrays)
            if writer.pending_rows >= COMMIT_ROWS or time.monotonic() - writer.last_commit > COMMIT_SECONDS:
                writer.commit()
        except (OSError, StopsignError) as error:
            self._cannot_write(error)

    def put(self, digest: str, tag: str, array: np.ndarray) -> None:
        self.put_many([(digest, tag)], np.asarray(array)[None])

    def flush(self) -> None:
        """Commit what was put: after this a kill loses none of it, and other processes read it."""
        try:
            if self._own_writer() is not None:
                self._writer.commit()
        except (OSError, StopsignError) as error:
            self._cannot_write(error)

    def close(self) -> None:
        self.flush()
        if self._own_writer() is not None:
            self._writer.file.close()
        self._writer = None

    # --- old caches and housekeeping -----------------------------------------------------------------

    def _migrate_legacy(self) -> None:
        """Move the entries of a stopsign <= 0.2 cache (FOLDER/xx/DIGEST-TAG.npy) into shards, then remove
        them; and remove data files of shards that were never committed by writers long gone."""
        legacy = list(self.folder.glob("[0-9a-f][0-9a-f]/*.npy"))
        if legacy:
            log.info("moving %d cached features of an older stopsign into %s", len(legacy), self.shards_dir)
            moved = []
            for path in legacy:
                digest, _, tag = path.stem.partition("-")
                try:
                    self.put(digest, tag, np.load(path))
                    moved.append((path, (digest, tag)))
                except (ValueError, EOFError):  # a damaged old entry is simply computed again
                    with contextlib.suppress(OSError):
                        path.unlink()
                except OSError:
                    pass  # unreadable now: kept, and read (or migrated) another time
            self.flush()
            # Remove only what a reader now finds in a shard: an entry whose write failed (a full disk) is kept.
            for i in self._locate([key for _, key in moved])[0].tolist():
                with contextlib.suppress(OSError):  # a read-only cache is read, not emptied
                    moved[i][0].unlink()
            for folder in {path.parent for path in legacy}:
                with contextlib.suppress(OSError):  # still holds another process's old entries, or a temporary file
                    folder.rmdir()
        old = time.time() - ORPHAN_SECONDS
        for data in self.shards_dir.glob(f"*{DATA}"):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: nothing depends on it
                if not data.with_suffix(INDEX).exists() and data.stat().st_mtime < old:
                    data.unlink()


class MemoryStore:
    """Without a cache folder: the features an extractor computed, kept in memory for its lifetime (so the plain
    view a prediction computes also serves the comparison with the training images), up to `limit` entries."""

    folder = None

    def __init__(self, limit: int = 50_000):
        self.entries: dict[Key, np.ndarray] = {}
        self.limit = limit

    def get_many(self, keys: Sequence[Key], shape: tuple[int, ...], select: int | slice | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        found = [i for i, key in enumerate(keys) if key in self.entries and self.entries[key].shape == tuple(shape)]
        if found:
            arrays = np.stack([self.entries[keys[i]] for i in found])
            yield np.array(found, dtype=np.int64), arrays if select is None else arrays[:, select]

    def put_many(self, keys: Sequence[Key], arrays: np.ndarray) -> None:
        for key, array in zip(keys, arrays):
            if len(self.entries) < self.limit:
                self.entries[key] = np.array(array)

    def flush(self) -> None:
        """Nothing to commit: the entries live in this process's memory (ShardStore's interface)."""

    close = flush


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
