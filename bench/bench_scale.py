"""Does the cost grow linearly with the number of images, and memory stay bounded? The sharded store against
the one-.npy-per-entry store of stopsign <= 0.2, at N = 1k, 10k and 50k generated images.

    .venv/bin/python bench/bench_scale.py [--sizes 1000,10000,50000] [--image-size 64] [--old-limit 3000] [--device cuda]

Each N runs in its own subprocess (so peak RSS is that N's own) and measures:
  extract    FeatureExtractor.extract over N generated 48×48 JPEGs (efficientnet_lite0 at --image-size, the plain
             view, cold, into the sharded store): images per second, with decoding in --workers processes
  warm       the same again on the filled store: seconds to load all N features
  new w/s    ShardStore.put_many of N entries of the backbone's shape (3 poolings × 1280), in batches of 8 as
             extraction writes, flush included; new r/s: a fresh ShardStore's get_many of all N (one pooling)
  old w/s    the old store's put (one fsynced .npy per entry) and get (np.load, mmap) of min(N, --old-limit)
             entries: it runs at hundreds a second, so larger N are left out of it
  head s     the logistic head's fit on the N features (standardise + lbfgs, C fixed at 1)
  RSS MB     the subprocess's peak resident memory
  bytes      the sharded store's size on disk, and its file count (the old store needs N files for N entries)
The machine is shared (2 cores): the rates are of this run's load, printed with `uptime` below the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKBONE = "efficientnet_lite0"
SHAPE = (3, 1280)  # efficientnet_lite0's entries: every pooling of 1280 features


class OldStore:
    """The store of stopsign <= 0.2 (model/features.py's FeatureStore), kept here for the comparison."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, digest: str, tag: str) -> Path:
        return self.folder / digest[:2] / f"{digest}-{tag}.npy"

    def get(self, digest: str, tag: str):
        try:
            return np.load(self.path(digest, tag), mmap_mode="r")
        except FileNotFoundError:
            return None

    def put(self, digest: str, tag: str, array) -> None:
        from stopsign.files import atomic_save_npy

        atomic_save_npy(self.path(digest, tag), array)


def make_images(root: Path, count: int) -> list[Path]:
    """`count` distinct small JPEGs in two class folders (a seeded colour grid, upscaled)."""
    from PIL import Image

    rng = np.random.default_rng(count)
    paths = []
    for i in range(count):
        folder = root / ("stop" if i % 2 else "other")
        folder.mkdir(parents=True, exist_ok=True)
        grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        grid[..., 0] = grid[..., 0] // 2 + (127 if i % 2 else 0)  # the class shows in the red channel
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(grid).resize((48, 48), Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def read_store(folder: Path, digests: list[str]) -> float:
    """Entries a second a fresh ShardStore reads (one pooling of each), as a new run would."""
    from stopsign.store import ShardStore

    began = time.perf_counter()
    found = sum(len(p) for p, _ in ShardStore(folder).get_many([(d, "plain") for d in digests], SHAPE, 0))
    assert found == len(digests)
    return len(digests) / (time.perf_counter() - began)


def write_store(folder: Path, count: int, seed: int) -> tuple[list[str], np.ndarray, float]:
    """put_many of `count` random entries into a new sharded store at `folder`, in batches of 8 as extraction
    writes them: (digests, the block of values written, writes per second, the final flush included)."""
    from stopsign.store import ShardStore

    rng = np.random.default_rng(seed)
    digests = [f"{i:064x}" for i in rng.integers(0, 2**62, size=count)]
    block = rng.standard_normal((8, *SHAPE)).astype(np.float32)
    store = ShardStore(folder)
    began = time.perf_counter()
    for start in range(0, count, 8):
        keys = [(d, "plain") for d in digests[start:start + 8]]
        store.put_many(keys, block[:len(keys)])
    store.flush()
    return digests, block, count / (time.perf_counter() - began)


def store_alone(count: int, workdir: Path) -> dict:
    """The sharded store without extraction: `count` entries written, then read back twice."""
    digests, _, writes = write_store(workdir / "alone", count, seed=1)
    first, warm = read_store(workdir / "alone", digests), read_store(workdir / "alone", digests)
    size, files = folder_size(workdir / "alone")
    return {"n": count, "writes": writes, "first_s": count / first, "warm_s": count / warm, "bytes": size,
            "files": files}


def measure(count: int, image_size: int, workers: int, old_limit: int, workdir: Path, device: str) -> dict:
    import torch

    from stopsign.config import ModelConfig, TrainConfig
    from stopsign.model.features import FeatureExtractor
    from stopsign.training.heads import fit_model

    torch.set_num_threads(1)
    result = {"n": count}
    paths = make_images(workdir / "images", count)
    cache = workdir / "cache"
    extractor = FeatureExtractor(BACKBONE, cache_dir=cache, num_workers=workers, image_size=image_size,
                                 device=device)
    extractor.inference_model  # loaded outside the clock
    began = time.perf_counter()
    cold = extractor.extract(paths)
    result["extract_img_s"] = count / (time.perf_counter() - began)
    began = time.perf_counter()
    warm = FeatureExtractor(BACKBONE, cache_dir=cache, image_size=image_size, device=device).extract(paths)
    result["warm_s"] = time.perf_counter() - began
    assert warm.computed == 0 and np.array_equal(warm.features, cold.features)
    result["extract_bytes"], result["extract_files"] = folder_size(cache)

    digests, block, result["new_write_s"] = write_store(workdir / "new", count, seed=0)
    result["new_read_first_s"], result["new_read_s"] = read_store(workdir / "new", digests), read_store(workdir / "new", digests)
    result["new_bytes"], result["new_files"] = folder_size(workdir / "new")

    old, sample = OldStore(workdir / "old"), digests[:min(count, old_limit)]
    began = time.perf_counter()
    for d in sample:
        old.put(d, "plain", block[0])
    result["old_write_s"] = len(sample) / (time.perf_counter() - began)
    began = time.perf_counter()
    assert sum(np.asarray(old.get(d, "plain"))[0, 0] is not None for d in sample) == len(sample)
    result["old_read_s"] = len(sample) / (time.perf_counter() - began)
    result["old_files"] = folder_size(workdir / "old")[1] * count // len(sample)

    labels = np.array([int(p.parent.name == "stop") for p in cold.paths])
    began = time.perf_counter()
    fit_model(cold.features[:, 0], labels, 1.0, ModelConfig(), TrainConfig())
    result["head_s"] = time.perf_counter() - began
    # ru_maxrss of this process and of its finished DataLoader workers, in KiB on Linux
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="comma-separated image counts")
    parser.add_argument("--image-size", type=int, default=64, help="backbone input size (small keeps 50k short)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the extraction")
    parser.add_argument("--old-limit", type=int, default=3000, help="most entries the old store is timed on")
    parser.add_argument("--device", default="cpu", help="where the extraction's backbone runs (auto, cuda, ...)")
    parser.add_argument("--store-alone", type=int, default=100_000, help="entries of the store-only line (0: none)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: measure this N, print JSON
    parser.add_argument("--alone", type=int, help=argparse.SUPPRESS)  # a child: the store alone
    args = parser.parse_args()
    if args.one or args.alone:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
            print(json.dumps(store_alone(args.alone, Path(folder)) if args.alone else
                             measure(args.one, args.image_size, args.workers, args.old_limit, Path(folder),
                                     args.device)))
        return
    rows = []
    for count in (int(n) for n in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(count), "--image-size", str(args.image_size),
                              "--workers", str(args.workers), "--old-limit", str(args.old_limit),
                              "--device", args.device],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"N={count} done", file=sys.stderr, flush=True)
    alone = None
    if args.store_alone:
        out = subprocess.run([sys.executable, __file__, "--alone", str(args.store_alone)], capture_output=True,
                             text=True, check=True).stdout
        alone = json.loads(out.strip().splitlines()[-1])
    header = (f"{'N':>7} {'extract img/s':>13} {'warm s':>7} {'new w/s':>9} {'new r/s':>10} {'old w/s':>8} "
              f"{'old r/s':>8} {'head s':>7} {'RSS MB':>7} {'wkr MB':>7} {'store MB':>9} {'files':>6} "
              f"{'old files':>9} {'synth MB':>8} {'files':>5}")
    print(header)
    for r in rows:
        print(f"{r['n']:>7} {r['extract_img_s']:>13.0f} {r['warm_s']:>7.2f} {r['new_write_s']:>9.0f} "
              f"{r['new_read_s']:>10.0f} {r['old_write_s']:>8.0f} {r['old_read_s']:>8.0f} {r['head_s']:>7.2f} "
              f"{r['rss_mb']:>7.0f} {r['worker_rss_mb']:>7.0f} {r['extract_bytes'] / 1e6:>9.1f} "
              f"{r['extract_files']:>6} {r['old_files']:>9} {r['new_bytes'] / 1e6:>8.1f} {r['new_files']:>5}")
    if alone:
        print(f"the sharded store alone, {alone['n']} entries of 3 × 1280 float32: {alone['writes']:.0f} writes/s "
              f"(flush included), read back by a fresh store in {alone['first_s']:.2f} s right after writing and "
              f"{alone['warm_s']:.2f} s by a second fresh store (as a later run reads it), {alone['bytes'] / 1e6:.0f} MB in "
              f"{alone['files']} files")
    print("new r/s: a second fresh store's read (as a later run reads the store); a first one's, "
          "right after writing: " + ", ".join(f"{r['new_read_first_s']:.0f}" for r in rows))
    print("store MB / files: the extraction's store (efficientnet_lite0, 3 × 1280 float32 an entry); synth MB / "
          "files: the write benchmark's store; old files: what the old store needs for N entries")
    print(f"extraction on {args.device}, efficientnet_lite0 at {args.image_size} px, {args.workers} decode workers")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
