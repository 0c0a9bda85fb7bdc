"""The labelling loop, simulated on a labelled source: how much K labels of a new source help, chosen by the tool
(`review --add`'s order, training/choose.py), least certain first, or at random.

    .venv/bin/python bench/loop.py --new ../shared/data/second-source [--base DIR] [--seeds 3] [--ks 25,50,100]
                                   [--backbone efficientnet_lite0] [--groups] [--how tool,least,random]
                                   [--train finetune=1]

For each seed the new source is split per class into a pool and a test part (--test-fraction of each class, to
the test part). A model trained on the base data alone is scored on the test part; then find_suspects(base,
add=pool) orders the pool as `review --add` would, and for each K a model is trained on the base plus the first K
pool photos in that order, one on the K least certain (the order before training/choose.py) and one on K drawn
at random, each photo labelled truthfully. Every model is the defaults (`train()`, its head and pooling) on
--backbone and the --train settings (e.g. finetune=1: every model, the base's too, fine-tunes), scored on the test
part at its own decision threshold (re-chosen out of fold at every retraining): balanced accuracy and the recall of
each class (--groups: also
of each file-name prefix, the name less its trailing number, e.g. a source's crops apart from its street photos).
One table, mean ± sd over seeds.
Features are cached by content, so only the first run computes each photo's.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from stopsign import find_suspects, load_classifier, train
from stopsign.decision import decide
from stopsign.data.datasets import LabelledData, Sample, load_data

BASE = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"


def fit_and_load(data: LabelledData, out: Path, backbone: str, settings: dict):
    """The one call that trains (train()'s defaults but the backbone and --train's) and the one that loads what it
    wrote."""
    run = train(data, backbone=backbone, out=str(out), progress=False, **settings)
    return load_classifier(run.run_dir)


def tool_orders(base: Path, pool: list[Sample], folder: Path, backbone: str) -> tuple[list[Sample], list[Sample]]:
    """The pool in `review --add`'s order, and least certain first (its order before training/choose.py): links
    to the pool's photos in one folder, given to find_suspects as --add."""
    folder.mkdir(parents=True)
    by_link = {}
    for i, sample in enumerate(pool):
        link = folder / f"{i:04d}-{sample.path.name}"  # two class folders may hold one name
        link.symlink_to(sample.path)
        by_link[str(link)] = sample
    review = find_suspects(base, add=folder, out=folder.parent / "review", backbone=backbone)
    suggested = [s for s in review.suspects if s.new and s.suggested is not None]
    least_certain = sorted(suggested, key=lambda s: s.score)
    return [by_link[str(s.path)] for s in suggested], [by_link[str(s.path)] for s in least_certain]


def split_source(data: LabelledData, base_names: list[str], test_fraction: float, seed: int
                 ) -> tuple[list[Sample], list[Sample]]:
    """(pool, test) drawn per class with `seed`, labels renumbered into the base's classes."""
    index = {name: base_names.index(base_name(name, base_names)) for name in data.class_names}
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for label, name in enumerate(data.class_names):
        members = [Sample(s.path, index[name]) for s in data.samples if s.label == label]
        members = [members[i] for i in rng.permutation(len(members))]
        cut = round(test_fraction * len(members))
        test += members[:cut]
        pool += members[cut:]
    return pool, test


def base_name(name: str, base_names: list[str]) -> str:
    """The base class a new source's class stands for: the same name up to case, '-', '_' and spaces."""
    for candidate in base_names:
        if bare(candidate) == bare(name):
            return candidate
    raise SystemExit(f"class {name!r} of the new source is none of the base's classes {base_names}")


def bare(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


def scores(classifier, test: list[Sample], names: list[str], groups: bool) -> dict[str, float]:
    """Balanced accuracy and the recall of each class (and of each file-name prefix) on `test`, decided as predict
    decides: at the model's own threshold, chosen out of fold on its whole training set at each retraining."""
    readable, probs, _ = classifier.probabilities([s.path for s in test])
    truth = {s.path: s.label for s in test}
    labels = np.array([truth[Path(p)] for p in readable])
    right = decide(probs, classifier.threshold) == labels
    found = {f"recall {name}": right[labels == i].mean() for i, name in enumerate(names) if (labels == i).any()}
    result = {"balanced accuracy": float(np.mean(list(found.values()))), **found}
    if groups:
        prefixes = np.array([re.sub(r"[-_ ]*\d+$", "", Path(p).stem) for p in readable])
        result |= {f"recall {prefix}": right[prefixes == prefix].mean() for prefix in sorted(set(prefixes))}
    return result


def one_seed(base: LabelledData, new: LabelledData, seed: int, args, folder: Path, base_model) -> dict:
    """{row name: scores} of one seed: the base alone, then + K chosen by the tool, least certain first and at
    random."""
    names = base.class_names
    pool, test = split_source(new, names, args.test_fraction, seed)
    rows = {"base alone": scores(base_model, test, names, args.groups)}
    chosen, least_certain = tool_orders(args.base, pool, folder / "pool", args.backbone)
    drawn = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    for k in args.ks:
        orders = {"tool": ("chosen by the tool", chosen), "least": ("least certain first", least_certain),
                  "random": ("at random", drawn)}
        for how, order in (orders[name] for name in args.how):
            added = order[:k]
            data = replace(base, samples=base.samples + added)
            row = scores(fit_and_load(data, folder / "runs", args.backbone, args.train), test, names, args.groups)
            row[f"{names[-1]} among the added"] = sum(s.label == len(names) - 1 for s in added)
            rows[f"+ {k} {how}"] = row
            print(f"seed {seed}, + {k} {how}: " + ", ".join(f"{key} {round(value, 3)}" for key, value in row.items()),
                  flush=True)
    return rows


def table(runs: list[dict]) -> list[str]:
    """One markdown table: each row's figures as mean ± sd over the seeds (sd left out for one seed)."""
    columns = list(dict.fromkeys(key for run in runs for row in run.values() for key in row))
    lines = ["| training | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in runs[0]:
        cells = []
        for column in columns:
            values = [run[name][column] for run in runs if column in run[name]]
            digits = 0 if column.endswith("among the added") else 3
            cells.append("" if not values else f"{np.mean(values):.{digits}f}" if len(values) == 1 else
                         f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new", required=True, type=Path, help="a labelled source, in any layout")
    parser.add_argument("--base", default=BASE, type=Path, help="what the first model trains on")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ks", type=lambda text: [int(k) for k in text.split(",")], default=[25, 50, 100])
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--groups", action="store_true", help="also the recall of each file-name prefix")
    parser.add_argument("--how", type=lambda text: text.split(","), default=["tool", "least", "random"],
                        help="which orders to add in: tool, least (certain first), random")
    parser.add_argument("--train", type=lambda text: {k: int(v) if v.isdigit() else v for k, v in
                                                      (item.split("=") for item in text.split(","))}, default={},
                        help="settings of every training, e.g. finetune=1")
    args = parser.parse_args()
    base, new = load_data(args.base), load_data(args.new)
    runs = []
    with tempfile.TemporaryDirectory() as temporary:
        base_model = fit_and_load(base, Path(temporary) / "base", args.backbone, args.train)
        for seed in range(args.seeds):
            runs.append(one_seed(base, new, seed, args, Path(temporary) / f"seed-{seed}", base_model))
    print(f"\n{args.new}: pool and test part split per class ({args.test_fraction:g} to the test part), "
          f"{args.seeds} seed(s), base {args.base}, {args.backbone}, settings {args.train or 'the defaults'}")
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
