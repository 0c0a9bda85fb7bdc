"""Where the extraction pass's speed comes from: the plain view of all 197 shared photos, three ways.

    .venv/bin/python bench/bench_pass.py [--repeats 3]

  plain, main, 32   decode in 2 DataLoader workers, the plain backbone in this process, 32 views a call (the floor)
  fused, main, 32   the same with rewrites.inference_model (BatchNorm folded, activations in place)
  fused, main, 8    ... 8 views a call
  stopsign pass     FeatureExtractor.extract: on a machine with no more cores than workers, each worker
                    decodes and runs the fused backbone on its own images, one thread each, 8 views a call
Median wall seconds, ratio to the first, and the largest feature difference from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from bench_speed import BACKBONE, split
from stopsign.model.backbones import load_backbone
from stopsign.model.rewrites import inference_model
from stopsign.model.features import FeatureExtractor, ViewsDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data, _, _ = split()
    paths = [s.path for s in data.samples]
    backbone = load_backbone(BACKBONE)
    fused = inference_model(backbone.model)
    dataset = ViewsDataset(paths, [[(False, 0.0)]] * len(paths), backbone.preprocessing)
    extractor = FeatureExtractor(BACKBONE)
    extractor.inference_model  # built once, outside the clock, as the other cases' models are

    def in_main(model, chunk):
        out = []
        with torch.inference_mode():
            for batch in DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=list):
                images = torch.cat([t for _, t, _ in batch]).contiguous(memory_format=torch.channels_last)
                out += [model(part) for part in images.split(chunk)]
        return torch.cat(out)

    cases = {"plain, main, 32": lambda: in_main(backbone.model, 32), "fused, main, 32": lambda: in_main(fused, 32),
             "fused, main, 8": lambda: in_main(fused, 8),
             "stopsign pass": lambda: torch.from_numpy(extractor.extract(paths).features[:, 0])}
    reference = cases["plain, main, 32"]()
    seconds, diffs = {k: [] for k in cases}, {}
    for _ in range(args.repeats):
        for name, case in cases.items():
            clock = time.perf_counter()
            out = case()
            seconds[name].append(time.perf_counter() - clock)
            diffs[name] = (out - reference).abs().max().item()
    base = statistics.median(seconds["plain, main, 32"])
    print(f"{BACKBONE}, {len(paths)} photos, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| pass | wall s | ratio | max abs diff | every repeat |\n|---|---|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} "
              f"| {diffs[name]:.1e} | {', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
