"""Does bf16 autocast for the backbone pass predict exactly as float32 on the shared photos?

    .venv/bin/python bench/bench_bf16.py [--seeds 5]

1. Features: the plain view of all 197 photos in float32 and in bf16; largest absolute and relative difference.
2. Predictions: for each seed, stopsign.train() once with bf16 off and once on (separate caches: the cache
   key holds the precision). Reported: the two best validation accuracies, and over all 197 photos how many
   predicted classes differ (a) between the two trained models, each on its own precision's features, and
   (b) for the float32 model fed bf16 features instead of its own.
3. Speed: seconds of each pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import stopsign
from bench_speed import BACKBONE, DATA, split
from stopsign.model.features import FeatureExtractor
from stopsign.checkpoint import load_checkpoint


def predict(head_state: dict, features: np.ndarray) -> np.ndarray:
    weight, bias = head_state["weight"].numpy(), head_state["bias"].numpy()
    return (features @ weight.T + bias).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    data, _, _ = split()
    paths = [s.path for s in data.samples]
    features, seconds = {}, {}
    for bf16 in (False, True, False, True):  # twice each, interleaved; the second timing counts
        clock = time.perf_counter()
        features[bf16] = FeatureExtractor(BACKBONE, bf16=bf16).extract(paths).features[:, 0]
        seconds[bf16] = time.perf_counter() - clock
    diff = np.abs(features[True] - features[False])
    print(f"features of {len(paths)} plain views: max |bf16 - fp32| = {diff.max():.3g}, "
          f"relative to max |fp32| = {diff.max() / np.abs(features[False]).max():.3g}; "
          f"pass seconds fp32 {seconds[False]:.2f}, bf16 {seconds[True]:.2f} "
          f"({seconds[True] / seconds[False]:.2f}×)")
    print("| seed | val acc fp32 | val acc bf16 | predictions differing, own features (of 197) "
          "| fp32 model on bf16 features |")
    print("|---|---|---|---|---|")
    total_own = total_cross = 0
    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as workdir:
        for seed in range(args.seeds):
            heads, accuracy = {}, {}
            for bf16 in (False, True):
                result = stopsign.train(DATA, backbone=BACKBONE, bf16=bf16, seed=seed, cache_dir=f"{workdir}/cache",
                                        out=f"{workdir}/runs", progress=False)
                heads[bf16] = load_checkpoint(Path(result.run_dir) / "best.pt")["head"]
                accuracy[bf16] = result.best_val_acc
            own = int((predict(heads[False], features[False]) != predict(heads[True], features[True])).sum())
            cross = int((predict(heads[False], features[False]) != predict(heads[False], features[True])).sum())
            total_own, total_cross = total_own + own, total_cross + cross
            print(f"| {seed} | {accuracy[False]:.3f} | {accuracy[True]:.3f} | {own} | {cross} |", flush=True)
    verdict = "identical" if total_own == total_cross == 0 else "NOT identical"
    print(f"\nbf16 predictions are {verdict} to float32 on the shared photos "
          f"({total_own} + {total_cross} differences over {args.seeds} seeds)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
