"""The CPU speed-up of `torchrun --nproc-per-node 2 -m stopsign train` over one process, one thread each.

    .venv/bin/python bench/bench_torchrun.py [--images 2000] [--image-size 224] [--head sgd] [--repeats 1]

Trains efficientnet_lite0 (--tiles 1, decoding in the training process: --workers 0) on generated 48×48 images,
each run on a cold feature cache of its own, and prints wall seconds of the whole command, the speed-up and the
machine's load (the speed-up cannot exceed the idle cores: read it against `uptime`). The two runs' metrics.csv
(but `seconds`) must be equal. The head is SGD by default: the logistic head's choice of C (K-fold × 11 values,
lbfgs, one thread) is rank 0's alone and took 37 s of a 69 s single-process run on 2,000 images at 96 px, which
caps the speed-up (Amdahl); `--head logistic` measures that case.

Measured 2026-12-02 on the 2-core VM (load 1.9-2.5 around the runs, other users included): 224 px, 193.2 s against
107.3 s, 1.80x; 128 px, 51.1 / 33.6 s and 60.7 / 39.7 s, 1.52x (the fixed costs: three interpreters importing
torch, rank 0's duplicate hashing before the ranks start, its checks and report after the barrier).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import make_images


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head", default="sgd", choices=["sgd", "logistic"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        make_images(folder / "data", args.images)
        rows = []
        for repeat in range(args.repeats):
            for processes in (1, 2):
                name = f"p{processes}-r{repeat}"
                command = [sys.executable, "-m", "stopsign", "-q", "train", str(folder / "data"), "--backbone",
                           "efficientnet_lite0", "--image-size", str(args.image_size), "--tiles", "1", "--workers",
                           "0", "--head", args.head, "--out", str(folder / "runs"), "--name", name]
                if processes > 1:
                    command[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                                    "stopsign"]
                env = dict(os.environ) | {"OMP_NUM_THREADS": "1", "STOPSIGN_CACHE": str(folder / f"cache-{name}")}
                load = os.getloadavg()[0]
                began = time.perf_counter()
                subprocess.run(command, env=env, check=True, capture_output=True)
                rows.append((processes, repeat, time.perf_counter() - began, load, os.getloadavg()[0]))
                print(f"{name}: {rows[-1][2]:.1f} s", file=sys.stderr, flush=True)
            assert metrics(folder / "runs" / f"p2-r{repeat}") == metrics(folder / "runs" / f"p1-r{repeat}")
    print(f"{'processes':>9} {'repeat':>6} {'wall s':>8} {'load before':>11} {'load after':>10}")
    for processes, repeat, seconds, before, after in rows:
        print(f"{processes:>9} {repeat:>6} {seconds:>8.1f} {before:>11.2f} {after:>10.2f}")
    one = min(s for p, _, s, _, _ in rows if p == 1)
    two = min(s for p, _, s, _, _ in rows if p == 2)
    print(f"speed-up of 2 processes over 1 (best of {args.repeats}): {one / two:.2f}x on {args.images} images, "
          f"{os.cpu_count()} cores, --head {args.head}, {args.image_size} px; metrics.csv of both runs equal")


if __name__ == "__main__":
    main()
