"""files.py: atomic writes are whole or absent, take the umask's mode; sha256_file; relative()."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from stopsign import files
from stopsign.errors import StopsignError
from stopsign.files import (atomic_save_npy, atomic_write, atomic_write_bytes, atomic_write_text, relative,
                            sha256_file, write_csv, write_json)


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(files.TEMPORARY_SUFFIX))


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def test_atomic_write_text_writes_the_whole_text(tmp_path):
    path = tmp_path / "sub" / "note.txt"
    text = "stop ✋ sign\n" * 1000
    assert atomic_write_text(path, text) == path
    assert path.read_bytes() == text.encode("utf-8")
    assert leftovers(path.parent) == []


def test_write_json_round_trips_and_ends_in_a_newline(tmp_path):
    path = tmp_path / "data.json"
    data = {"a": [1, 2.5, None], "b": {"c": "d"}, "path": Path("/x/y")}  # Path via default=str
    write_json(path, data)
    raw = path.read_text()
    assert raw.endswith("}\n")
    assert json.loads(raw) == {"a": [1, 2.5, None], "b": {"c": "d"}, "path": "/x/y"}


def test_write_csv_writes_header_and_rows_ignoring_extra_keys(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = [{"epoch": 1, "lr": 0.1, "extra": "x"}, {"epoch": 2, "lr": 0.05}]
    write_csv(path, rows, ["epoch", "lr"])
    assert path.read_text() == "epoch,lr\n1,0.1\n2,0.05\n"
    with open(path, newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"epoch": "1", "lr": "0.1"}, {"epoch": "2", "lr": "0.05"}]


def test_atomic_save_npy_round_trips_a_non_contiguous_array(tmp_path):
    array = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # a strided view
    path = atomic_save_npy(tmp_path / "a.npy", array)
    loaded = np.load(path)
    assert loaded.dtype == np.float32 and loaded.shape == (4, 3)
    np.testing.assert_array_equal(loaded, array)
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"old": True})
    before = path.read_bytes()

    def half_then_fail(handle):
        handle.write(b'{"new": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failing_npy_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.npy"
    atomic_save_npy(path, np.ones(3))

    def broken_save(handle, array):
        handle.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.np, "save", broken_save)
    with pytest.raises(StopsignError, match="the disk is full") as caught:
        atomic_save_npy(path, np.zeros(3))
    assert str(path) in str(caught.value)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]


def test_an_unwritable_destination_is_a_stopsign_error_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "inside" / "out.txt"  # a folder under a regular file: fails for root too
    with pytest.raises(StopsignError) as caught:
        atomic_write_text(target, "hello")
    assert str(target) in str(caught.value)
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_finished_files_take_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    written = [atomic_write_text(tmp_path / "a.txt", "a"), write_json(tmp_path / "b.json", {}),
               write_csv(tmp_path / "c.csv", [], ["x"]), atomic_save_npy(tmp_path / "d.npy", np.ones(2)),
               atomic_write_bytes(tmp_path / "e.bin", b"e", durable=False)]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path.name


def test_umask_is_unchanged_after_a_write(tmp_path, umask):
    umask(0o027)
    atomic_write_text(tmp_path / "a.txt", "a")
    assert os.umask(0o027) == 0o027


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])  # empty, small, more than one 1 MiB block
def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    renamed = tmp_path / "other-name.png"
    renamed.write_bytes(data)
    assert sha256_file(renamed) == sha256_file(path)


def test_sha256_file_of_a_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


def test_relative_inside_and_outside_the_root(tmp_path):
    root = tmp_path / "data"
    assert relative(root / "stop" / "a.png", root) == os.path.join("stop", "a.png")
    assert relative(str(root / "b.png"), str(root)) == "b.png"
    outside = tmp_path / "elsewhere" / "c.png"
    assert relative(outside, root) == str(outside)
    assert relative("rel/d.png", root) == "rel/d.png"
