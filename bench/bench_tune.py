"""How long `stopsign tune` takes on a warm feature cache, and what it gains over the defaults it starts from.

    .venv/bin/python bench/bench_tune.py [DATA] [--backbone efficientnet_lite0] [--trials 100] [--folds 5]

1. one fold of fit() on cached features, with the source's one thread and with torch's default thread count;
2. the defaults' K-fold score, from crossval.cross_validate and from tune's own scorer (must agree);
3. tune(): wall time for N trials × K folds (the features come from the cache), per-trial time, pruned trials,
   repeats (trials that drew settings scored before, which reuse that score), and the tuned recipe's K-fold
   accuracy against the defaults' on the same folds;
4. both recipes on other K-fold splits (split seeds 1-3), which the search never saw: the best of N trials on
   one set of folds is an optimistic estimate of itself.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stopsign.config import Settings
from stopsign.training.crossval import cross_validate
from stopsign.data.datasets import kfold_samples, load_data
from stopsign.model.features import FeatureExtractor, default_cache_dir
from stopsign.training.fitting import fit
from stopsign.training.sources import CachedFeatures
from stopsign.training.tune import MAX_VIEWS, cross_validated_score, tune

SHARED = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        tick = time.perf_counter()
        function()
        times.append(time.perf_counter() - tick)
    return times


def other_splits_accuracy(extractor, data, config: Settings, split_seeds) -> float:
    """Mean fold accuracy over K-fold splits drawn with other seeds (the features, views and training seed stay);
    the recipe's pooling read from the cache the study filled."""
    source = CachedFeatures(extractor, data.samples, data.samples, config.model, config.recipe.replace(
        views=MAX_VIEWS)).for_config(config.model, config.recipe)
    num_features, accuracies = extractor.feature_size, []
    for split_seed in split_seeds:
        for train_samples, val_samples in kfold_samples(data.samples, config.recipe.folds, split_seed):
            result = fit(source, num_features, len(data.class_names),
                         train_samples, val_samples, config.model, config.recipe, keep="last")
            truth = [s.label for s in result.val_samples]
            accuracies.append(float((result.val_probs.argmax(1) == truth).mean()))
    return statistics.mean(accuracies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", nargs="?", default=str(SHARED))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data = load_data(args.data)
    config = Settings().replace(backbone=args.backbone, folds=args.folds)
    model, recipe, run = config
    extractor = FeatureExtractor(model.backbone, cache_dir=default_cache_dir(), num_workers=run.num_workers)
    tick = time.perf_counter()
    source = CachedFeatures(extractor, data.samples, data.samples, model, recipe.replace(views=MAX_VIEWS),
                            progress=True)
    features_s = time.perf_counter() - tick
    seed_source = source.for_config(model, recipe)
    train_samples, val_samples = kfold_samples(data.samples, args.folds, recipe.seed)[0]
    one_fold = lambda: fit(seed_source, extractor.feature_size, len(data.class_names), train_samples, val_samples,
                           model, recipe, keep="last")
    one_thread = timed(one_fold, 5)
    seed_source.threads = None  # torch's default thread count, as fit() ran before
    default_threads = timed(one_fold, 3)
    seed_source.threads = 1

    cv = cross_validate(seed_source, data.samples, data.class_names, extractor.feature_size, model, recipe)
    scores = cross_validated_score(seed_source, data.samples, extractor.feature_size, data.class_names, model, recipe)
    assert abs(cv["mean"]["accuracy"] - scores["accuracy"]) < 1e-12, (cv["mean"], scores)

    with tempfile.TemporaryDirectory() as out:
        tick = time.perf_counter()
        result = tune(data, trials=args.trials, folds=args.folds, backbone=args.backbone, out=out, progress=True,
                      final=False)
        tune_s = time.perf_counter() - tick
        rows = (result.run_dir / "trials.csv").read_text().splitlines()
        header = rows[0].split(",")
        trials = [dict(zip(header, row.split(","))) for row in rows[1:]]
    seconds = [float(t["seconds"]) for t in trials]
    split_seeds = (1, 2, 3)
    seed_other = other_splits_accuracy(extractor, data, config, split_seeds)
    tuned_other = other_splits_accuracy(extractor, data, config.replace(**result.best_params), split_seeds)
    pruned = sum(t["state"] == "pruned" for t in trials)
    repeats = sum(t.get("same_as", "") != "" for t in trials)

    print(f"\n{args.backbone}, {len(data.samples)} images, {args.folds} folds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads by default; features from the cache in {features_s:.1f} s")
    table = [
        ("fit(), one fold of the defaults, 1 thread (median)", f"{statistics.median(one_thread) * 1e3:.0f} ms"),
        ("fit(), one fold, torch's default threads (median)", f"{statistics.median(default_threads) * 1e3:.0f} ms"),
        (f"defaults {args.folds}-fold accuracy (cross_validate = tune scorer)",
         f"{scores['accuracy']:.4f} ± {scores['accuracy_std']:.4f}, log-loss {scores['log_loss']:.4f}"),
        (f"tuned recipe {args.folds}-fold accuracy (best of {args.trials} trials)",
         f"{result.best_accuracy:.4f}, objective {result.best_value:.4f}"),
        (f"tune() wall time, {args.trials} trials × {args.folds} folds", f"{tune_s:.1f} s"),
        ("per trial: mean / median / max", f"{statistics.mean(seconds):.2f} / {statistics.median(seconds):.2f} / "
                                           f"{max(seconds):.2f} s"),
        ("pruned trials", f"{pruned} of {len(trials)}"),
        ("repeats (settings scored before: the score reused)", f"{repeats} of {len(trials)}"),
        (f"other splits (seeds {split_seeds}): defaults / tuned", f"{seed_other:.4f} / {tuned_other:.4f}"),
    ]
    width = max(len(name) for name, _ in table)
    for name, value in table:
        print(f"{name:<{width}}  {value}")
    print(f"best settings: {result.best_params}")


if __name__ == "__main__":
    main()
