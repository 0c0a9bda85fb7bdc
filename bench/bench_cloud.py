"""Training from an S3 bucket against training from local disk, and the concurrent fetch against one at a time.

    .venv/bin/python bench/bench_cloud.py [--data ../shared/data/cvstudio-stop-signs] [--recipe seed]

Starts the test S3 server (moto's, tests/s3server.py) on 127.0.0.1, uploads the export, then trains four times,
each in a cache folder of its own for the cold runs: from local disk cold and warm, from the bucket (run written to
the bucket too) cold and warm. A cold run from the bucket downloads every photo and computes every feature; a warm
one lists the prefix, downloads nothing and reads the cached features. Then the prefix is fetched into an empty
mirror with FETCH_WORKERS threads and with one. The server runs on this machine, so a request costs about a
millisecond: against a real endpoint (tens of ms a request) the concurrent pool gains more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_storage import S3Server  # noqa: E402  (the tests' server: moto in its own process)
from s3server import KEYS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cvstudio-stop-signs"))
    parser.add_argument("--recipe", choices=["stopsign", "seed"], default="stopsign")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cloud-"))
    server = S3Server(work / "s3").start()
    os.environ.update({"AWS_ACCESS_KEY_ID": KEYS["admin"]["key"], "AWS_SECRET_ACCESS_KEY": KEYS["admin"]["secret"],
                       "AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        import s3fs

        from stopsign import storage, train
        from stopsign.config import SEED_RECIPE

        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        files = sorted(p for p in Path(args.data).rglob("*") if p.is_file())
        fs.put([str(p) for p in files], [f"bench/export/{p.relative_to(args.data).as_posix()}" for p in files])
        size = sum(p.stat().st_size for p in files)
        recipe = SEED_RECIPE if args.recipe == "seed" else {}
        rows = []

        def timed(name: str, data: str, out: str, cache: Path) -> None:
            os.environ["STOPSIGN_CACHE"] = str(cache)
            started = time.perf_counter()
            result = train(data, out=out, progress=False, backbone="efficientnet_lite0", **recipe)
            rows.append((name, time.perf_counter() - started, result.best_val_acc))

        for where, data, out in (("local disk", args.data, str(work / "runs")),
                                 ("S3 bucket", "s3://bench/export/", "s3://bench/runs")):
            cache = work / f"cache-{where.split()[0]}"
            timed(f"{where}, cold", data, out, cache)
            timed(f"{where}, warm", data, out, cache)

        fetches = []
        for workers in (storage.FETCH_WORKERS, 1):
            os.environ["STOPSIGN_CACHE"] = str(work / f"fetch-{workers}")
            storage.FETCH_WORKERS = workers
            started = time.perf_counter()
            storage.fetch("s3://bench/export/")
            fetches.append((workers, time.perf_counter() - started))
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)

    baseline = rows[0][1]
    print(f"\n{len(files)} files, {size / 1e6:.1f} MB; efficientnet_lite0, recipe {args.recipe}; S3 server on 127.0.0.1 (moto)\n")
    print("| run | wall s | × local cold | val acc |\n|---|---|---|---|")
    for name, seconds, accuracy in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f} | {accuracy:.3f} |")
    print("\n| fetch into an empty mirror | wall s | objects/s | MB/s |\n|---|---|---|---|")
    for workers, seconds in fetches:
        print(f"| {workers} at a time | {seconds:.2f} | {len(files) / seconds:.0f} | {size / 1e6 / seconds:.1f} |")


if __name__ == "__main__":
    main()
