"""How the regions head (`--pooling regions --head logistic`) is fit: where its L-BFGS starts, and how C is chosen.

    .venv/bin/python bench/regions_fit.py [--starts zero,instance,maxpool] [--choices proxy,regions,fixed]

The max over regions makes the fit non-convex, and at zero weights every region ties: the solver can stop where it
began, every photo at the class prior. Table 1 fits one C (0.03, 0.3) from each start: `zero` (stopsign 0.2's),
`instance` (a logistic regression of every region labelled as its image, the default), `maxpool` (a logistic
regression of the max-pooled features, the default's fallback). Table 2 chooses C three ways, each ending in one
fit from the default start: `proxy` (K-fold of the max-pooled logistic regression over C up to heads.REGIONS_MAX_C: the default),
`regions` (K-fold of the regions head itself, 3 folds, every other grid value: the old way, thinned), `fixed`
(C = 0.1). Columns: grouped 5-fold CV on the shared photos (balanced accuracy, stop recall), the model trained on
all of them scored on ../shared/data/second-source per group (crops, street, negatives), the share of
../shared/data/sign-crops' other signs called stop, and stratified 5-fold CV within second-source subsampled to 1:4
and 1:9 and within sign-crops (1:33): balanced accuracy and log-loss against the prior's.
Features: efficientnet_lite0, --tiles 2, the training view 1 of seed 0 (train's default) and the plain view.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from stopsign.config import ModelConfig, TrainConfig
from stopsign.data.checks import duplicate_groups
from stopsign.data.datasets import load_data
from stopsign.model.features import FeatureExtractor, default_cache_dir
from stopsign.training import heads

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
WIDTH = 1280


def features(extractor: FeatureExtractor, root: Path, view: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = load_data(root)
    label = {s.path: s.label for s in data.samples}
    found = extractor.extract([s.path for s in data.samples], views=(view,), pooling="regions", tiles=2,
                              progress=True)
    return found.features[:, 0], np.array([label[p] for p in found.paths]), [str(p) for p in found.paths]


def regions_model(c: float, start: str = "instance"):
    model = heads.RegionLogistic(c, WIDTH, positive=1)
    if start != "instance":
        original = heads.RegionLogistic._starts

        def starts(self, regions, targets, two):
            options = list(original(self, regions, targets, two))
            yield (np.zeros_like(options[0][0]), np.zeros_like(options[0][1])) if start == "zero" else options[1]
        model._starts = starts.__get__(model)
    return model


def fit(x, y, c, start="instance"):
    scaler = heads.RegionScaler(WIDTH).fit(x)
    model = regions_model(c, start).fit(scaler.transform(x), y)
    return lambda rows: model.predict_proba(scaler.transform(rows))


def choose(x, y, how: str) -> float:
    if how == "fixed":
        return 0.1
    folds = list(StratifiedKFold(min(5 if how == "proxy" else 3, np.bincount(y).min()), shuffle=True,
                                 random_state=0).split(x, y))
    grid = [c for c in heads.C_GRID if c <= heads.REGIONS_MAX_C] if how == "proxy" else heads.C_GRID[::2]
    losses = []
    for c in grid:
        if how == "proxy":  # what choose_c does: the max-pooled logistic regression of the same rows
            model = ModelConfig(backbone="efficientnet_lite0", pooling="max")
            pooled = x.reshape(len(x), -1, WIDTH).max(axis=1)
            scores = [log_loss(y[te], heads.make_model(model, TrainConfig(), c).fit(pooled[tr], y[tr]).predict_proba(pooled[te]),
                               labels=[0, 1]) for tr, te in folds]
        else:
            scores = [log_loss(y[te], fit(x[tr], y[tr], c)(x[te]), labels=[0, 1]) for tr, te in folds]
        losses.append(np.mean(scores))
    return grid[int(np.argmin(losses))]


def within(x, y, make, folds=5):
    probs = np.zeros((len(y), 2))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
        probs[te] = make(x[tr], y[tr])(x[te])
    prior = np.tile(np.bincount(y) / len(y), (len(y), 1))
    return f"{balanced_accuracy_score(y, probs.argmax(1)):.3f} ({log_loss(y, probs):.3f}/{log_loss(y, prior):.3f})"


def row(name, make, data) -> str:
    clock = time.perf_counter()
    (x1, x0, y, groups), (xs, ys, paths), (xc, yc), imbalanced = data
    oof = np.zeros(len(y), dtype=int)
    for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x1, y, groups):
        oof[te] = make(x1[tr], y[tr])(x0[te]).argmax(1)
    model = make(x1, y)
    predicted = model(xs).argmax(1)
    group = np.array(["crops" if "gaynor-pos" in p else "street" if "matlab" in p else "negatives" for p in paths])
    recall = {g: (predicted[group == g] == ys[group == g]).mean() for g in ("crops", "street", "negatives")}
    other = (model(xc[yc == 0]).argmax(1) == 1).mean()
    cells = [f"{balanced_accuracy_score(y, oof):.3f}", f"{(oof[y == 1] == 1).mean():.3f}",
             f"{balanced_accuracy_score(ys, predicted):.3f}", *(f"{recall[g]:.3f}" for g in recall), f"{other:.3f}",
             *(within(xi, yi, make, folds) for (xi, yi), folds in zip(imbalanced, (5, 5, 3))),
             f"{time.perf_counter() - clock:.0f}"]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", default="zero,instance,maxpool")
    parser.add_argument("--choices", default="proxy,regions,fixed")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    extractor = FeatureExtractor("efficientnet_lite0", cache_dir=default_cache_dir(), num_workers=1)
    x1, y, paths = features(extractor, SHARED / "cvstudio-stop-signs", 1)
    x0, _, _ = features(extractor, SHARED / "cvstudio-stop-signs", 0)
    group_of = duplicate_groups(Path(p) for p in paths)
    groups = np.array([group_of.get(p, 1000 + i) for i, p in enumerate(paths)])
    xs, ys, second = features(extractor, SHARED / "second-source", 0)
    xc, yc, _ = features(extractor, SHARED / "sign-crops", 0)
    rng = np.random.default_rng(0)
    negatives, positives = np.flatnonzero(ys == 0), np.flatnonzero(ys == 1)
    imbalanced = [(xs[keep], ys[keep]) for keep in (np.concatenate([negatives, rng.choice(
        positives, len(negatives) // ratio, replace=False)]) for ratio in (4, 9))] + [(xc, yc)]
    data = ((x1, x0, y, groups), (xs, ys, second), (xc, yc), imbalanced)
    header = ("| {} | CV bal. acc | CV recall stop | 2nd-source bal. acc | crops | street | negatives | other signs "
              "called stop | 1:4 bal. acc (log-loss/prior) | 1:9 | sign-crops 1:33 | s |")
    print(header.format("start, C") + "\n|" + "---|" * 12)
    for start in args.starts.split(","):
        for c in (0.03, 0.3):
            print(row(f"{start}, C={c:g}", lambda x, y, c=c, start=start: fit(x, y, c, start), data), flush=True)
    print("\n" + header.format("how C is chosen") + "\n|" + "---|" * 12)
    for how in args.choices.split(","):
        print(row(how, lambda x, y, how=how: fit(x, y, choose(x, y, how)), data), flush=True)


if __name__ == "__main__":
    main()
