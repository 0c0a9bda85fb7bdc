"""The sharded feature store: round trips, few files, commits that survive kill -9, damaged shards ignored,
writers in two processes, the caches of older versions moved in."""

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hypothesis import given, settings, strategies as st

from stopsign.cache import cache_info, clear_cache
from stopsign.cli import main
from stopsign.store import ShardStore

SHAPE = (3, 8)


def digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def value(i: int) -> np.ndarray:
    """What entry i holds: its own numbers, so a row read from the wrong place shows."""
    return np.arange(24, dtype=np.float32).reshape(SHAPE) + i


def fill(store: ShardStore, numbers, tag: str = "plain") -> None:
    numbers = list(numbers)
    store.put_many([(digest(i), tag) for i in numbers], np.stack([value(i) for i in numbers]))


def read_all(store: ShardStore, numbers, tag: str = "plain", select=None) -> dict[int, np.ndarray]:
    keys = [(digest(i), tag) for i in numbers]
    found = {}
    for positions, arrays in store.get_many(keys, SHAPE, select=select):
        found.update({numbers[p]: a for p, a in zip(positions, arrays)})
    return found


def test_entries_round_trip_by_digest_and_tag_in_few_files(tmp_path):
    store = ShardStore(tmp_path / "store")
    fill(store, range(5000))
    store.put(digest(0), "flipped", value(7))
    store.flush()
    reader = ShardStore(tmp_path / "store")
    found = read_all(reader, list(range(5000)))
    assert len(found) == 5000 and all(np.array_equal(found[i], value(i)) for i in (0, 1, 4321, 4999))
    np.testing.assert_array_equal(read_all(reader, [3], select=1)[3], value(3)[1])  # one pooling
    np.testing.assert_array_equal(reader.get(digest(0), "flipped"), value(7))
    assert reader.get(digest(5000), "plain") is None and reader.get(digest(1), "other") is None
    assert list(reader.get_many([(digest(1), "plain")], (3, 9))) == []  # another shape is another backbone
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert len(files) == 2  # one shard: its rows and its index
    assert cache_info(tmp_path)["folders"]["store"]["entries"] == 5001


def test_what_is_put_is_read_only_once_committed(tmp_path):
    writer = ShardStore(tmp_path / "store")
    fill(writer, range(10))
    reader = ShardStore(tmp_path / "store")
    assert read_all(reader, list(range(10))) == {}
    writer.flush()
    assert len(read_all(reader, list(range(10)))) == 10  # the same reader sees the commit


WRITER = """
import sys, hashlib, numpy as np
from stopsign.store import ShardStore
store = ShardStore(sys.argv[1])
start, step = int(sys.argv[2]), int(sys.argv[3])
for batch in range(start, start + 10**6, step):
    numbers = range(batch, batch + step)
    keys = [(hashlib.sha256(str(i).encode()).hexdigest(), "plain") for i in numbers]
    store.put_many(keys, np.stack([np.arange(24, dtype=np.float32).reshape(3, 8) + i for i in numbers]))
    store.flush()
    print(batch + step, flush=True)  # every entry below this is committed
"""


def start_writer(folder, start: int, step: int = 50) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(start), str(step)],
                            stdout=subprocess.PIPE, text=True)


def test_kill_minus_nine_mid_write_loses_only_uncommitted_entries(tmp_path):
    folder, rng, start = tmp_path / "store", np.random.default_rng(0), 0
    for cycle in range(4):
        writer = start_writer(folder, start)
        committed = int(writer.stdout.readline())  # running: at least one commit
        time.sleep(float(rng.uniform(0.0, 0.3)))
        writer.send_signal(signal.SIGKILL)
        lines = writer.stdout.read().split()
        writer.wait()
        committed = int(lines[-1]) if lines else committed
        found = read_all(ShardStore(folder), list(range(committed + 50)))
        assert set(range(committed)) <= set(found)  # every commit it reported survived
        assert all(np.array_equal(array, value(i)) for i, array in found.items())  # no torn row is read
        start = max(found) + 1
    assert len(list(folder.rglob("*.idx"))) == 4  # one shard per writer process


def test_a_damaged_shard_is_ignored_and_the_others_still_read(tmp_path, caplog):
    for part in (range(0, 100), range(100, 200), range(200, 300)):
        store = ShardStore(tmp_path / "store")
        fill(store, part)
        store.close()
    data = sorted((tmp_path / "store").rglob("*.f32"), key=os.path.getmtime)
    indexes = [path.with_suffix(".idx") for path in data]
    with open(data[0], "r+b") as handle:
        handle.truncate(1000)  # fewer rows than its index names
    indexes[1].write_bytes(b"not an index")
    with caplog.at_level(logging.WARNING):
        found = read_all(ShardStore(tmp_path / "store"), list(range(300)))
    assert sorted(found) == list(range(200, 300))
    assert all(np.array_equal(array, value(i)) for i, array in found.items())
    assert sum("ignoring damaged feature shard" in record.message for record in caplog.records) == 2


