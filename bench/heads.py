"""How every pooling and head holds up on imbalanced real data, each figure beside the trivial baselines.

    .venv/bin/python bench/heads.py [--seeds 0] [--only "NAME;NAME"] [--sets "NAME;NAME"] [--json results.json]

The default head (regions, logistic) once stalled at zero weights on a real 1:9 set and gave every photo 0.5;
this bench keeps every head and pooling honest on imbalanced data. Sets (class folders of links in a temp dir):
  second-source 1:4   ../shared/data/second-source: all 343 not-stop, 85 stop drawn with a fixed seed (all 85)
  second-source 1:9   the same 343 not-stop, 38 stop drawn with the same fixed seed
  sign-crops 1:33     ../shared/data/sign-crops as it is: 18 stop against 601 other traffic signs (GTSRB crops)
Each configuration (avg, max, gem or regions pooling × logistic or sgd head; tiles 2 unless named, though train's
default is 3; efficientnet_lite0, otherwise train's defaults) is trained by train(..., folds=5) and scored on its
out-of-fold predictions:
balanced accuracy (the mean of per-class recall), each class's recall and the log-loss, beside the baselines
that ignore the photo: always the majority class (balanced accuracy 0.5) and the class shares (the prior's
log-loss). "beats" is train's own verdict: balanced accuracy above 0.5 and log-loss below the prior's.
"s" is the wall seconds of the configuration's first seed: the first configuration of a set pays the backbone
passes (cached on disk after it, ~/.cache/stopsign), the others only fit heads.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import stopsign

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
SECOND_SOURCE = SHARED / "second-source"
SIGN_CROPS = SHARED / "sign-crops"
BACKBONE = "efficientnet_lite0"
POSITIVE, NEGATIVE = "stop", "not-stop"
SUBSET_SEED = 0  # the positives drawn for a subset do not move with --seeds: only the training does
# name: (source folder, positives kept; None keeps the set as it is)
SETS = {
    "second-source 1:4": (SECOND_SOURCE, 85),
    "second-source 1:9": (SECOND_SOURCE, 38),
    "sign-crops 1:33": (SIGN_CROPS, None),
}
CONFIGS = {f"{pooling}, {head}": {"pooling": pooling, "head": head, "tiles": 2}
           for pooling in ("avg", "max", "gem", "regions") for head in ("logistic", "sgd")} | {
    f"regions, logistic, class weight {weight}": {"pooling": "regions", "head": "logistic", "tiles": 2,
                                                  "class_weight": weight} for weight in ("balanced", "auto")} | {
    "regions, logistic, tiles 3": {"pooling": "regions", "head": "logistic", "tiles": 3}}
DEFAULT = "regions, logistic, tiles 3"  # train's defaults: marked in the table
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def link_subset(source: Path, positives: int | None, root: Path) -> Path:
    """Class folders of links to every not-stop image of `source` and `positives` stop images drawn with
    SUBSET_SEED (all of them when None); returns the folder."""
    for label in (POSITIVE, NEGATIVE):
        chosen = images(source / label)
        if label == POSITIVE and positives is not None:
            rng = np.random.default_rng(SUBSET_SEED)
            chosen = sorted(chosen[k] for k in rng.choice(len(chosen), size=positives, replace=False))
        (root / label).mkdir(parents=True)
        for path in chosen:
            (root / label / path.name).symlink_to(path)
    return root


def run(set_name: str, data: Path, config: str, seed: int, workdir: Path) -> dict:
    clock = time.perf_counter()
    result = stopsign.train(data, backbone=BACKBONE, folds=5, seed=seed, out=str(workdir), progress=False,
                            **CONFIGS[config])
    seconds = time.perf_counter() - clock
    metrics, base = result.metrics, result.metrics["baseline"]
    recall = {name: metrics["per_class"][name]["recall"] for name in (POSITIVE, NEGATIVE)}
    return {"set": set_name, "config": config, "seed": seed, "balanced_accuracy": metrics["balanced_accuracy"],
            "recall_stop": recall[POSITIVE], "recall_not_stop": recall[NEGATIVE], "log_loss": metrics["log_loss"],
            "prior_log_loss": base["log_loss"], "majority_accuracy": base["accuracy"],
            "accuracy": metrics["accuracy"], "beats": bool(metrics["verdict"]["beats_baseline"]),
            "warnings": list(metrics.get("warnings", [])), "seconds": seconds}


def cell(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def table(results: list[dict]) -> str:
    keys = ["balanced_accuracy", "recall_stop", "recall_not_stop", "log_loss", "prior_log_loss"]
    lines = ["| set | configuration | bal. acc (always not-stop: 0.5) | recall stop | recall not-stop | log-loss | "
             "prior's log-loss | beats baseline | s |", "|---|---|" + "---|" * 7]
    for key in dict.fromkeys((r["set"], r["config"]) for r in results):
        runs = [r for r in results if (r["set"], r["config"]) == key]
        beats = sum(r["beats"] for r in runs)
        verdict = ("yes" if beats == len(runs) else "no") if beats in (0, len(runs)) else f"{beats} of {len(runs)}"
        name = f"**{key[1]} (the default)**" if key[1] == DEFAULT else key[1]
        lines.append(f"| {key[0]} | {name} | " + " | ".join(cell([r[k] for r in runs]) for k in keys)
                     + f" | {verdict} | {runs[0]['seconds']:.0f} |")
    return "\n".join(lines)


def warnings_seen(results: list[dict]) -> list[str]:
    return [f"- {r['set']}, {r['config']}, seed {r['seed']}: {w}" for r in results for w in r["warnings"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", help="configuration names separated by ; (default: all)")
    parser.add_argument("--sets", help="set names separated by ; (default: all)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    configs = args.only.split(";") if args.only else list(CONFIGS)
    sets = args.sets.split(";") if args.sets else list(SETS)
    for name, known in [*((c, CONFIGS) for c in configs), *((s, SETS) for s in sets)]:
        if name not in known:
            raise SystemExit(f"unknown name {name!r}: choose from {'; '.join(known)}")
    for source in {SETS[s][0] for s in sets}:
        if not all((source / label).is_dir() for label in (POSITIVE, NEGATIVE)):
            raise SystemExit(f"needs the class folders {POSITIVE}/ and {NEGATIVE}/ in {source}")
    logging.basicConfig(level=logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-heads-") as workdir:
        workdir = Path(workdir)
        for set_name in sets:
            source, positives = SETS[set_name]
            data = link_subset(source, positives, workdir / "data" / set_name.replace(" ", "-").replace(":", "to"))
            for config in configs:
                for seed in seeds:
                    results.append(run(set_name, data, config, seed, workdir / "runs"))
                    shown = {k: round(v, 3) for k, v in results[-1].items() if isinstance(v, float)}
                    print(f"{set_name} | {config} | seed {seed}: {json.dumps(shown)} beats={results[-1]['beats']}",
                          file=sys.stderr, flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(results, indent=1))
    print(f"{BACKBONE}, tiles 2 unless named, 5-fold out-of-fold predictions; seeds {args.seeds}; mean ± sd. "
          "Baselines: always not-stop (balanced accuracy 0.5) and the class shares (the prior's log-loss).")
    print(table(results))
    notes = warnings_seen(results)
    if notes:
        print("\nWarnings from train:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
