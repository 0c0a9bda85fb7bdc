"""--finetune N against the frozen backbone: accuracy on photos of other sources, and its cost.

    .venv/bin/python bench/finetune.py [--configs frozen,ft1,ft2] [--seeds 0,1,2] [--shared ../shared/data]

Each configuration is train's defaults (efficientnet_lite0, offline) on the 197 shared photos (cvstudio-stop-signs,
a seeded 90/10 split that keeps duplicate groups together), with --finetune N or without. Columns, mean ± sd over
the seeds:
  val        balanced accuracy of the run's own validation split (20 photos: the one early stopping watched)
  2nd-src    ../shared/data/second-source: balanced accuracy, then the share called stop of each group (close crops
             of stop signs, street photos with a stop sign, street frames without)
  crops      ../shared/data/sign-crops (GTSRB): the stop crops called stop, and the other signs called stop
  train s    the run's wall seconds (the frozen features are cached after the first configuration), and the
             fine-tuning's own: passes of the frozen stages, epochs run (of the kept number of stages), seconds,
             and the number of stages each seed kept (--finetune N chooses 1 to N on the validation split)
The machine is shared: compare seconds within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stopsign import load_classifier, train

CONFIGS = {"frozen": {}, "ft1": {"finetune": 1}, "ft2": {"finetune": 2}, "ft3": {"finetune": 3}}
COLUMNS = ("val", "2nd-src", "close crops", "street, stop", "street, none", "GTSRB stop", "GTSRB others", "train s")


def groups(shared: Path) -> dict[str, list[Path]]:
    source, crops = shared / "second-source", shared / "sign-crops"
    return {"close crops": sorted((source / "stop").glob("gaynor-*")),
            "street, stop": sorted((source / "stop").glob("matlab-*")),
            "street, none": sorted((source / "not-stop").glob("*")),
            "GTSRB stop": sorted((crops / "stop").glob("*")), "GTSRB others": sorted((crops / "not-stop").glob("*"))}


def run(config: dict, seed: int, shared: Path, scratch: Path) -> dict:
    started = time.perf_counter()
    result = train(shared / "cvstudio-stop-signs", backbone="efficientnet_lite0", seed=seed, out=str(scratch),
                   progress=False, **config)
    seconds = time.perf_counter() - started
    metrics = result.metrics
    classifier = load_classifier(result.run_dir / "best.pt")
    sets = groups(shared)
    paths = [p for group in sets.values() for p in group]
    called = {str(row.path): row.label == "stop" for row in classifier.predict(paths)}
    share = {name: float(np.mean([called[str(p)] for p in group])) for name, group in sets.items()}
    stop = np.mean([called[str(p)] for p in sets["close crops"] + sets["street, stop"]])
    tuned = torch.load(result.run_dir / "best.pt", weights_only=True).get("tuned")
    return share | {"val": metrics["balanced_accuracy"], "2nd-src": (stop + 1 - share["street, none"]) / 2,
                    "train s": seconds, "passes": tuned["passes"] if tuned else 0,
                    "epochs": len(tuned["history"]) if tuned else 0, "tune s": tuned["seconds"] if tuned else 0,
                    "stages": tuned["stages"] if tuned else 0}


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="frozen,ft1,ft2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    if not (args.shared / "second-source").is_dir() or not (args.shared / "sign-crops").is_dir():
        raise SystemExit(f"needs {args.shared}/second-source and sign-crops")
    print("| configuration | " + " | ".join(COLUMNS) + " | fine-tuning: passes, epochs, s; stages kept |\n|"
          + "---|" * 10)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as scratch:
        for name in args.configs.split(","):
            results = [run(CONFIGS[name], int(seed), args.shared, Path(scratch)) for seed in args.seeds.split(",")]
            for result in results:
                print(f"{name}: {result}", file=sys.stderr, flush=True)
            flags = " ".join(f"--{k} {v}" for k, v in CONFIGS[name].items()) or "defaults"
            cost = (f"{statistics.mean(r['passes'] for r in results):.0f}, "
                    f"{statistics.mean(r['epochs'] for r in results):.1f}, "
                    f"{statistics.mean(r['tune s'] for r in results):.0f}; "
                    f"{', '.join(str(r['stages']) for r in results)}") if CONFIGS[name] else "-"
            print(f"| {name} (`{flags}`) | " + " | ".join(
                f"{statistics.mean(r[c] for r in results):.0f}" if c == "train s" else cell([r[c] for r in results])
                for c in COLUMNS) + f" | {cost} |", flush=True)


if __name__ == "__main__":
    main()
