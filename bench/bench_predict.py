"""How long `stopsign predict` and `stopsign evaluate` of a .pt model take on the shared photos: with no feature
cache (--no-cache, the baseline: every image through the backbone, as every call did before they read the cache),
on a cold cache and on the warm cache the cold call filled.

    .venv/bin/python bench/bench_predict.py [--repeats 3] [--model runs/NAME/best.pt] [--device cpu]

Without --model, a model is trained first with stopsign's defaults (efficientnet_lite0: regions of the whole
image and a 3×3 grid of tiles), in a feature cache of its own, so that the cold calls find none of its features.
Each case is the whole command in a fresh interpreter, imports included, as a user times it; each repeat starts
from empty caches (predict and evaluate each have their own: evaluate's cold call is cold). predict reads the
197 photos of images/, evaluate the labelled export. Prints median wall seconds, the ratio to the same command's
no-cache time, the backbone views each case wrote to the cache, and whether every case predicted the same.
The machine is shared: read the ratios, and the spread across repeats printed below the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"
BACKBONE = "efficientnet_lite0"
CASES = ("predict nocache", "predict cold", "predict warm", "evaluate nocache", "evaluate cold", "evaluate warm")


def stopsign(*args: str, cache_root: Path) -> tuple[float, str]:
    """Wall seconds and stdout of `python -m stopsign -q ARGS` with every cache under `cache_root`."""
    env = os.environ | {"STOPSIGN_CACHE": str(cache_root)}
    clock = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stopsign", "-q", *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - clock
    if done.returncode:
        raise SystemExit(f"stopsign {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def cached_views(cache_root: Path) -> int:
    from stopsign.cache import cache_info

    return cache_info(cache_root / "features")["entries"]


def train_model(workdir: Path) -> Path:
    print(f"training {BACKBONE} on {DATA.name} (stopsign's defaults) for the bench...", file=sys.stderr, flush=True)
    stopsign("train", str(DATA), "--backbone", BACKBONE, "--out", str(workdir / "runs"), "--name", "model",
             cache_root=workdir / "train-cache")
    return workdir / "runs" / "model" / "best.pt"


def measure(case: str, model: Path, workdir: Path, device: str) -> dict:
    command, mode = case.split()
    cache_root = workdir / f"cache-{command}"  # cold and warm share it; nocache never writes to it
    flags = ["--device", device] + (["--no-cache"] if mode == "nocache" else [])
    before = cached_views(cache_root)
    if command == "predict":
        seconds, out = stopsign("predict", str(model), str(DATA / "images"), "--format", "csv", *flags,
                                cache_root=cache_root)
    else:
        seconds, _ = stopsign("evaluate", str(model), str(DATA), "--out", str(workdir / "evals"), *flags,
                              cache_root=cache_root)
        evaluation = max((workdir / "evals").iterdir(), key=lambda p: p.stat().st_mtime)
        out = (evaluation / "predictions.csv").read_text()
    return {"seconds": seconds, "views": cached_views(cache_root) - before, "predictions": out}


def table(results: dict[str, list[dict]]) -> str:
    def median(case: str) -> float:
        return statistics.median(r["seconds"] for r in results[case])

    rows = ["| case | wall s | × no cache | views computed and cached | same predictions as no cache |",
            "|" + "---|" * 5]
    for case in (c for c in CASES if c in results):
        baseline = f"{case.split()[0]} nocache"
        ratio = f"{median(case) / median(baseline):.2f}" if baseline in results else "–"
        same = "–"
        if baseline in results and case != baseline:
            same = "yes" if all(r["predictions"] == b["predictions"]
                                for r, b in zip(results[case], results[baseline])) else "NO"
        views = statistics.median(r["views"] for r in results[case])
        rows.append(f"| {case} | {median(case):.2f} | {ratio} | {views:.0f} | {same} |")
    spread = [f"{case}: " + ", ".join(f"{r['seconds']:.2f}" for r in runs) for case, runs in results.items()]
    return "\n".join(rows) + "\n\nwall seconds of each repeat: " + "; ".join(spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, help="a .pt model (default: one trained here first, not timed)")
    parser.add_argument("--device", default="cpu", help="--device of every call")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases; cold comes before warm")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    cases = [c for c in CASES if c in args.only.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as scratch:
        model = args.model or train_model(Path(scratch))
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="repeat-", dir=scratch) as workdir:  # empty caches each repeat
                for case in cases:
                    results.setdefault(case, []).append(measure(case, model, Path(workdir), args.device))
                    print(f"repeat {repeat + 1}/{args.repeats} {case}: {results[case][-1]['seconds']:.2f} s",
                          file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print(f"{model if args.model else BACKBONE + ' (defaults)'} on {DATA.name}, --device {args.device}, "
          f"median of {args.repeats}")
    print(table(results))


if __name__ == "__main__":
    main()
