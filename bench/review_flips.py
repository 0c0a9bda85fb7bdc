"""How well `stopsign review` finds planted label errors in the shared photos, and what it flags on clean ones.

    .venv/bin/python bench/review_flips.py [--flips 10] [--seeds 0,1,2,3,4] [--top 20] [--backbone efficientnet_lite0]

For each seed: a copy of the CV Studio export in a temporary folder with `--flips` labels flipped at random,
find_suspects() on it (the review defaults: 5-fold out-of-fold probabilities, cleanlab's self-confidence
ranking), and the recall of the planted flips among the first `--top` suspects and the precision at `--top`
(planted flips among the first min(top, suspects) suspects). Then the suspects of the clean photos, listed.
The photos' features are cached by content, so only the first copy computes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from stopsign.training.review import find_suspects

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"


def flipped_copy(target: Path, flips: int, seed: int) -> set[str]:
    """The export copied to `target` with `flips` labels changed to the other class; the flipped file names."""
    shutil.copytree(DATA / "images", target / "images")
    document = json.loads((DATA / "_annotations.json").read_text())
    names = sorted(document["annotations"])
    chosen = np.random.default_rng(seed).choice(len(names), flips, replace=False)
    labels = document["labels"]
    for i in chosen:
        entry = document["annotations"][names[i]][0]
        entry["label"] = labels[1 - labels.index(entry["label"])]  # two classes: the other one
    (target / "_annotations.json").write_text(json.dumps(document))
    return {names[i] for i in chosen}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flips", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    print(f"| seed | suspects | planted in first {args.top} | recall@{args.top} | precision@{args.top} | seconds |")
    print("|---|---|---|---|---|---|")
    recalls, precisions = [], []
    for seed in map(int, args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            copy = Path(folder) / "export"
            planted = flipped_copy(copy, args.flips, seed)
            review = find_suspects(copy, backbone=args.backbone, out=Path(folder) / "review", num_workers=1)
            first = [s.path.name for s in review.suspects[:args.top]]
            hits = len(planted & set(first))
            recalls.append(hits / len(planted))
            precisions.append(hits / max(1, len(first)))
            print(f"| {seed} | {len(review.suspects)} | {hits} of {len(planted)} | {recalls[-1]:.2f} | "
                  f"{precisions[-1]:.2f} | {review.seconds:.1f} |", flush=True)
    print(f"| mean | | | {np.mean(recalls):.2f} | {np.mean(precisions):.2f} | |")
    with tempfile.TemporaryDirectory() as folder:
        review = find_suspects(DATA, backbone=args.backbone, out=folder, num_workers=1)
        print(f"\nclean photos: {len(review.suspects)} suspects")
        for s in review.suspects:
            print(f"  {s.path.relative_to(DATA)}  given {s.given}, suggested {s.suggested}, score "
                  f"{s.score if s.score is None else round(s.score, 4)}: {s.reason}")


if __name__ == "__main__":
    main()
