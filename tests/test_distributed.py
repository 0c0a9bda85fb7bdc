"""torchrun (gloo, 2 processes on the CPU): train equals a single process, predict merges its rows in input order,
and a rank killed mid-pass leaves a store the rerun completes from, reusing what was committed."""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stopsign.cli import main
from stopsign.model.backbones import BACKBONES
from stopsign.model.devices import torch_threads
from stopsign.training.plan import Plan, owner

TESTS = Path(__file__).resolve().parent

LAUNCHER = '''"""stopsign's CLI with the tests' tiny backbone; counts the views each rank computes, and may kill one rank."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
from conftest import register_tiny
from stopsign import store
from stopsign.cli import main
from stopsign.model import features
import torch.distributed as dist

register_tiny(Path(sys.argv[1]))
rank, counts = os.environ.get("RANK", "0"), os.environ.get("COUNTS")
phase = ["share"]
compute, commit, destroy = features.FeatureExtractor._compute, store._Writer.commit, dist.destroy_process_group


def counted(self, *args, **kwargs):
    computed = compute(self, *args, **kwargs)
    if counts:
        with open(Path(counts) / f"rank{{rank}}-{{phase[0]}}", "a") as file:
            file.write(f"{{computed}}\\n")
    return computed


def destroy_after_the_shares():
    phase[0] = "train"  # the ranks' group closes once every share is written: rank 0 computes alone after it
    return destroy()


def dying_commit(self):
    dying_commit.calls += 1
    if dying_commit.calls == 3:  # rows written, not yet committed: a torn tail the rerun must not read
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self)


dying_commit.calls = 0
features.FeatureExtractor._compute, dist.destroy_process_group = counted, destroy_after_the_shares
if os.environ.get("KILL_RANK") == rank:
    store.COMMIT_ROWS, store._Writer.commit = 1, dying_commit
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture
def launcher(tmp_path) -> Path:
    path = tmp_path / "launch.py"
    path.write_text(LAUNCHER.format(tests=str(TESTS)))
    return path


def stopsign(launcher: Path, weights: Path, args: list[str], *, processes: int = 1, cache: Path, **env):
    """The CLI in a subprocess, under torchrun with `processes` > 1; one thread each."""
    command = [sys.executable, str(launcher), str(weights), *args]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    environment = dict(os.environ) | {"STOPSIGN_CACHE": str(cache), "OMP_NUM_THREADS": "1"} | env
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def in_this_process(args: list[str]) -> int:
    """The CLI as one process, here: one thread, as each rank runs, and the tiny_backbone fixture's own cache."""
    with torch_threads(1):
        return main(args)


def computed(counts: Path, name: str) -> int:
    path = counts / name
    return sum(int(line) for line in path.read_text().split()) if path.exists() else 0


def metrics_without_time(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


@pytest.mark.slow
def test_two_ranks_train_as_one_process_and_a_killed_rank_is_resumed_from_the_store(
        tmp_path, launcher, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, layout="folders")
    (data / "stop" / "broken.png").write_bytes(b"not an image")  # reported once, by rank 0's train()
    args = ["-q", "train", str(data), "--backbone", "tiny", "--workers", "0", "--out", str(tmp_path / "runs")]
    assert in_this_process(args + ["--name", "one"]) == 0
    counts = tmp_path / "counts"
    counts.mkdir()
    double = stopsign(launcher, BACKBONES["tiny"].weights_file(None), args + ["--name", "two"], processes=2, cache=tmp_path / "cache2",
                      COUNTS=str(counts))
    assert double.returncode == 0, double.stderr
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # rank 1 wrote no run folder
    assert metrics_without_time(runs / "two") == metrics_without_time(runs / "one")
    assert (runs / "two" / "report.html").is_file() and (runs / "two" / "summary.json").is_file()
    shares = computed(counts, "rank0-share"), computed(counts, "rank1-share")
    assert min(shares) > 0 and computed(counts, "rank0-train") == 0  # split between ranks; rank 0 trained on them
    assert double.stdout.count("report ") == 1  # one rank printed the result

    killed = stopsign(launcher, BACKBONES["tiny"].weights_file(None), args + ["--name", "killed"], processes=2, cache=tmp_path / "cache3",
                      KILL_RANK="1")
    assert killed.returncode != 0
    recounts = tmp_path / "recounts"
    recounts.mkdir()
    rerun = stopsign(launcher, BACKBONES["tiny"].weights_file(None), args + ["--name", "rerun"], processes=2, cache=tmp_path / "cache3",
                     COUNTS=str(recounts))
    assert rerun.returncode == 0, rerun.stderr
    assert metrics_without_time(runs / "rerun") == metrics_without_time(runs / "one")
    assert computed(recounts, "rank1-share") < shares[1]  # its two committed batches were reused
    assert computed(recounts, "rank0-share") + computed(recounts, "rank1-share") < sum(shares)


@pytest.mark.slow
def test_predict_under_torchrun_prints_one_merged_table_in_input_order(tmp_path, launcher, tiny_checkpoint):
    checkpoint, data = tiny_checkpoint
    images = sorted(data.glob("*/*.png"), key=lambda p: p.name[::-1])  # an order of neither name nor digest
    broken = data / "broken.png"
    broken.write_bytes(b"")
    inputs = [str(p) for p in images[:5]] + [str(broken)] + [str(p) for p in images[5:]]
    args = ["-q", "predict", str(checkpoint), *inputs, "--format", "csv"]
    single = stopsign(launcher, BACKBONES["tiny"].weights_file(None), args, cache=tmp_path / "cache")
    double = stopsign(launcher, BACKBONES["tiny"].weights_file(None), args, processes=2, cache=tmp_path / "cache")
    assert single.returncode == double.returncode == 1  # one file could not be read
    rows = list(csv.reader(io.StringIO(double.stdout)))
    assert [row[0] for row in rows[1:]] == inputs and double.stdout == single.stdout


def test_each_image_has_one_rank_by_content_and_the_requests_are_what_train_extracts(tmp_path, make_images):
    data = make_images(tmp_path / "data", {"a": 20, "b": 20}, layout="folders")
    paths = sorted(data.glob("*/*.png"))
    ranks = [owner(p, 3) for p in paths]
    assert set(ranks) == {0, 1, 2}
    renamed = paths[0].rename(paths[0].with_name("renamed.png"))
    assert owner(renamed, 3) == ranks[0]  # by content: a rename keeps its rank
    from stopsign.config import Settings
    from stopsign.data.datasets import Sample, load_data

    listing = load_data(data)
    train, val = [Sample(p, 0) for p in paths[:30]], [Sample(p, 1) for p in paths[30:]]
    requests = Plan(listing, Settings().replace(views=2), train, val, {}).requests()
    assert [(len(r.paths), r.views, r.tiles) for r in requests.values()] == [
        (30, [1, 2], 3), (10, [0], 3), (30, [0], 1), (10, [0], 1), (0, [0], 3), (0, [0], 1)]
    folds = Plan(listing, Settings().replace(folds=3, augment=False), train, [], {}).requests()
    assert [(len(r.paths), r.views, r.tiles) for r in folds.values()][:2] == [(30, [0], 3), (30, [0], 3)]


def trials_without_time(folder: Path) -> list[dict]:
    with open(folder / "trials.csv") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


@pytest.mark.slow
def test_tune_under_torchrun_scores_the_trials_a_single_process_scores(tmp_path, launcher, make_images,
                                                                       tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 10, "not_stop": 10}, layout="folders")
    weights = BACKBONES["tiny"].weights_file(None)
    args = ["-q", "tune", str(data), "--backbone", "tiny", "--trials", "2", "--folds", "2", "--no-final",
            "--workers", "0", "--out", str(tmp_path / "studies")]
    assert in_this_process(args + ["--name", "one"]) == 0
    counts = tmp_path / "counts"
    counts.mkdir()
    double = stopsign(launcher, weights, args + ["--name", "two"], processes=2, cache=tmp_path / "cache2",
                      COUNTS=str(counts))
    assert double.returncode == 0, double.stderr
    studies = tmp_path / "studies"
    assert sorted(p.name for p in studies.iterdir()) == ["one", "two"]
    assert trials_without_time(studies / "two") == trials_without_time(studies / "one")
    assert len(trials_without_time(studies / "one")) == 2
    assert computed(counts, "rank0-share") > 0 and computed(counts, "rank1-share") > 0
    assert computed(counts, "rank0-train") == 0  # the ranks computed every view the study reads
