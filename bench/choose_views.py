"""How many augmented views V to cache per training image: validation accuracy and cost of each V.

    .venv/bin/python bench/choose_views.py [--seeds 5] [--views 0,1,2,4,10]

Accuracy: stopsign.train() (efficientnet_lite0, the shared photos, every other setting default) for each V and
seed; the seed drives the split, the shuffling and the view draws, so the mean is over 5 different splits.
V = 0 is augmentation off (the plain view). All runs share one cache: view k of an image is drawn from
(seed, image, k), so the 10 views of V = 10 hold the views of every smaller V.
Cost: one cold run per V (seed 0, a fresh cache), its wall seconds and its feature-extraction seconds.
Prints a table and the smallest V whose mean accuracy is within one point (0.01) of V = 10's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import stopsign
from bench_speed import BACKBONE, DATA, PhaseLog, split


def run(cache: Path, out: Path, views: int, seed: int) -> dict:
    handler = PhaseLog()
    logger = logging.getLogger("stopsign.training.trainer")
    logger.setLevel(logging.DEBUG)  # the "phases:" line is a debug message
    logger.addHandler(handler)
    clock = time.perf_counter()
    try:
        result = stopsign.train(DATA, backbone=BACKBONE, views=max(views, 1), augment=views > 0, seed=seed,
                                cache_dir=str(cache), out=str(out), progress=False)
    finally:
        logger.removeHandler(handler)
    return {"seconds": time.perf_counter() - clock, "phases": handler.phases, "best": result.best_val_acc,
            "last": result.history[-1]["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--views", default="0,1,2,4,10")
    args = parser.parse_args()
    choices = [int(v) for v in args.views.split(",")]
    largest = max(choices)
    with tempfile.TemporaryDirectory(prefix="choose-views-") as workdir:
        workdir = Path(workdir)
        cost = {}
        for views in choices:  # each in a fresh cache: what a first run with this V costs
            cost[views] = run(workdir / f"cold-{views}", workdir / "runs", views, 0)
            print(f"cold V={views}: {cost[views]['seconds']:.1f} s", flush=True)
        shared = workdir / f"cold-{largest}"
        accuracy: dict[int, list[dict]] = {v: [] for v in choices}
        for seed in range(args.seeds):
            for views in sorted(choices, reverse=True):  # the largest first fills the cache for the rest
                accuracy[views].append(run(shared, workdir / "runs", views, seed))
            print(f"seed {seed}: " + ", ".join(f"V={v} {accuracy[v][-1]['best']:.2f}" for v in choices), flush=True)

    def mean(views, key):
        return statistics.mean(r[key] for r in accuracy[views])

    reference = mean(largest, "best")
    _, train, val = split()
    print(f"\n{BACKBONE} on {DATA.name}, {args.seeds} seeds (split, shuffle and view draws), 10 epochs")
    print("| V | views computed | best val acc, mean (min–max) | last-epoch val acc, mean | cold run s "
          "| of which features s | warm run s (median) |")
    print("|---|---|---|---|---|---|---|")
    for views in choices:
        best = [r["best"] for r in accuracy[views]]
        # Warm: every run but the largest V's for seeds > 0, which computes that seed's views.
        warm = statistics.median(r["seconds"] for r in accuracy[views][:1 if views == largest else None])
        computed = len(train) * max(views, 1) + len(val)  # training images their V views, validation plain
        print(f"| {views} | {computed} | {statistics.mean(best):.3f} ({min(best):.2f}–{max(best):.2f}) "
              f"| {mean(views, 'last'):.3f} | {cost[views]['seconds']:.1f} "
              f"| {cost[views]['phases'].get('features', float('nan')):.1f} | {warm:.1f} |")
    smallest = min(v for v in choices if mean(v, "best") >= reference - 0.01)
    print(f"\nsmallest V within one point of V={largest} ({reference:.3f}): V = {smallest}")


if __name__ == "__main__":
    main()