DAMAGE = {  # what a bad disk, a careless copy or an editor does to an index; the brace one made tokenize raise
    "zeroed": lambda raw: bytes(len(raw)),
    "random": lambda raw: np.random.default_rng(0).bytes(len(raw)),
    "truncated": lambda raw: raw[:len(raw) // 2],
    "emptied": lambda raw: b"",
    "brace in its header": lambda raw: raw.replace(b"}", b"{", 1),
    "one key byte": lambda raw: raw[:-20] + bytes([raw[-20] ^ 1]) + raw[-19:],
    "bytes appended": lambda raw: raw + b"junk",
}


def damaged_store(folder: Path) -> tuple[list[Path], range]:
    """A store of one shard per kind of DAMAGE, each damaged so, and one good shard: (the damaged indexes, the
    good shard's entries)."""
    for start in range(0, 10 * (len(DAMAGE) + 1), 10):
        store = ShardStore(folder)
        fill(store, range(start, start + 10))
        store.close()
    indexes = sorted(folder.rglob("*.idx"), key=os.path.getmtime)
    for index, damage in zip(indexes, DAMAGE.values()):
        index.write_bytes(damage(index.read_bytes()))
    return indexes[:len(DAMAGE)], range(10 * len(DAMAGE), 10 * (len(DAMAGE) + 1))


def warned_about(caplog, paths) -> bool:
    """One warning per damaged index, naming it and saying its entries are computed again."""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return len(warnings) == len(paths) and all(
        sum(path.name in warning and "computed again" in warning for warning in warnings) == 1 for path in paths)


def test_cache_info_counts_around_damaged_indexes_and_names_each(tmp_path, caplog, capsys):
    damaged, good = damaged_store(tmp_path / "cache" / "key")
    with caplog.at_level(logging.WARNING):
        assert main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert f"holds {len(good)} entries" in capsys.readouterr().out
    assert warned_about(caplog, damaged)


def test_any_damage_to_an_index_costs_its_entries_and_one_warning(tmp_path):
    for part in (range(0, 20), range(20, 40)):
        store = ShardStore(tmp_path / "template")
        fill(store, part)
        store.close()
    raw = min((tmp_path / "template").rglob("*.idx"), key=os.path.getmtime).read_bytes()

    @settings(max_examples=60, deadline=None)
    @given(at=st.integers(0, 10**6), junk=st.binary(min_size=1, max_size=40), cut=st.booleans())
    def check(at, junk, cut):
        if cut:  # short of its last 4 bytes, the CRC: without only them it reads as an index from before the CRC
            damaged = raw[:at % (len(raw) - 4)]
        else:
            damaged = raw[:at % len(raw)] + junk + raw[at % len(raw) + len(junk):]
            if damaged == raw:
                return
        with tempfile.TemporaryDirectory() as folder:
            shutil.copytree(tmp_path / "template", folder, dirs_exist_ok=True)
            index = next(path for path in Path(folder).rglob("*.idx") if path.read_bytes() == raw)
            index.write_bytes(damaged)
            warnings = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = warnings.append
            logging.getLogger("stopsign.store").addHandler(handler)
            try:
                found = read_all(ShardStore(folder), list(range(40)))
            finally:
                logging.getLogger("stopsign.store").removeHandler(handler)
        assert sorted(found) == list(range(20, 40))
        assert all(np.array_equal(array, value(i)) for i, array in found.items())
        assert len(warnings) == 1 and index.name in warnings[0].getMessage()

    check()


def test_cache_clear_empties_a_store_whatever_its_folder_holds(tmp_path, caplog):
    folder = tmp_path / "cache" / "key"
    damaged_store(folder)
    (folder / "shards" / ".half-written.idx.abc.tmp").write_bytes(b"\x93NUMPY")  # a writer killed mid-commit
    (folder / "shards" / "a folder.idx").mkdir()
    (folder / "shards" / "gone.idx").symlink_to(tmp_path / "nowhere")
    (folder / "notes.txt").write_text("not ours")
    with caplog.at_level(logging.WARNING):
        assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert not folder.exists() and cache_info(tmp_path / "cache")["entries"] == 0
    assert read_all(ShardStore(folder), list(range(100))) == {}


def test_an_index_written_before_its_crc_still_reads(tmp_path):
    store = ShardStore(tmp_path / "store")
    fill(store, range(30))
    store.close()
    for index in (tmp_path / "store").rglob("*.idx"):
        keys = np.load(index)
        with open(index, "wb") as handle:
            np.save(handle, keys)  # as stores wrote them before: the .npy alone
    found = read_all(ShardStore(tmp_path / "store"), list(range(30)))
    assert sorted(found) == list(range(30)) and all(np.array_equal(a, value(i)) for i, a in found.items())
    assert cache_info(tmp_path)["folders"]["store"]["entries"] == 30


def test_a_reader_holds_no_file_open_and_skips_a_shard_removed_under_it(tmp_path, monkeypatch):
    monkeypatch.setattr("stopsign.store.SHARD_ROWS", 10)
    writer = ShardStore(tmp_path / "store")
    for start in range(0, 200, 10):
        fill(writer, range(start, start + 10))
    writer.close()
    opened = len(os.listdir("/proc/self/fd"))
    reader = ShardStore(tmp_path / "store")
    found = read_all(reader, list(range(200)))
    assert len(found) == 200 and all(np.array_equal(array, value(i)) for i, array in found.items())
    assert len(os.listdir("/proc/self/fd")) <= opened  # not one descriptor per shard: 10^7 images make thousands
    removed = next(iter((tmp_path / "store").rglob("*.f32")))
    removed.unlink()  # as `cache clear` or a damaged disk might, after the reader listed it
    assert 180 <= len(read_all(reader, list(range(200)))) < 200


def test_two_processes_write_at_once_each_to_its_own_shard(tmp_path):
    folder = tmp_path / "store"
    writers = [start_writer(folder, 0), start_writer(folder, 10**7)]
    for writer in writers:
        for _ in range(20):
            writer.stdout.readline()  # twenty commits each, interleaved
    for writer in writers:
        writer.terminate()
        writer.wait()
    found = read_all(ShardStore(folder), list(range(1000)) + list(range(10**7, 10**7 + 1000)))
    assert len(found) == 2000 and all(np.array_equal(array, value(i)) for i, array in found.items())
    assert len(list(folder.rglob("*.idx"))) == 2


def test_a_forked_child_writes_its_own_shard(tmp_path):
    store = ShardStore(tmp_path / "store")
    fill(store, range(10))
    store.flush()
    fill(store, range(10, 20))  # uncommitted at the fork
    pid = os.fork()
    if pid == 0:  # the child: the parent's uncommitted rows are not its own, nor written by it
        fill(store, range(100, 110))
        store.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    store.flush()
    fill(store, range(20, 30))  # rows the parent appends after the fork land where its index says
    store.flush()
    found = read_all(ShardStore(tmp_path / "store"), list(range(30)) + list(range(100, 110)))
    assert sorted(found) == list(range(30)) + list(range(100, 110))
    assert all(np.array_equal(array, value(i)) for i, array in found.items())


def write_old_cache(folder, numbers) -> None:
    for i in numbers:
        path = folder / digest(i)[:2] / f"{digest(i)}-plain.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, value(i))


def test_an_older_cache_is_moved_into_shards(tmp_path):
    folder = tmp_path / "features" / "resnet18-abc"
    write_old_cache(folder, range(3))
    assert cache_info(tmp_path / "features")["entries"] == 3
    found = read_all(ShardStore(folder), [0, 1, 2])
    assert sorted(found) == [0, 1, 2] and np.array_equal(found[2], value(2))
    assert not list(folder.rglob("*.npy")) and cache_info(tmp_path / "features")["entries"] == 3


def test_an_older_cache_that_cannot_be_moved_is_kept(tmp_path):
    folder = tmp_path / "key"
    write_old_cache(folder, range(3))
    (folder / "shards").write_text("a file where the shards would be")
    assert read_all(ShardStore(folder), [0, 1, 2]) == {}
    assert len(list(folder.rglob("*.npy"))) == 3  # not moved, so not removed
    (folder / "shards").unlink()
    found = read_all(ShardStore(folder), [0, 1, 2])  # moved once the store can write
    assert sorted(found) == [0, 1, 2] and not list(folder.rglob("*.npy"))


def test_cache_info_counts_entries_and_bytes_and_clear_removes_them(tmp_path):
    store = ShardStore(tmp_path / "features" / "key")
    fill(store, range(40))
    store.flush()
    info = cache_info(tmp_path / "features")
    assert info["entries"] == 40 and info["bytes"] >= 40 * 24 * 4
    assert clear_cache(tmp_path / "features")["entries"] == 40
    assert cache_info(tmp_path / "features")["entries"] == 0 and not (tmp_path / "features" / "key").exists()


def test_a_writer_whose_cache_is_cleared_goes_on_in_a_new_shard(tmp_path, caplog):
    store = ShardStore(tmp_path / "features" / "key")
    fill(store, range(40))
    store.flush()
    fill(store, range(40, 50))  # in the shard `clear` removes: lost with it
    clear_cache(tmp_path / "features")  # while this process is mid-extraction
    fill(store, range(50, 90))
    store.flush()
    with caplog.at_level(logging.WARNING):
        found = read_all(ShardStore(tmp_path / "features" / "key"), list(range(90)))
    assert sorted(found) == list(range(50, 90)) and all(np.array_equal(a, value(i)) for i, a in found.items())
    assert "damaged" not in caplog.text  # no index left naming the removed shard's rows
    assert cache_info(tmp_path / "features")["entries"] == 40


def test_an_unwritable_store_costs_the_cache_not_the_run(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's folder would be")
    store = ShardStore(blocked / "store")
    with caplog.at_level(logging.WARNING):
        fill(store, range(3))
        store.flush()
    assert "cannot write the feature cache" in caplog.text
    assert read_all(store, [0, 1, 2]) == {}
