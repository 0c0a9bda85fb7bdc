"""Data, runs and models at s3:// URLs, against a real S3 server (moto's, tests/s3server.py) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs", reason="the cloud extra is not installed: pip install 'stopsign[cloud]'")
pytest.importorskip("moto.server", reason="the S3 test server is not installed: pip install 'moto[server]'")

from stopsign import storage  # noqa: E402
from stopsign.cache import cache_info  # noqa: E402
from stopsign.cli import main  # noqa: E402
from stopsign.storage import is_url, set_storage_options  # noqa: E402

from conftest import write_images  # noqa: E402
from s3server import KEYS  # noqa: E402
from test_faults import assert_same_outcome  # noqa: E402

SERVER = Path(__file__).with_name("s3server.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """moto's server in its own process; its objects survive kill() and start() (tests/s3server.py)."""

    def __init__(self, state: Path, port: int | None = None):
        self.state, self.port = state, port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, stall: str | None = None) -> S3Server:
        env = dict(os.environ) | ({"S3_STALL_SUFFIX": stall} if stall else {})
        env.pop("S3_STALL_SUFFIX", None) if not stall else None
        self.process = subprocess.Popen([sys.executable, str(SERVER), str(self.port), str(self.state)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.process.poll() is None, "the S3 server exited"
                assert time.monotonic() < deadline, "the S3 server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def requests(self) -> list[str]:
        log = self.state / "requests.log"
        return log.read_text().splitlines() if log.is_file() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.kill()


def client_env(monkeypatch, endpoint: str, user: str = "admin") -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS[user]["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS[user]["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups offline
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "STOPSIGN_STORAGE_OPTIONS"):
        monkeypatch.delenv(name, raising=False)
    set_storage_options([])


@pytest.fixture
def s3(server, monkeypatch, request):
    """A client of the module's server, with a bucket of this test's own; yields (fs, bucket)."""
    import s3fs

    client_env(monkeypatch, server.endpoint)
    monkeypatch.setattr(storage, "BACKOFF", 0.05)
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
    bucket = "t-" + request.node.name.replace("_", "-")[:40].strip("-").lower()
    fs.mkdir(bucket)
    return fs, bucket


def upload_tree(fs, local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.relative_to(local).as_posix()}")


def tiny_args(*extra: str) -> list[str]:
    return ["--backbone", "tiny", "--recipe", "seed", "--epochs", "3", "--workers", "0", "--val-fraction", "0.25",
            *extra]


def object_gets(lines: list[str], bucket: str) -> list[str]:
    """GET requests of objects of `bucket` (listings, which carry a query, are not downloads)."""
    return [line for line in lines if line.startswith(f"GET /{bucket}/") and "?" not in line.split()[1]]


def test_urls_are_told_from_local_paths():
    assert is_url("s3://bucket/x") and is_url("zip::https://host/export.zip") and is_url("gs://b")
    assert not is_url("runs/x") and not is_url("/tmp/s3:/x") and not is_url("file:///tmp/x") and not is_url(None)


def test_storage_options_from_flags_and_environment(monkeypatch):
    monkeypatch.setenv("STOPSIGN_STORAGE_OPTIONS", '{"endpoint_url": "https://env", "anon": false}')
    set_storage_options(["endpoint_url=https://flag", "client_kwargs.region_name=us-south", "use_ssl=true"])
    options = storage.storage_options("s3")
    assert options["endpoint_url"] == "https://flag" and options["anon"] is False and options["use_ssl"] is True
    assert options["client_kwargs"] == {"region_name": "us-south"}
    assert options["config_kwargs"]["connect_timeout"] == 5  # the default that keeps a dead endpoint short
    set_storage_options([])
    with pytest.raises(storage.StorageError, match="key=value"):
        set_storage_options(["no-equals-sign"])
    monkeypatch.setenv("STOPSIGN_STORAGE_OPTIONS", "{not json")
    with pytest.raises(storage.StorageError, match="STOPSIGN_STORAGE_OPTIONS"):
        storage.storage_options("s3")


def test_train_from_a_bucket_export_to_a_bucket_run_then_again_downloading_nothing(
        tmp_path, s3, server, tiny_backbone, capsys):
    fs, bucket = s3
    data = write_images(tmp_path / "export", {"stop": 8, "not_stop": 8}, layout="cvstudio")
    upload_tree(fs, data, f"s3://{bucket}/exports/signs")
    before = len(server.requests())
    assert main(["train", f"s3://{bucket}/exports/signs/", "--out", f"s3://{bucket}/runs", "--name", "first",
                 *tiny_args()]) == 0
    out = capsys.readouterr()
    assert f"report s3://{bucket}/runs/first/report.html" in out.out
    first = server.requests()[before:]
    assert len(object_gets(first, bucket)) == 17  # 16 images and the annotations, each fetched once
    run = f"{bucket}/runs/first"
    names = {Path(p).name for p in fs.find(run)}
    assert {"config.json", "data.json", "metrics.csv", "last.pt", "best.pt", "report.html", "summary.json",
            "predictions.csv"} <= names
    puts = [line.split()[1] for line in first if line.startswith("PUT ") and "/runs/first/" in line]
    assert puts[-1].endswith("/summary.json")  # last: a reader who finds it knows the run is whole
    record = json.loads(fs.cat(f"{run}/config.json"))
    assert record["data"] == f"s3://{bucket}/exports/signs/" and record["out"] == f"s3://{bucket}/runs"
    assert len(fs.cat(f"{run}/metrics.csv").decode().splitlines()) == 4  # header and 3 epochs

    before, features = len(server.requests()), cache_info()["entries"]
    assert main(["-q", "train", f"s3://{bucket}/exports/signs/", "--out", f"s3://{bucket}/runs", "--name", "second",
                 *tiny_args()]) == 0
    second = server.requests()[before:]
    assert object_gets(second, bucket) == []  # listed once, every file's ETag known: nothing downloaded
    assert cache_info()["entries"] == features > 0  # and the same files: every feature came from the cache
    assert sum(line.startswith(f"GET /{bucket}?") or line.startswith(f"GET /{bucket}/?") for line in second) >= 1
    assert fs.cat(f"{bucket}/runs/second/metrics.csv").decode().splitlines()[1:] != []
    capsys.readouterr()

    # a name taken in the bucket (not on this machine) is not reused
    (storage.mirror_dir(f"s3://{bucket}/runs", storage.UPLOADS) / "first").rename(tmp_path / "moved")
    assert main(["-q", "train", f"s3://{bucket}/exports/signs/", "--out", f"s3://{bucket}/runs", "--name", "first",
                 *tiny_args()]) == 0
    assert f"report s3://{bucket}/runs/first-2/report.html" in capsys.readouterr().out


def test_a_changed_object_is_fetched_again_and_a_deleted_one_leaves_the_mirror(tmp_path, s3):
    fs, bucket = s3
    for name in ("a.txt", "sub/b.txt"):
        fs.pipe_file(f"{bucket}/p/{name}", b"one")
    local = storage.fetch(f"s3://{bucket}/p/")
    assert (local / "a.txt").read_bytes() == b"one" and (local / "sub/b.txt").read_bytes() == b"one"
    fs.pipe_file(f"{bucket}/p/a.txt", b"two!")
    fs.rm_file(f"{bucket}/p/sub/b.txt")
    local = storage.fetch(f"s3://{bucket}/p/")
    assert (local / "a.txt").read_bytes() == b"two!" and not (local / "sub/b.txt").exists()
    assert not (local / "sub").exists()  # an emptied class folder would be read as a class with no images


def test_a_prefix_of_many_keys_is_one_paginated_listing_and_fetched_concurrently(s3, server):
    fs, bucket = s3
    fs.pipe({f"{bucket}/many/{i:05d}.txt": str(i).encode() for i in range(1100)})
    before = len(server.requests())
    local = storage.fetch(f"s3://{bucket}/many")
    assert sorted(p.name for p in local.iterdir()) == [f"{i:05d}.txt" for i in range(1100)]
    assert (local / "01099.txt").read_text() == "1099"
    requests = server.requests()[before:]
    listings = [line for line in requests if line.startswith(f"GET /{bucket}") and "list-type=2" in line]
    assert len(listings) == 2  # 1,000 keys a page
    assert len(object_gets(requests, bucket)) == 1100 and not any(line.startswith("HEAD") for line in requests)


def test_the_endpoint_and_keys_from_storage_options_instead_of_the_aws_variables(tmp_path, s3, server, monkeypatch,
                                                                                  capsys, tiny_checkpoint):
    fs, bucket = s3
    checkpoint, data = tiny_checkpoint
    fs.put_file(str(data / "stop" / "stop-0.png"), f"{bucket}/in/a.png")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("STOPSIGN_STORAGE_OPTIONS", json.dumps({"key": KEYS["admin"]["key"]}))
    predict = ["-q", "predict", str(checkpoint), f"s3://{bucket}/in/", "--format", "json"]
    assert main([*predict, f"--storage-option=endpoint_url={server.endpoint}"]) == 2  # no secret yet
    assert "incomplete credentials" in capsys.readouterr().err
    assert main([*predict, f"--storage-option=endpoint_url={server.endpoint}",
                 "--storage-option", f"secret={KEYS['admin']['secret']}"]) == 0
    assert [row["path"] for row in json.loads(capsys.readouterr().out)] == [f"s3://{bucket}/in/a.png"]


def test_a_zip_archive_at_a_url_is_unpacked_and_read_as_its_folder(tmp_path):
    import fsspec

    data = write_images(tmp_path / "export", {"stop": 3, "not_stop": 3}, layout="cvstudio")
    archive = shutil.make_archive(str(tmp_path / "export"), "zip", root_dir=tmp_path, base_dir="export")
    fsspec.filesystem("memory").pipe_file("/shared/export.zip", Path(archive).read_bytes())
    from stopsign.data.datasets import load_data

    loaded = load_data("memory://shared/export.zip")
    assert loaded.layout == "cvstudio" and len(loaded.samples) == 6
    assert sorted(p.name for p in loaded.root.iterdir()) == sorted(p.name for p in data.iterdir())


def test_predict_evaluate_export_and_serve_from_bucket_models(tmp_path, s3, server, tiny_backbone, capsys):
    fs, bucket = s3
    data = write_images(tmp_path / "export", {"stop": 8, "not_stop": 8}, layout="folders")
    upload_tree(fs, data, f"s3://{bucket}/labelled")
    assert main(["-q", "train", f"s3://{bucket}/labelled", "--out", f"s3://{bucket}/runs", "--name", "r",
                 *tiny_args()]) == 0
    capsys.readouterr()
    model = f"s3://{bucket}/runs/r/best.pt"

    assert main(["-q", "predict", model, f"s3://{bucket}/labelled/stop/", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["path"] for row in rows] == [f"s3://{bucket}/labelled/stop/stop-{i}.png" for i in range(8)]
    assert main(["-q", "predict", str(storage.fetch_model(model)), str(data / "stop"), "--format", "json"]) == 0
    local_rows = json.loads(capsys.readouterr().out)  # the same model on the same photos, from local disk
    assert [row["probabilities"] for row in rows] == [row["probabilities"] for row in local_rows]

    before = len(server.requests())
    assert main(["-q", "predict", f"s3://{bucket}/runs/r", str(data / "not_stop" / "not_stop-0.png")]) == 0  # a run folder
    assert "not_stop" in capsys.readouterr().out
    assert not any("best.pt" in line for line in object_gets(server.requests()[before:], bucket))  # ETag unchanged

    assert main(["-q", "evaluate", model, f"s3://{bucket}/labelled", "--out", f"s3://{bucket}/evals", "--name", "e"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accuracy ") and f"report s3://{bucket}/evals/e/report.html" in out
    assert json.loads(fs.cat(f"{bucket}/evals/e/metrics.json"))["n"] == 16

    assert main(["-q", "info", model]) == 0
    assert "tiny" in capsys.readouterr().out

    assert main(["-q", "export", model, "--out", f"s3://{bucket}/models/stop.onnx"]) == 0
    assert f"exported s3://{bucket}/models/stop.onnx" in capsys.readouterr().out
    from fastapi.testclient import TestClient

    from stopsign.deploy.serve import create_app

    with TestClient(create_app(f"s3://{bucket}/models/stop.onnx")) as client:
        assert client.get("/health").json()["status"] == "ok"
        answer = client.post("/predict", files={"file": ("x.png", (data / "stop/stop-1.png").read_bytes())})
        assert answer.status_code == 200 and answer.json()["label"] in ("stop", "not_stop")


def error_of(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_each_storage_failure_is_one_line_naming_the_url_and_the_fix(tmp_path, s3, server, tiny_backbone, capsys,
                                                                    monkeypatch):
    fs, bucket = s3
    data = write_images(tmp_path / "export", {"stop": 4, "not_stop": 4}, layout="folders")
    upload_tree(fs, data, f"s3://{bucket}/d")
    cache = Path(os.environ["STOPSIGN_CACHE"])
    train = ["train", f"s3://{bucket}/d", "--out", f"s3://{bucket}/runs", *tiny_args()]

    err = error_of(["train", f"s3://{bucket}/no-such-prefix/", *tiny_args("--out", str(tmp_path / "runs"))], capsys)
    assert f"s3://{bucket}/no-such-prefix/" in err and "check the URL" in err
    err = error_of(["train", "s3://no-such-bucket-anywhere/d", *tiny_args("--out", str(tmp_path / "runs"))], capsys)
    assert "s3://no-such-bucket-anywhere/d" in err and "check the URL" in err
    err = error_of(["predict", f"s3://{bucket}/runs/none/best.pt", str(data / "stop/stop-0.png")], capsys)
    assert f"s3://{bucket}/runs/none/best.pt:" in err and "check the URL" in err and "best.pt/best.pt" not in err
    err = error_of(["serve", f"s3://{bucket}/models/none.onnx"], capsys)  # a model file, not a run folder
    assert f"s3://{bucket}/models/none.onnx:" in err and "check the URL" in err and "/best.pt" not in err

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    err = error_of(train, capsys)
    assert f"s3://{bucket}/runs" in err and "credentials were refused" in err and "AWS_SECRET_ACCESS_KEY" in err

    client_env(monkeypatch, server.endpoint, user="reader")  # may read the data, not write the run
    err = error_of(train, capsys)
    assert f"s3://{bucket}/runs" in err and "access denied" in err and "write (--out) access" in err
    err = error_of(["train", "--resume", f"s3://{bucket}/runs/any"], capsys)  # checked before anything is fetched
    assert f"s3://{bucket}/runs/any" in err and "access denied" in err

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    err = error_of(train, capsys)
    assert "no credentials" in err and "HMAC" in err

    client_env(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    err = error_of(train, capsys)
    assert f"s3://{bucket}/runs" in err and "cannot reach the storage endpoint" in err and "endpoint_url" in err
    assert time.monotonic() - started < 60
    assert not list((cache / "features").rglob("*.npy")) if (cache / "features").exists() else True  # nothing trained


def stalled_upload(state: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (state / "stalled").is_file():
        assert time.monotonic() < deadline, "the upload never reached the server"
        time.sleep(0.02)
    (state / "stalled").unlink()


@pytest.mark.slow
def test_server_killed_mid_upload_then_restarted_leaves_no_partial_object_and_the_run_resumes(
        tmp_path, tiny_backbone, monkeypatch, capsys):
    server = S3Server(tmp_path / "s3").start()
    try:
        import s3fs

        client_env(monkeypatch, server.endpoint)
        monkeypatch.setattr(storage, "BACKOFF", 0.05)  # the retries give up in well under a second
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir("killed")
        data = write_images(tmp_path / "export", {"stop": 8, "not_stop": 8}, layout="folders")
        upload_tree(fs, data, "s3://killed/d")
        args = ["-q", "train", "s3://killed/d", "--out", "s3://killed/runs", *tiny_args("--epochs", "4")]
        assert main([*args, "--name", "reference"]) == 0

        server.kill()
        server.start(stall="/runs/cut/best.pt")  # best.pt's upload reaches the server, which is then killed
        killer = threading.Thread(target=lambda: (stalled_upload(server.state), server.kill()))
        killer.start()
        assert main([*args, "--name", "cut"]) == 2
        killer.join()
        err = capsys.readouterr().err
        assert "s3://killed/runs/cut/best.pt" in err and "--resume s3://killed/runs/cut" in err and "Nothing is lost" in err
        assert f"after {storage.RETRIES + 1} attempts" in err  # retried with backoff before giving up

        server.start()
        listed = {Path(p).name for p in fs.find("killed/runs/cut")}
        assert "best.pt" not in listed and "summary.json" not in listed  # no partial object, no false "whole"
        assert {"config.json", "metrics.csv", "last.pt"} <= listed  # every finished epoch is in the bucket
        assert main(["-q", "train", "--resume", "s3://killed/runs/cut"]) == 0
        local = tmp_path / "downloaded"
        for name in ("reference", "cut"):
            fs.get(f"killed/runs/{name}/", str(local / name), recursive=True)
        assert_same_outcome(local / "cut", local / "reference")
        assert json.loads((local / "cut/summary.json").read_text())["best_epoch"] == \
            json.loads((local / "reference/summary.json").read_text())["best_epoch"]

        # now whole, so resuming it is refused, with the bucket's summary.json as the proof
        capsys.readouterr()
        assert main(["-q", "train", "--resume", "s3://killed/runs/cut"]) == 2
        assert "cannot resume s3://killed/runs/cut: that run finished" in capsys.readouterr().err

        # another machine: no local copy of a run cut again before best.pt, so all it resumes from is the bucket's
        storage_copy = storage.mirror_dir("s3://killed/runs", storage.UPLOADS) / "cut"
        storage_copy.rename(tmp_path / "gone")
        fs.rm(["killed/runs/cut/summary.json", "killed/runs/cut/best.pt"])
        assert main(["-q", "train", "--resume", "s3://killed/runs/cut"]) == 0
        fs.get("killed/runs/cut/", str(local / "again"), recursive=True)
        assert_same_outcome(local / "again", local / "reference")
    finally:
        if server.process.poll() is None:
            server.kill()


def test_a_short_outage_during_an_upload_is_retried_and_the_run_completes(tmp_path, tiny_backbone, monkeypatch, capsys):
    server = S3Server(tmp_path / "s3").start()
    try:
        import s3fs

        client_env(monkeypatch, server.endpoint)
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir("outage")
        data = write_images(tmp_path / "export", {"stop": 6, "not_stop": 6}, layout="folders")
        upload_tree(fs, data, "s3://outage/d")
        server.kill()
        server.start(stall="/runs/r/best.pt")

        def outage():
            stalled_upload(server.state)
            server.kill()
            server.start()  # back within the retries' backoff (0.5 s, 1 s, 2 s, 4 s)

        restarter = threading.Thread(target=outage)
        restarter.start()
        assert main(["-q", "train", "s3://outage/d", "--out", "s3://outage/runs", "--name", "r", *tiny_args()]) == 0
        restarter.join()
        # the PUT cut by the kill was never answered; its retry, after the restart, was
        assert [line for line in server.requests() if "/runs/r/best.pt" in line] == ["PUT /outage/runs/r/best.pt 200"]
        assert fs.exists("outage/runs/r/summary.json") and fs.exists("outage/runs/r/best.pt")
        torch.load(fs.open("outage/runs/r/best.pt"), weights_only=True)  # whole
    finally:
        if server.process.poll() is None:
            server.kill()


@pytest.mark.parametrize("key", ["../../../../../../../../escaped.txt", "/escaped.txt", "sub/../../escaped.txt"])
def test_an_object_key_that_would_leave_the_local_copy_is_refused(tmp_path, key):
    import fsspec

    memory = fsspec.filesystem("memory")
    prefix = f"/hostile-{tmp_path.name}"
    memory.pipe_file(f"{prefix}/ok.txt", b"ok")
    memory.pipe_file(f"{prefix}/{key}", b"evil")  # S3 keys may hold any bytes, "../" and a leading "/" too
    with pytest.raises(storage.StorageError, match="outside"):
        storage.fetch(f"memory:/{prefix}/")
    with pytest.raises(storage.StorageError, match="outside"):
        storage.download_folder(f"memory:/{prefix}", tmp_path / "run")  # --resume URL on another machine
    cache = Path(os.environ["STOPSIGN_CACHE"])
    assert not Path("/escaped.txt").exists() and not [*cache.rglob("escaped.txt"), *tmp_path.rglob("escaped.txt")]
    memory.rm(prefix, recursive=True)


def test_a_malformed_storage_option_is_one_line_and_exit_2(tmp_path, capsys):
    photo = tmp_path / "a.png"
    photo.write_bytes(b"")
    assert main(["predict", str(tmp_path / "model.pt"), str(photo), "--storage-option", "no-equals-sign"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--storage-option 'no-equals-sign': expected key=value" in err


def test_a_file_fetched_by_a_failed_fetch_and_since_deleted_leaves_the_mirror(tmp_path, monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    memory = fsspec.filesystem("memory")
    prefix = f"/interrupted-{tmp_path.name}"
    for name in ("a.txt", "b.txt", "c.txt"):
        memory.pipe_file(f"{prefix}/{name}", name.encode())
    get_file = MemoryFileSystem.get_file

    def dropped(self, source, target, *args, **kwargs):
        if source.endswith("b.txt"):
            raise ConnectionResetError("the network dropped")
        return get_file(self, source, target, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", dropped)
    with pytest.raises(storage.StorageError, match="b.txt"):
        storage.fetch(f"memory:/{prefix}/")  # a.txt and c.txt arrive, b.txt does not
    monkeypatch.setattr(MemoryFileSystem, "get_file", get_file)
    memory.rm_file(f"{prefix}/c.txt")  # then c.txt is taken out of the data set
    local = storage.fetch(f"memory:/{prefix}/")
    assert sorted(p.name for p in local.iterdir()) == ["a.txt", "b.txt"]  # the mirror is what the bucket holds
    memory.rm(prefix, recursive=True)


def test_cache_clear_keeps_the_local_copy_of_a_run_whose_upload_did_not_finish(tmp_path, monkeypatch):
    from stopsign.cache import clear_cache

    out = f"memory://runs-{tmp_path.name}"
    local = storage.mirror_dir(out, storage.UPLOADS)
    for name in ("sent", "cut"):
        (local / name).mkdir(parents=True)
        (local / name / "metrics.csv").write_text("epoch\n1\n")
        (local / name / "summary.json").write_text("{}")
    storage.RunUpload(local / "sent", storage.join(out, "sent")).finish()

    def refused(path, url):
        raise storage.StorageError(f"{url}: cannot reach the storage endpoint")

    monkeypatch.setattr(storage, "upload_file", refused)
    with pytest.raises(storage.StorageError, match="Nothing is lost"):
        storage.RunUpload(local / "cut", storage.join(out, "cut")).finish()
    clear_cache()
    assert not (local / "sent").exists()  # in the bucket: a cache like any other
    assert (local / "cut" / "metrics.csv").read_text() == "epoch\n1\n"  # its only copy: kept, as the error promised


@pytest.mark.parametrize("command", [["predict", "s3://bucket/models/stop.pt", "photo.jpg"],
                                     ["train", "s3://bucket/exports/signs/"],
                                     ["serve", "s3://bucket/models/stop.onnx", "--port", "PORT"]])
def test_without_s3fs_an_s3_url_is_one_line_naming_the_install(command, monkeypatch, capsys):
    import importlib

    command = [str(free_port()) if word == "PORT" else word for word in command]
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the cloud extra were not installed
    registry = importlib.import_module("fsspec.registry")._registry  # forget the s3 class fsspec has imported
    for protocol in ("s3", "s3a"):
        monkeypatch.delitem(registry, protocol, raising=False)
    monkeypatch.setattr(storage, "_filesystems", {})
    assert main(command) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {command[1]}: s3:// URLs need s3fs: pip install 'stopsign[cloud]'\n"
