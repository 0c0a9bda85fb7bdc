"""Which features and head hold up on photos from elsewhere: one table, several seeds.

    .venv/bin/python bench/accuracy.py [--seeds 0,1,2] [--only "NAME;NAME"] [--json results.json]

Each configuration is trained on the shared CV Studio photos (197) by train(..., folds=5): the out-of-fold
predictions of grouped 5-fold cross-validation (duplicate groups kept in one fold) give the CV figures, and the
final model (all 197 photos) is evaluated on ../shared/data/second-source per source group:
  crops      stop/gaynor-pos-*  close crops where the sign fills the frame (50)
  street     stop/matlab-*      street photos with a stop sign (35)
  negatives  not-stop/*         street-level frames without one (343)
Balanced accuracy is the mean of per-class recall. Read the caveat in second-source/README.md: crops against
wide negatives can be told apart by framing, so the street group and the negatives matter most.
"passes" is backbone passes per image and view; "s" the wall seconds of the configuration's first seed
(features cached on disk after it, so later seeds and configurations that share features cost only heads).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import stopsign
from stopsign.config import SEED_RECIPE
from stopsign.model.features import default_cache_dir
from stopsign.model.transforms import tile_count

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
TRAIN = SHARED / "cvstudio-stop-signs"
OTHER = SHARED / "second-source"
BACKBONE = "efficientnet_lite0"
# Each configuration is the seed recipe (average pooling, the whole image, the SGD head) and its changes, so the
# table does not move when train's defaults do.
CONFIGS = {
    "seed recipe (avg, sgd)": {},
    "max, sgd": {"pooling": "max"},
    "gem, sgd": {"pooling": "gem"},
    "avg, logistic": {"head": "logistic"},
    "max, logistic": {"pooling": "max", "head": "logistic"},
    "gem, logistic": {"pooling": "gem", "head": "logistic"},
    "max, tiles 2, logistic": {"pooling": "max", "tiles": 2, "head": "logistic"},
    "gem, tiles 2, logistic": {"pooling": "gem", "tiles": 2, "head": "logistic"},
    "max, tiles 2, sgd": {"pooling": "max", "tiles": 2},
    "max, tiles 2, logistic, +200 synthetic": {"pooling": "max", "tiles": 2, "head": "logistic",
                                               "synthetic_negatives": 200},
    "max, tiles 2, logistic, balanced": {"pooling": "max", "tiles": 2, "head": "logistic",
                                         "class_weight": "balanced"},
    "regions, logistic": {"pooling": "regions", "head": "logistic"},
    "regions, tiles 2, logistic": {"pooling": "regions", "tiles": 2, "head": "logistic"},
    "regions, tiles 2, sgd": {"pooling": "regions", "tiles": 2},
    "regions, tiles 3, logistic": {"pooling": "regions", "tiles": 3, "head": "logistic"},
    "regions, tiles 4, logistic": {"pooling": "regions", "tiles": 4, "head": "logistic"},
    "regions, tiles 4, tile-pixels 280, logistic": {"pooling": "regions", "tiles": 4, "tile_pixels": 280,
                                                    "head": "logistic"},
    "regions, tiles 2, logistic, +200 synthetic": {"pooling": "regions", "tiles": 2, "head": "logistic",
                                                   "synthetic_negatives": 200},
    "lite1 (240 px), max, logistic": {"backbone": "efficientnet_lite1", "pooling": "max", "head": "logistic"},
    "lite2 (260 px), max, logistic": {"backbone": "efficientnet_lite2", "pooling": "max", "head": "logistic"},
}
GROUPS = {"crops": ("stop", "gaynor-pos"), "street": ("stop", "matlab"), "negatives": ("not_stop", "")}


def recall(rows: list[dict], label: str, prefix: str) -> float:
    chosen = [r for r in rows if r["label"] == label and Path(r["path"]).name.startswith(prefix)]
    return sum(r["predicted"] == label for r in chosen) / len(chosen)


def run(name: str, overrides: dict, seed: int, workdir: Path) -> dict:
    clock = time.perf_counter()
    settings = ({"backbone": BACKBONE, "folds": 5, "seed": seed, "out": str(workdir), "progress": False}
                | SEED_RECIPE | overrides)
    result = stopsign.train(TRAIN, **settings)
    oof = list(csv.DictReader(open(result.run_dir / "predictions.csv")))
    cv_recall = {label: recall(oof, label, "") for label in ("stop", "not_stop")}
    out_dir, _ = stopsign.evaluate(result.run_dir / "best.pt", OTHER, out=workdir, progress=False,
                                   cache_dir=default_cache_dir())
    rows = list(csv.DictReader(open(out_dir / "predictions.csv")))
    groups = {group: recall(rows, label, prefix) for group, (label, prefix) in GROUPS.items()}
    stop_recall = recall(rows, "stop", "")
    return {"config": name, "seed": seed, "cv_balanced": float(np.mean(list(cv_recall.values()))),
            "cv_recall_stop": cv_recall["stop"], "cv_recall_not_stop": cv_recall["not_stop"],
            "other_balanced": (stop_recall + groups["negatives"]) / 2, **groups,
            "passes": tile_count(overrides.get("tiles", 1)), "seconds": time.perf_counter() - clock}


def table(results: list[dict]) -> str:
    keys = ["cv_balanced", "cv_recall_stop", "cv_recall_not_stop", "other_balanced", "crops", "street", "negatives"]
    lines = ["| configuration | CV bal. acc | CV recall stop | CV recall not_stop | 2nd-source bal. acc | crops | "
             "street | negatives | passes | s |", "|---|" + "---|" * 9]
    for name in dict.fromkeys(r["config"] for r in results):
        runs = [r for r in results if r["config"] == name]
        cells = []
        for key in keys:
            values = [r[key] for r in runs]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs[0]['passes']} | {runs[0]['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", help="configuration names separated by ; (default: all)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    if not (TRAIN / "_annotations.json").is_file() or not OTHER.is_dir():
        raise SystemExit(f"needs the shared photos at {TRAIN} and {OTHER}")
    logging.basicConfig(level=logging.ERROR)
    names = args.only.split(";") if args.only else list(CONFIGS)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as workdir:
        for name in names:
            for seed in map(int, args.seeds.split(",")):
                results.append(run(name, CONFIGS[name], seed, Path(workdir)))
                print(f"{name} seed {seed}: {json.dumps({k: round(v, 3) for k, v in results[-1].items() if isinstance(v, float)})}",
                      file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))
    print(f"{BACKBONE} unless named; trained on {TRAIN.name} (197 photos); seeds {args.seeds}; mean ± sd")
    print(table(results))


if __name__ == "__main__":
    main()
