"""Faults: killed and interrupted runs resume to the same result, a full disk or unwritable folder is a clear
error, and bad images, hostile annotations and crafted checkpoints are refused or skipped, never a crash."""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import make_image, train_tiny
from stopsign import load_classifier, train
from stopsign.data import images as images_module
from stopsign.model.backbones import BACKBONES
from stopsign.data.datasets import load_data
from stopsign.errors import CheckpointError, DataError, StopsignError
from stopsign.model.features import FeatureExtractor
from stopsign.files import TEMPORARY_SUFFIX
from stopsign.checkpoint import load_checkpoint
from stopsign.runs import WRITE_PROBE
from test_images import noisy_jpeg, palette_with_transparency, png_claiming, sixteen_bit_grey

TESTS = Path(__file__).resolve().parent
from stopsign.training import trainer as train_module
files_module = importlib.import_module("stopsign.files")


def run(tmp_path, data, **overrides):
    return train_tiny(tmp_path, data, **({"epochs": 8} | overrides))


@pytest.fixture
def data(tmp_path, make_images):
    return make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, layout="folders")


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def outcome(run_dir: Path) -> tuple:
    """What an interruption must not change: every metric but the time, the split, the kept head."""
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in metric_rows(run_dir)]
    split = json.loads((run_dir / "data.json").read_text())["split"]
    best = torch.load(run_dir / "best.pt", weights_only=True)
    return rows, split, best["epoch"], best["head"]


def assert_same_outcome(run_dir: Path, reference: Path) -> None:
    rows, split, epoch, head = outcome(run_dir)
    expected_rows, expected_split, expected_epoch, expected_head = outcome(reference)
    assert rows == expected_rows
    assert split == expected_split
    assert epoch == expected_epoch
    assert head.keys() == expected_head.keys() and all(torch.equal(head[k], expected_head[k]) for k in head)


def epochs_written(run_dir: Path) -> int:
    return len(metric_rows(run_dir)) if (run_dir / "metrics.csv").is_file() else 0


def assert_intact(run_dir: Path, *, finished: bool) -> None:
    """Every file in the run folder is whole; after a kill only unrenamed temporary files may be extra."""
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(TEMPORARY_SUFFIX) or p.name == WRITE_PROBE]
    if finished:
        assert not leftovers, leftovers
    for path in run_dir.rglob("*"):
        if path in leftovers or path.is_dir():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            load_checkpoint(path)  # weights_only=True
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.name == "report.html":
            assert path.read_text().endswith("</html>\n")
        elif path.suffix == ".csv":
            with open(path, newline="") as handle:
                list(csv.reader(handle))
    epochs = [int(row["epoch"]) for row in metric_rows(run_dir)] if (run_dir / "metrics.csv").exists() else []
    assert epochs == list(range(1, len(epochs) + 1))  # every finished epoch once, in order
    if (run_dir / "last.pt").exists():
        # metrics.csv is written just before last.pt, so a kill between them leaves it one epoch ahead
        assert load_checkpoint(run_dir / "last.pt")["epoch"] in (len(epochs), len(epochs) - 1)
    if finished:
        assert load_checkpoint(run_dir / "last.pt")["epoch"] == len(epochs)
        assert (run_dir / "best.pt").is_file() and (run_dir / "report.html").is_file()


# --- resume, in process ---------------------------------------------------------------------------------

class Killed(BaseException):
    """Stands in for SIGKILL: no `except Exception` of the package can catch it, nothing after it runs."""


def killed_at_epoch(monkeypatch, epoch: int):
    """Kill the run while it writes last.pt of `epoch` (metrics.csv of that epoch already written), leaving
    the half-written temporary file a real kill would leave."""
    save = train_module.save_checkpoint

    def dying_save(path, checkpoint):
        if path.name == "last.pt" and checkpoint["epoch"] == epoch:
            (path.parent / f".last.pt.killed{TEMPORARY_SUFFIX}").write_bytes(b"half a checkpoint")
            raise Killed
        return save(path, checkpoint)

    monkeypatch.setattr(train_module, "save_checkpoint", dying_save)


