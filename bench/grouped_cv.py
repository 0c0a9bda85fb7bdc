"""What grouping duplicates changes on the shared photos: groups that cross folds, and the cross-validated score.

    .venv/bin/python bench/grouped_cv.py [--folds 3] [--seeds 0,1,2]

For each seed: the K folds drawn without groups (StratifiedKFold, stopsign 0.1) and with the duplicate groups
the data checks find (StratifiedGroupKFold, now the default); how many groups have members in more than one
fold; and the mean fold accuracy and per-class recall of the seed recipe on efficientnet_lite0 features.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stopsign.config import Settings
from stopsign.data.checks import duplicate_groups
from stopsign.data.datasets import kfold_samples, load_data
from stopsign.training.crossval import cross_validate
from stopsign.training.sources import CachedFeatures
from stopsign.training.plan import make_extractor

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    data = load_data(DATA)
    groups = duplicate_groups(s.path for s in data.samples)
    members = {}
    for path, group in groups.items():
        members.setdefault(group, []).append(path)
    print(f"{len(data.samples)} photos, {len(members)} duplicate groups ({len(groups)} photos in them)")
    settings = Settings().replace(backbone="efficientnet_lite0")
    extractor = make_extractor(settings.model, settings.run)
    print("| seed | folds | groups crossing folds | mean fold accuracy | recall " + " | recall ".join(data.class_names)
          + " |\n|---|---|---|---|" + "---|" * len(data.class_names))
    for seed in map(int, args.seeds.split(",")):
        config = settings.replace(folds=args.folds, seed=seed)
        source = CachedFeatures(extractor, data.samples, data.samples, config.model, config.recipe)
        for name, given in (("ungrouped", None), ("grouped", groups)):
            fold_of = {str(s.path): k for k, (_, held) in
                       enumerate(kfold_samples(data.samples, args.folds, seed, groups=given)) for s in held}
            crossing = sum(len({fold_of[p] for p in paths}) > 1 for paths in members.values())
            cv = cross_validate(source, data.samples, data.class_names, extractor.feature_size, config.model,
                                config.recipe, given)
            oof = cv["oof"]
            recall = [float((oof.y_pred[oof.y_true == k] == k).mean()) for k in range(len(data.class_names))]
            print(f"| {seed} | {name} | {crossing} | {cv['mean']['accuracy']:.3f} ± {cv['std']['accuracy']:.3f} | "
                  + " | ".join(f"{r:.3f}" for r in recall) + " |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
