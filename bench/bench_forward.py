"""Backbone forward variants for the extraction pass: per-view time and agreement with the plain model.

    .venv/bin/python bench/bench_forward.py [--images 64] [--repeats 5] [--backbone efficientnet_lite0]

Runs every variant over the same preprocessed photos from the shared data set, interleaved, `--repeats` times,
and prints the median milliseconds per view and the ratio to the plain model at 32 views per call (what the
seed's loop and the floor run). The machine is shared, so only the ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from stopsign.model.backbones import load_backbone
from stopsign.model.rewrites import inference_model
from stopsign.model.transforms import preprocess
from stopsign.data.images import read_image

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()

    backbone = load_backbone(args.backbone)
    size = backbone.preprocessing["size"]
    paths = sorted((DATA / "images").glob("*.jpg"))[: args.images]
    images = torch.stack([torch.from_numpy(preprocess(read_image(p, draft=(size, size)), backbone.preprocessing))
                          for p in paths])
    images = images.contiguous(memory_format=torch.channels_last)
    plain, fused = backbone.model, inference_model(backbone.model)
    variants = [("plain", plain, 32, False), ("plain", plain, 8, False)]
    variants += [("fused", fused, chunk, False) for chunk in (32, 16, 8, 4)]
    variants += [("fused bf16", fused, chunk, True) for chunk in (32, 8)]

    def run(model, chunk, bf16):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with torch.inference_mode(), autocast:
            return torch.cat([model(part).float() for part in images.split(chunk)])

    reference = run(plain, 32, False)
    seconds = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            clock = time.perf_counter()
            run(*variant[1:])
            seconds[variant].append(time.perf_counter() - clock)
    base = statistics.median(seconds[variants[0]])
    print(f"{args.backbone}, {len(images)} views, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':12s} {'chunk':>5s} {'ms/view':>8s} {'ratio':>6s} {'max |diff|':>11s}")
    for variant in variants:
        name, model, chunk, bf16 = variant
        out = run(model, chunk, bf16)
        diff = (out - reference).abs().max().item()
        median = statistics.median(seconds[variant])
        print(f"{name:12s} {chunk:5d} {median / len(images) * 1000:8.1f} {median / base:6.2f} {diff:11.2e}")


if __name__ == "__main__":
    main()