@pytest.mark.parametrize("cache", [True, False], ids=["cached-features", "live-images"])
def test_resume_after_a_kill_ends_as_an_uninterrupted_run(tmp_path, data, tiny_backbone, monkeypatch, cache):
    reference = run(tmp_path, data, cache=cache, name="reference").run_dir
    with monkeypatch.context() as patch:
        killed_at_epoch(patch, 5)
        with pytest.raises(Killed):
            run(tmp_path, data, cache=cache, name="killed")
    run_dir = tmp_path / "runs" / "killed"
    assert epochs_written(run_dir) == 5 and load_checkpoint(run_dir / "last.pt")["epoch"] == 4
    assert not (run_dir / "best.pt").exists()
    result = train(data, resume=run_dir, progress=False)
    assert result.run_dir == run_dir and [row["epoch"] for row in result.history] == list(range(1, 9))
    assert_intact(run_dir, finished=True)  # the killed write's temporary file is gone too
    assert_same_outcome(run_dir, reference)


def test_resume_before_the_first_epoch_finished_starts_at_epoch_one(tmp_path, data, tiny_backbone, monkeypatch):
    reference = run(tmp_path, data, name="reference").run_dir
    with monkeypatch.context() as patch:
        killed_at_epoch(patch, 1)
        with pytest.raises(Killed):
            run(tmp_path, data, name="killed")
    run_dir = tmp_path / "runs" / "killed"
    assert not (run_dir / "last.pt").exists()
    train(data, resume=run_dir, progress=False)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["killed", "reference"]  # the same folder
    assert_intact(run_dir, finished=True)
    assert_same_outcome(run_dir, reference)


def files_of(run_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def test_resuming_a_finished_run_is_refused_and_changes_nothing(tmp_path, data, tiny_backbone):
    run_dir = run(tmp_path, data, name="done").run_dir
    before = files_of(run_dir)
    with pytest.raises(StopsignError, match="that run finished") as caught:
        train(data, resume=run_dir, progress=False)
    assert f"stopsign evaluate {run_dir} DATA" in str(caught.value) and "without --resume" in str(caught.value)
    assert files_of(run_dir) == before
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["done"]  # no other run begun in its place


def test_resume_refuses_what_is_not_a_run_folder(tmp_path, data, tiny_backbone):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", data, tmp_path / "nowhere"):
        with pytest.raises(StopsignError, match="not a run folder") as caught:
            train(data, resume=folder, progress=False)
        assert str(folder) in str(caught.value) and "without --resume" in str(caught.value)
    # A run stopped before data.json (during feature extraction) draws the same split again from its seed.
    run_dir = run(tmp_path, data, epochs=2).run_dir
    recorded = (run_dir / "data.json").read_text()
    for path in run_dir.iterdir():  # what such a run leaves: config.json alone
        if path.name != "config.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(data, resume=run_dir, progress=False)
    assert (run_dir / "data.json").read_text() == recorded


def test_a_crafted_last_checkpoint_is_refused_on_resume(tmp_path, data, tiny_backbone):
    run_dir = run(tmp_path, data, epochs=2).run_dir
    (run_dir / "summary.json").unlink()  # interrupted before its summary: a run that resumes from last.pt
    marker = tmp_path / "pwned"
    torch.save({"format": "stopsign-checkpoint", "payload": RunsCode(marker)}, run_dir / "last.pt")
    with pytest.raises(CheckpointError, match="refused"):
        train(data, resume=run_dir, progress=False)
    assert not marker.exists()


# --- full disk, unwritable folder ----------------------------------------------------------------------

def fill_disk(monkeypatch, after: int = 0) -> None:
    """From the (after+1)-th atomic write on, write half the bytes and fail as a full disk does."""
    real = tempfile.NamedTemporaryFile
    calls = []

    def temporary_file(*args, **kwargs):
        handle = real(*args, **kwargs)
        if kwargs.get("suffix") == TEMPORARY_SUFFIX:  # the run folder's writes, not the feature cache's
            calls.append(handle.name)
        if len(calls) > after and kwargs.get("suffix") == TEMPORARY_SUFFIX:
            def write(data):
                handle.file.write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle

    monkeypatch.setattr(files_module.tempfile, "NamedTemporaryFile", temporary_file)


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old and whole")
    with monkeypatch.context() as patch:
        fill_disk(patch)
        with pytest.raises(StopsignError, match="disk is full") as caught:
            files_module.write_json(target, {"accuracy": 1.0})
    assert str(target) in str(caught.value) and "--resume" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and target.read_text() == "old and whole"


def test_a_disk_filling_up_mid_run_stops_it_cleanly_and_resume_finishes(tmp_path, data, tiny_backbone, monkeypatch):
    reference = run(tmp_path, data, name="reference").run_dir
    with monkeypatch.context() as patch:
        fill_disk(patch, after=3 + 2 * 3)  # config.json, args.yaml, data.json, then metrics.csv and last.pt of 3 epochs
        with pytest.raises(StopsignError, match="disk is full") as caught:
            run(tmp_path, data, name="full")
    run_dir = tmp_path / "runs" / "full"
    assert str(run_dir / "metrics.csv") in str(caught.value)
    assert_intact(run_dir, finished=False)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert epochs_written(run_dir) == 3 and load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    train(data, resume=run_dir, progress=False)
    assert_same_outcome(run_dir, reference)


def test_an_unwritable_out_folder_fails_before_any_feature_is_computed(tmp_path, data, tiny_backbone, monkeypatch):
    (tmp_path / "file.txt").write_text("a file, not a folder")

    def no_features(*args, **kwargs):
        raise AssertionError("features were computed before the output folder was checked")

    monkeypatch.setattr(FeatureExtractor, "extract", no_features)
    for out in (tmp_path / "file.txt" / "runs", tmp_path / "file.txt"):
        with pytest.raises(StopsignError, match="cannot write the run folder") as caught:
            run(tmp_path, data, out=str(out), cache=True)
        assert str(out) in str(caught.value) and "--out" in str(caught.value)


# --- subprocesses: Ctrl-C and kill -9 ------------------------------------------------------------------

LAUNCHER = '''"""The stopsign CLI with the tests' tiny backbone registered, as conftest's tiny_backbone fixture does."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, {tests!r})
from conftest import register_tiny
from stopsign.training import fitting
from stopsign.cli import main

register_tiny(Path(sys.argv[1]))
delay = float(os.environ.get("EPOCH_DELAY", "0"))
if delay:  # slower epochs, so that a signal lands mid-training
    one_epoch = fitting.train_one_epoch

    def slow_epoch(*args):
        time.sleep(delay)
        return one_epoch(*args)

    fitting.train_one_epoch = slow_epoch
sys.exit(main(sys.argv[2:]))
'''


def write_launcher(folder: Path) -> Path:
    path = folder / "launch_stopsign.py"
    path.write_text(LAUNCHER.format(tests=str(TESTS)))
    return path


def tiny_weights() -> Path:
    return BACKBONES["tiny"].weights_file(None)


def train_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["-q", "train", str(data), "--recipe", "seed", "--backbone", "tiny", "--epochs", str(epochs), "--workers", "0",
            "--out", str(out), "--val-fraction", "0.25"]


def start(launcher: Path, weights: Path, args: list[str], *, epoch_delay: float = 0.0, stderr=None, env=None):
    env = (env or dict(os.environ)) | {"EPOCH_DELAY": str(epoch_delay)}
    return subprocess.Popen([sys.executable, str(launcher), str(weights), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr or subprocess.PIPE, text=True)


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_ctrl_c_stops_after_the_epoch_and_says_how_to_resume(tmp_path, data, tiny_backbone):
    run_dir = tmp_path / "runs" / "interrupted"
    process = start(write_launcher(tmp_path), tiny_weights(),
                    train_args(data, tmp_path / "runs", 30) + ["--name", "interrupted"], epoch_delay=0.1)
    wait_for(lambda: epochs_written(run_dir) >= 2, timeout=120)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"--resume {run_dir}" in stderr and "interrupted" in stderr
    finished = epochs_written(run_dir)
    assert 2 <= finished < 30 and load_checkpoint(run_dir / "last.pt")["epoch"] == finished
    assert not (run_dir / "best.pt").exists()
    assert_intact(run_dir, finished=False)
    train(data, resume=run_dir, progress=False)
    assert_intact(run_dir, finished=True)
    assert_same_outcome(run_dir, run(tmp_path, data, epochs=30, name="reference").run_dir)


def kill_point(rng: random.Random, before: int, epochs: int, timing: dict) -> tuple[str, int, float]:
    """Where the next kill lands: (phase, epochs to wait for, then seconds more), drawn from `rng`."""
    draw = rng.random()
    if before == epochs:  # killed in its report, before summary.json: start-up, then best.pt and the report again
        return "report again", 0, rng.uniform(0, timing["first_epoch_s"] + timing["report_s"])
    if draw < 0.2:  # start-up: imports, data checks, feature extraction
        return "start-up", 0, rng.uniform(0, timing["first_epoch_s"])
    if draw < 0.85 or before < epochs - 3:  # anywhere in an epoch, its metrics.csv and last.pt writes included
        return "epoch", min(epochs - 1, before + rng.randint(1, 2)), rng.uniform(0, timing["epoch_s"])
    return "report", epochs, rng.uniform(0, timing["report_s"])  # best.pt, summary, plots, report.html


def kill_and_resume(launcher: Path, weights: Path, data: Path, out: Path, *, cycles: int, seed: int, epochs: int,
                    timing: dict, epoch_delay: float) -> list[dict]:
    """Start `stopsign train` (or resume it), SIGKILL it at a seeded random point, check what it left;
    `cycles` times, then resume once more to the end. Once the run has finished (a kill that came too late),
    each resume must be refused instead. Returns one row per cycle."""
    rng = random.Random(seed)
    run_dir, log = out / "loop", []
    env = dict(os.environ) | {"STOPSIGN_CACHE": str(out / "cache")}  # a cold cache: kills land in extraction too
    for cycle in range(1, cycles + 2):
        final = cycle > cycles
        if (run_dir / "summary.json").is_file():  # whole: a resume is refused at once, so there is nothing to kill
            log.append({"cycle": "final" if final else cycle, "action": "resume", "kill": "-",
                        "ended": resume_finished(launcher, weights, data, run_dir, out / f"cycle-{cycle}.err", env),
                        "epochs_before": epochs, "epochs_after": epochs_written(run_dir)})
            continue
        began = (run_dir / "config.json").is_file() and (run_dir / "data.json").is_file()
        if run_dir.exists() and not began:
            shutil.rmtree(run_dir)  # killed before training began: nothing to resume, so start again
        args = ["-q", "train", str(data), "--resume", str(run_dir)] if began else \
            train_args(data, out, epochs) + ["--name", "loop"]
        before = epochs_written(run_dir) if (run_dir / "best.pt").is_file() else \
            (load_checkpoint(run_dir / "last.pt")["epoch"] if (run_dir / "last.pt").is_file() else 0)
        phase, wait_epochs, seconds = kill_point(rng, before, epochs, timing)
        errors = out / f"cycle-{cycle}.err"
        with open(errors, "w") as stderr:
            process = start(launcher, weights, args, epoch_delay=0.0 if final else epoch_delay, stderr=stderr,
                            env=env)
            if phase == "start-up":  # the delay, but never past this process's first epoch
                deadline = time.monotonic() + seconds
                wait_for(lambda: time.monotonic() > deadline or epochs_written(run_dir) > before
                         or process.poll() is not None, 600)
            elif not final:
                wait_for(lambda: epochs_written(run_dir) >= wait_epochs or process.poll() is not None, 600)
                time.sleep(seconds)
            try:
                process.wait(timeout=600 if final else 0)
                ended = f"exit {process.returncode}"
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                ended = "killed"
        assert ended in ("killed", "exit 0"), errors.read_text()
        if run_dir.exists():
            assert_intact(run_dir, finished=ended == "exit 0")
        log.append({"cycle": "final" if final else cycle, "action": "resume" if began else "start",
                    "kill": "-" if final else f"{phase} {wait_epochs} +{seconds:.2f} s", "ended": ended,
                    "epochs_before": before, "epochs_after": epochs_written(run_dir)})
    return log


def resume_finished(launcher: Path, weights: Path, data: Path, run_dir: Path, errors: Path, env: dict) -> str:
    """Resume a whole run in a subprocess: it must be refused, name the fixes and leave every file as it was."""
    before = files_of(run_dir)
    with open(errors, "w") as stderr:
        process = start(launcher, weights, ["-q", "train", str(data), "--resume", str(run_dir)], stderr=stderr, env=env)
        process.wait(timeout=600)
    message = errors.read_text()
    assert process.returncode == 2 and "that run finished" in message and "stopsign evaluate" in message, message
    assert files_of(run_dir) == before
    assert_intact(run_dir, finished=True)
    return "refused"


def reference_run(launcher: Path, weights: Path, data: Path, out: Path, epochs: int, epoch_delay: float) -> dict:
    """An uninterrupted run in a subprocess, timed: start-up to the first epoch, one epoch, the report."""
    began = time.monotonic()
    process = start(launcher, weights, train_args(data, out, epochs) + ["--name", "reference"],
                    epoch_delay=epoch_delay, env=dict(os.environ) | {"STOPSIGN_CACHE": str(out / "ref-cache")})
    seen = {}
    while process.poll() is None:
        seen.setdefault(epochs_written(out / "reference"), time.monotonic() - began)
        time.sleep(0.01)
    total = time.monotonic() - began
    assert process.returncode == 0, process.stderr.read()
    first, last = seen.get(1, total), seen.get(epochs, total)
    return {"run_dir": out / "reference", "first_epoch_s": first, "epoch_s": max(0.01, (last - first) / (epochs - 1)),
            "report_s": total - last, "total_s": total}


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_then_resume(tmp_path, make_images, tiny_backbone):
    """3 cycles here, seed 31's draws: killed in the cold start-up (extraction included), in an epoch, then in a
    resume's start-up. bench/kill_resume.py runs the same loop for 20 or more."""
    data = make_images(tmp_path / "data", {"stop": 20, "not_stop": 20}, layout="folders")
    launcher, out = write_launcher(tmp_path), tmp_path / "runs"
    reference = reference_run(launcher, tiny_weights(), data, out, epochs=30, epoch_delay=0.05)
    log = kill_and_resume(launcher, tiny_weights(), data, out, cycles=3, seed=31, epochs=30, timing=reference,
                          epoch_delay=0.05)
    assert [row["kill"].split()[0] for row in log[:3]] == ["start-up", "epoch", "start-up"], log
    assert sum(row["ended"] == "killed" for row in log) == 3, log  # not a loop of runs that simply finished
    assert log[-1]["ended"] in ("exit 0", "refused") and log[-1]["epochs_after"] == 30  # refused: it finished before
    assert_same_outcome(out / "loop", reference["run_dir"])


# --- bad image files through a whole run and a prediction ------------------------------------------------

def save_exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    make_image(74, (40, 20)).save(path, exif=exif)


BAD_FILES = {  # file name → what to write, and the reason it is skipped (None: it must be read)
    "cut.jpg": (lambda path: path.write_bytes(noisy_jpeg()[:600]), "truncated or corrupt image data"),
    "empty.jpg": (lambda path: path.write_bytes(b""), "empty file (0 bytes)"),
    "notes.jpg": (lambda path: path.write_text("shopping list: eggs, milk\n"), "not an image file"),
    "page.png": (lambda path: path.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>"),
                 "not an image file (it is an HTML or XML page)"),
    "bomb.png": (lambda path: path.write_bytes(png_claiming(50_000, 50_000)), "too large: 2500000000 pixels"),
    "locked.png": (lambda path: make_image(70).save(path), "permission denied"),  # see deny_reading
    "folder.jpg": (lambda path: path.mkdir(), "is a directory"),
    "loop.jpg": (lambda path: os.symlink(path, path), "symbolic link loop"),
    "gone.png": (lambda path: os.symlink(path.parent / "nothing.png", path), "broken link"),
    "dot.png": (lambda path: Image.new("RGB", (1, 1), (200, 0, 0)).save(path), None),
    "cmyk.jpg": (lambda path: Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path), None),
    "grey16.png": (lambda path: sixteen_bit_grey().save(path), None),
    "palette.png": (lambda path: palette_with_transparency().save(path), None),
    "blink.gif": (lambda path: make_image(71).save(path, save_all=True, duration=100, loop=0,
                                                   append_images=[make_image(72), make_image(73)]), None),
    "phone.jpg": (save_exif_rotated, None),
    "UPPER.JPG": (lambda path: make_image(75).save(path, format="JPEG"), None),
}


def deny_reading(monkeypatch, name: str) -> None:
    """Root reads files whatever their mode, so 'permission denied' is simulated where images.py opens files."""
    def guarded_open(file, *args, **kwargs):
        if Path(file).name == name:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", guarded_open, raising=False)


def write_bad_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (write, _) in BAD_FILES.items():
        write(folder / name)


@pytest.mark.parametrize("cache", [True, False], ids=["cached-features", "live-images"])
def test_a_run_over_every_kind_of_bad_file_completes_and_lists_them(tmp_path, make_images, tiny_backbone,
                                                                      monkeypatch, cache):
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders")
    write_bad_files(data / "stop")
    deny_reading(monkeypatch, "locked.png")
    result = run(tmp_path, data, epochs=3, cache=cache)
    record = json.loads((result.run_dir / "data.json").read_text())
    skipped = {Path(row["file"]).name: row["reason"] for row in record["skipped"]}
    used = {Path(row["file"]).name for row in record["split"]}
    for name, (_, reason) in BAD_FILES.items():
        if reason is None:
            assert name in used and name not in skipped
        else:
            assert reason in skipped.pop(name) and name not in used
    assert not skipped and record["counts"]["skipped"] == 9
    assert len(used) == 16 + 7 and (result.run_dir / "report.html").is_file()

    classifier = load_classifier(result.run_dir / "best.pt")
    by_name = {Path(row.path).name: row for row in classifier.predict([data / "stop"])}  # a folder ...
    assert set(by_name) == {name for name, (_, reason) in BAD_FILES.items()
                            if reason not in ("is a directory", "symbolic link loop", "broken link")} | \
        {f"stop-{i}.png" for i in range(8)}
    files = [data / "stop" / name for name in BAD_FILES if name != "folder.jpg"]
    by_name |= {Path(row.path).name: row for row in classifier.predict(files)}  # ... and files one by one
    for name, (_, reason) in BAD_FILES.items():
        if name == "folder.jpg":
            continue  # a folder given to predict is a folder of images: it holds none
        row = by_name[name]
        reason = "file not found" if name == "gone.png" else reason  # given by name, a dangling link is missing
        if reason is None:
            assert row.label in ("stop", "not_stop") and row.error is None, name
        else:
            assert row.label is None and reason.split(":")[0] in row.error, (name, row.error)


def test_unicode_and_spaces_in_names_train_and_predict(tmp_path, tiny_backbone):
    root = tmp_path / "données d'essai"
    (root / "images").mkdir(parents=True)
    names = {}
    for i in range(12):
        name = ["stop sign ", "знак ", "停止 ", "a,b;'\"$(x) "][i % 4] + f"{i}.png"
        label = ["stop", "not stop"][i % 2]
        make_image(i, tint=(200, 30, 30) if label == "stop" else (30, 160, 60)).save(root / "images" / name)
        names[name] = [{"label": label}]
    document = {"type": "classification", "labels": ["stop", "not stop"], "annotations": names}
    (root / "_annotations.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    result = run(tmp_path, root, epochs=2)
    assert {Path(row["file"]).name for row in json.loads((result.run_dir / "data.json").read_text())["split"]} \
        == set(names)
    rows = load_classifier(result.run_dir / "best.pt").predict([root / "images"])
    assert {Path(row.path).name for row in rows} == set(names) and all(row.label for row in rows)


# --- hostile annotations never open a file outside the data folder ---------------------------------------

_opened: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


class OpenedFiles:
    """Records every file this process opens (builtins.open, io.open, os.open, Pillow, numpy) while active,
    through an audit hook: no wrapper to miss."""

    hooked = False

    def __enter__(self) -> list[str]:
        global _opened
        if not OpenedFiles.hooked:
            sys.addaudithook(_record_opens)  # hooks cannot be removed; it records only inside `with`
            OpenedFiles.hooked = True
        _opened = []
        return _opened

    def __exit__(self, *exc) -> None:
        global _opened
        _opened = None


def opened_outside(opened: list[str], data: Path, sandbox: Path) -> list[str]:
    """Opened files inside `sandbox` (the test's folder), after following links, that are not inside `data`."""
    real = [Path(os.path.realpath(path)) for path in opened]
    return [str(path) for path in real
            if path.is_relative_to(sandbox.resolve()) and not path.is_relative_to(data.resolve())]


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the data folder holding a perfectly readable image that must never be opened."""
    folder = tmp_path / "outside"
    folder.mkdir()
    make_image(90).save(folder / "secret.png")
    return folder


def test_annotation_keys_escaping_the_folder_are_named_and_never_opened(tmp_path, make_images, outside):
    root = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="cvstudio")
    os.symlink(outside / "secret.png", root / "images" / "link.png")
    os.symlink(outside, root / "images" / "linked-folder")
    hostile = ["../outside/secret.png", "../../outside/secret.png", str(outside / "secret.png"), "link.png",
               "linked-folder/secret.png", "..\\outside\\secret.png", "C:\\secret.png", "/etc/passwd",
               "images/../../outside/secret.png"]
    document = json.loads((root / "_annotations.json").read_text())
    document["annotations"] |= {key: [{"label": "stop"}] for key in hostile}
    (root / "_annotations.json").write_text(json.dumps(document))
    with OpenedFiles() as opened, pytest.raises(DataError) as caught:
        load_data(root)
    for key in hostile:
        assert f"{key!r}: " in str(caught.value), key
    assert opened_outside(opened, root, tmp_path) == [] and str(root / "_annotations.json") in opened

    # A CSV is the user's own list: absolute and ../ names and links are followed (as ImageFolder does).
    names = ["../outside/secret.png", str(outside / "secret.png"), "link.png", "linked-folder/secret.png"]
    (root / "labels.csv").write_text("filename,label\n" + "".join(f"{key},{label}\n" for key, label in
                                                                  zip(names, ["stop", "not_stop"] * 2)))
    (root / "_annotations.json").unlink()
    data = load_data(root)
    assert len(data.samples) == 4 and all(s.path.resolve() == (outside / "secret.png").resolve() for s in data.samples)


def test_class_folders_follow_links_and_a_good_set_reads_only_its_own_files(
        tmp_path, make_images, outside, tiny_backbone):
    root = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    os.symlink(outside, root / "stolen")
    os.symlink(outside / "secret.png", root / "stop" / "secret.png")
    linked = load_data(root)  # the user's own folders: a linked class folder and a linked image are followed
    assert linked.class_names == ["not_stop", "stolen", "stop"]
    assert {s.path.name for s in linked.samples if linked.class_names[s.label] == "stop"} >= {"secret.png"}

    (root / "stolen").unlink()
    (root / "stop" / "secret.png").unlink()
    with OpenedFiles() as opened:
        data = load_data(root)
        features = FeatureExtractor("tiny", num_workers=0).extract([s.path for s in data.samples])
    assert len(features.paths) == 8 and opened_outside(opened, root, tmp_path) == []
    assert {Path(path).name for path in opened if Path(path).suffix == ".png"} == {s.path.name for s in data.samples}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("labels"), "'labels' must be a list of class names"),
        (lambda d: d.pop("annotations"), "'annotations' must be an object"),
        (lambda d: d.update(labels=["stop", 3]), "'labels' must be a list of class names"),
        (lambda d: d.update(labels={"stop": 1, "not_stop": 2}), "'labels' must be a list of class names"),
        (lambda d: d["annotations"].update({"stop-0.png": [{"name": "stop"}]}), "'stop-0.png': must be a list of"),
        (lambda d: d["annotations"].update({"stop-0.png": [{"label": 1}]}), "'stop-0.png': must be a list of"),
        (lambda d: d["annotations"].update({"stop-0.png": {"label": "stop"}}), "'stop-0.png': must be a list of"),
        (lambda d: d["annotations"].update({"stop-0.png": None}), "'stop-0.png': must be a list of"),
        (lambda d: d["annotations"].update({"x" * 300 + ".png": [{"label": "stop"}]}), "file not found"),
        (lambda d: d["annotations"].update({"nul\u0000.png": [{"label": "stop"}]}), r"'nul\\x00.png': file not found"),
        (lambda d: d.update(raw='{"labels": ["a", "b"], "annotations": {"a.png": ' + "[" * 100_000),
         "not (valid JSON|a usable JSON document)"),
        (lambda d: d.update(raw='{"version": ' + "9" * 5000 + "}"), "not a usable JSON document"),
        (lambda d: d.update(raw="\ufeff" + json.dumps(d)), "not valid JSON"),
        (lambda d: d.update(raw=b"\xff\xfe{}"), "cannot be read as UTF-8"),
    ],
)
def test_malformed_annotations_are_named(tmp_path, make_images, change, expected):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="cvstudio")
    document = json.loads((root / "_annotations.json").read_text())
    change(document)
    raw = document.pop("raw", None)
    if isinstance(raw, bytes):
        (root / "_annotations.json").write_bytes(raw)
    else:
        (root / "_annotations.json").write_text(raw if raw is not None else json.dumps(document), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_data(root)
    assert str(root / "_annotations.json") in str(caught.value)
    assert re.search(expected, str(caught.value)), str(caught.value)


def test_extra_keys_are_fine(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="cvstudio")
    document = json.loads((root / "_annotations.json").read_text())
    document |= {"project": {"name": "x"}, "created": 1}
    for entry in document["annotations"].values():
        entry[0] |= {"score": 0.9, "box": None}
    (root / "_annotations.json").write_text(json.dumps(document))
    assert len(load_data(root).samples) == 6


# --- checkpoints ------------------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_checkpoints_that_would_run_code_are_refused_before_running_it(tmp_path, writer):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"format": "stopsign-checkpoint", "head": RunsCode(marker)}
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's own protocol: no warning
    else:
        torch.save(payload, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(evil)
    assert not marker.exists()


def test_a_checkpoint_of_another_backbone_or_missing_keys_says_what_is_wrong(tmp_path, data, tiny_backbone):
    state = torch.load(run(tmp_path, data, epochs=1).run_dir / "best.pt", weights_only=True)
    cases = {
        "wide.pt": (state | {"feature_size": 512, "head": {"weight": torch.zeros(2, 512), "bias": torch.zeros(2)}},
                    "do not fit tiny"),  # a resnet18 head under a tiny label
        "other.pt": (state | {"backbone": "vit_huge"}, "unknown backbone 'vit_huge'"),
        "nokeys.pt": ({k: v for k, v in state.items() if k not in ("head", "preprocessing")},
                      "missing preprocessing, head"),
        "notours.pt": ({"state_dict": state["head"]}, "not a stopsign checkpoint"),
        "text.pt": ("not a checkpoint at all", "not a stopsign checkpoint"),
    }
    for name, (content, expected) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(StopsignError, match=expected):
            load_classifier(tmp_path / name)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "wide.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="not a stopsign checkpoint: a damaged or truncated torch.save file"):
        load_classifier(tmp_path / "cut.pt")


# --- property-based: any annotation document or CSV is a dataset or a DataError -------------------------

IMAGE_NAMES = ["stop-0.png", "stop-1.png", "not_stop-0.png", "not_stop-1.png"]
PNG = {name: make_image(i) for i, name in enumerate(IMAGE_NAMES)}


def data_folder(folder: Path, subfolder: str) -> Path:
    (folder / subfolder).mkdir(parents=True, exist_ok=True)
    for name, image in PNG.items():
        image.save(folder / subfolder / name)
    return folder


def loads_or_explains(path: Path) -> None:
    try:
        load_data(path)
    except DataError as error:
        assert str(error).strip()


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
file_names = st.sampled_from(IMAGE_NAMES + ["", ".", "..", "../stop-0.png", "/etc/passwd", "images/stop-0.png",
                                            "STOP-0.PNG", "stop-0.png ", "C:\\x.png"]) | st.text(max_size=20)
class_name = st.sampled_from(["stop", "not_stop", "", "yield"]) | st.text(max_size=6)
entries = st.lists(st.fixed_dictionaries({"label": class_name}) | json_values, max_size=3) | json_values
near_valid = st.fixed_dictionaries(
    {"labels": st.lists(class_name, max_size=4) | json_values,
     "annotations": st.dictionaries(file_names, entries, max_size=6) | json_values},
    optional={"type": st.sampled_from(["classification", "object-detection"]) | json_values,
              "version": json_values})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=json_values | near_valid)
def test_any_annotation_document_loads_or_raises_a_data_error(document):
    with tempfile.TemporaryDirectory() as folder:
        root = data_folder(Path(folder), "images")
        (root / "_annotations.json").write_text(json.dumps(document), encoding="utf-8")
        loads_or_explains(root)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200) | st.binary(max_size=100) | st.lists(
    st.tuples(file_names, class_name), max_size=6).map(
        lambda rows: "filename,label\n" + "".join(f"{name},{label}\n" for name, label in rows)))
def test_any_csv_loads_or_raises_a_data_error(text):
    with tempfile.TemporaryDirectory() as folder:
        root = data_folder(Path(folder), "images")
        path = root / "labels.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        loads_or_explains(path)
