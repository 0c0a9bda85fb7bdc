"""find_suspects(): the images whose labels to look at again, and labels proposed for new photos.

- Suspected label errors: out-of-fold probabilities of the head (grouped K-fold on cached features: copies of
  one photo stay in one fold, so no image is scored by a head that saw its copy), ranked by cleanlab's
  find_label_issues by self-confidence, the held-out probability of the given label (lowest first).
- Duplicate groups (data/checks.py) whose copies carry different labels: one of them is wrong.
- Images that could not be used (not a file, not decodable): the data checks skip them from training.
- With `add`: the photos of that folder, labelled by a head trained on every labelled image, in the order to label
  them (training/choose.py: uncertain, unlike what is labelled and each other, taken in turn from each predicted
  class, so any first K cover both sides of the boundary).

Each suspect comes with its nearest labelled images by cosine similarity of the backbone's features, and
review/label_issues.csv lists them all: path, given_label, suggested_label, score, reason.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..cache import REMOTE, store_dir
from ..config import ModelConfig, RunOptions, Settings, TrainConfig, given_settings
from ..data.datasets import LabelledData, Sample, load_data
from ..data.images import list_images
from ..errors import StopsignError
from ..files import relative, write_csv
from ..storage import is_url
from .choose import choose, normalised
from .crossval import held_out_predictions
from .fitting import fit
from .sources import CachedFeatures
from .plan import Request, extract, make_extractor, prepare

log = logging.getLogger(__name__)

ISSUES_FILE = "label_issues.csv"
COLUMNS = ["path", "given_label", "suggested_label", "score", "reason"]
NEIGHBOURS = 5
# One backbone pass per image, of the plain photo: a logistic head's out-of-fold probabilities gain little from
# augmented views. Train fits on an augmented draw of each training photo (--views 1), so the first review of a
# trained data set makes the plain pass of its training photos once (28 s for the shared 177 here), and the first
# train after a review the augmented one; each is cached from then on.
REVIEW_DEFAULTS = {"augment": False}


@dataclass
class Suspect:
    path: Path
    given: str | None  # the label in the data set; None for a new photo
    suggested: str | None  # the likeliest class (None: the image could not be read)
    score: float | None  # labelled: held-out probability of the given label; new: of the suggested one
    reasons: list[str]
    probabilities: dict[str, float] = field(default_factory=dict)
    neighbours: list[tuple[Path, str, float]] = field(default_factory=list)  # (path, label, cosine similarity)
    new: bool = False  # a photo of the --add folder, not yet in the data set

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class Review:
    data_path: Path  # what was given: the folder, JSON or CSV that decisions are written back to
    data: LabelledData
    suspects: list[Suspect]
    folds: int
    issues_file: Path
    seconds: float

    def summary(self) -> str:
        """One line: how many suspects of each kind, among how many images, and where the list is."""
        kinds = [("suspected label errors", lambda s: not s.new and s.suggested is not None),
                 ("unreadable", lambda s: not s.new and s.suggested is None), ("new photos", lambda s: s.new)]
        counts = ", ".join(f"{sum(map(test, self.suspects))} {kind}" for kind, test in kinds)
        return (f"{counts} among {len(self.data.samples)} images ({self.folds}-fold, {self.seconds:.1f} s): "
                f"{self.issues_file}")


def find_suspects(data: str | os.PathLike, *, model: ModelConfig | None = None, recipe: TrainConfig | None = None,
                  run: RunOptions | None = None, folds: int = 5,
                  add: str | os.PathLike | None = None, out: str | os.PathLike = "review", progress: bool = False,
                  neighbours: int = NEIGHBOURS, **overrides) -> Review:
    """Rank the data set's suspected label errors and write out/label_issues.csv (see the module).

    model, recipe, run and the flat overrides: the backbone and head settings, as train() takes them (augment is
    off unless asked);
    folds: K of the out-of-fold probabilities (fewer when a class has fewer images).
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as error:  # the optional `review` extra
        raise StopsignError("stopsign review needs cleanlab: pip install 'stopsign[review]'") from error

    # Not the mirror storage.fetch keeps of a URL either: it is a cache, put back to the bucket's state by the next
    # fetch, so a decision written there would be lost.
    fix = ("Fix: copy the data to a folder of your own (e.g. `aws s3 sync URL DIR`), review that, and upload it "
           "again")
    if is_url(data):
        raise StopsignError(f"{data}: review writes its decisions back to the data set's own files, so it needs "
                            f"them on this machine. {fix}")
    started = time.perf_counter()
    config = Settings().replace(**REVIEW_DEFAULTS | given_settings(model, recipe, run, overrides))
    data_path = Path(os.path.abspath(data))
    if data_path.is_relative_to(os.path.abspath(store_dir(REMOTE))):
        raise StopsignError(f"{data_path} is stopsign's local copy of data at a URL, a cache that the next fetch "
                            "refreshes and `stopsign cache clear` deletes: decisions written to it would be lost. "
                            f"{fix}")
    labelled = load_data(data_path)
    if labelled.layout in ("folders", "splits") and Path(os.path.abspath(out)).is_relative_to(labelled.root):
        raise StopsignError(f"--out {out} is inside the class folders of {labelled.root}, where it would be read as "
                            "a class. Fix: choose an --out outside the data folder")
    names = labelled.class_names
    # every image alike, whatever split the layout puts it in; K is settled once the readable images are known
    plan = prepare(replace(labelled, splits=None), config.replace(folds=folds), progress=progress)
    samples, groups = plan.train, plan.groups
    extractor = make_extractor(config.model, config.run)
    source = CachedFeatures(extractor, samples, samples, config.model, config.recipe, progress)
    readable = source.readable(samples)
    k = fold_count(readable, names, folds, data_path)

    probs = out_of_fold(source, readable, names, extractor.feature_size, config.replace(folds=k), groups, progress)
    labels = np.array([s.label for s in readable])
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    log.debug("%d of %d images are suspected label errors (%d-fold, cleanlab)", len(ranked), len(readable), k)

    features = normalised(source.val_features[[source.val_rows[s.path] for s in readable]])
    found = suspects_of(readable, probs, ranked, features, names, disagreeing_groups(samples, groups), neighbours)
    unreadable = {str(s.path): s for s in samples}
    for path, why in sorted((labelled.skipped | source.skipped).items()):
        sample = unreadable.get(path)
        found.append(Suspect(Path(path), names[sample.label] if sample else None, None, None,
                             [f"could not be read: {why}"]))
    if add is not None:
        found += new_photo_suggestions(Path(os.path.abspath(add)), extractor, source, readable, features, names,
                                       config, neighbours, progress)

    issues_file = Path(out) / ISSUES_FILE
    write_csv(issues_file, [row(s, labelled.root) for s in found], COLUMNS)
    return Review(data_path, labelled, found, k, issues_file, time.perf_counter() - started)


def fold_count(readable: list[Sample], names: list[str], folds: int, data_path: Path) -> int:
    """K of the out-of-fold probabilities: `folds`, fewer (with a warning) when a class has fewer readable images;
    an error when fewer than two classes have two."""
    counts = np.bincount([s.label for s in readable], minlength=len(names))
    k = int(min(folds, counts[counts > 0].min())) if len(readable) else 0
    if k < 2 or (counts > 0).sum() < 2:
        raise StopsignError(f"{data_path}: too few readable images to score out of fold (per class: "
                            f"{dict(zip(names, counts.tolist()))}); at least two classes of two images are needed")
    if k < folds:
        log.warning("%d-fold instead of %d: the smallest class has %d images", k, folds, k)
    return k


def suspects_of(readable: list[Sample], probs: np.ndarray, ranked, features: np.ndarray, names: list[str],
                disagreeing: list[list[Sample]], neighbours: int) -> list[Suspect]:
    """A Suspect for each image cleanlab ranked (in its order), then for each readable member of a duplicate group
    whose labels disagree; an image that is both has both reasons. `features`: normalised, in readable's order,
    to find each suspect's nearest `neighbours`."""
    by_path: dict[Path, Suspect] = {}

    def suspect(i: int, reason: str) -> Suspect:
        s = readable[i]
        if s.path not in by_path:
            row = probs[i]
            similar = features @ features[i]
            similar[i] = -np.inf  # not its own neighbour
            nearest = [(readable[j].path, names[readable[j].label], float(similar[j]))
                       for j in np.argsort(-similar)[:neighbours]]
            by_path[s.path] = Suspect(s.path, names[s.label], names[int(row.argmax())], float(row[s.label]), [],
                                      {n: float(p) for n, p in zip(names, row)}, nearest)
        by_path[s.path].reasons.append(reason)
        return by_path[s.path]

    for i in ranked:
        suspect(int(i), f"held-out probability of {names[readable[i].label]!r} is {probs[i, readable[i].label]:.3f}")
    index = {s.path: i for i, s in enumerate(readable)}
    for members in disagreeing:
        for s in members:
            others = ", ".join(f"{o.path.name} ({names[o.label]})" for o in members if o is not s)
            if s.path in index:
                suspect(index[s.path], f"a copy of {others}")
    return list(by_path.values())


def out_of_fold(source: CachedFeatures, samples: list[Sample], class_names: list[str], num_features: int,
                config: Settings, groups: dict[str, int], progress: bool = False) -> np.ndarray:
    """(len(samples), C) held-out probabilities, in the order of `samples` (crossval's folds and heads;
    progress: its bar over the folds)."""
    at = {str(s.path): i for i, s in enumerate(samples)}
    probs = np.full((len(samples), len(class_names)), np.nan)
    for fold in held_out_predictions(source, samples, class_names, num_features, config.model, config.recipe, groups,
                                     progress=progress):
        probs[[at[p] for p in fold.paths]] = fold.probs
    assert not np.isnan(probs).any(), "every readable image is held out exactly once"
    return probs


def disagreeing_groups(samples: list[Sample], groups: dict[str, int]) -> list[list[Sample]]:
    """The duplicate groups whose images do not all carry one label."""
    members: dict[int, list[Sample]] = {}
    for s in samples:
        if str(s.path) in groups:
            members.setdefault(groups[str(s.path)], []).append(s)
    return [group for group in members.values() if len({s.label for s in group}) > 1]


def new_photo_suggestions(folder: Path, extractor, source: CachedFeatures, samples: list[Sample],
                          features: np.ndarray, class_names: list[str], config: Settings, neighbours: int,
                          progress: bool = False) -> list[Suspect]:
    """The images directly in `folder`, each with the label of a head trained on every labelled image, in
    choose()'s order (progress: a bar over the photos' backbone pass)."""
    if not folder.is_dir():
        raise StopsignError(f"--add {folder}: not a folder of photos")
    photos = list_images(folder)
    if not photos:
        below = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and list_images(entry))
        log.warning("--add %s: no images directly in that folder%s", folder,
                    f" (its subfolders are not read: give one of them, {', '.join(below)})" if below else "")
        return []
    new = {"new": Request(photos, [0], config.model.tiles, config.model.pooling,  # plain, as the head sees them
                          tile_pixels=config.model.tile_pixels)}
    extracted = extract(new, extractor, progress=progress)["new"]
    # one fit, as long as one fold: no bar to show, so say what the wait is for
    log.info("labelling %d new photo(s): a head trained on all %d labelled images", len(photos), len(samples))
    head = fit(source, extractor.feature_size, len(class_names), samples, [], config.model, config.recipe,
               positive=config.model.positive_index(class_names)).head
    with torch.no_grad():
        probs = head(torch.from_numpy(np.ascontiguousarray(extracted.features[:, 0]))).softmax(1).numpy()
    mine = normalised(extracted.features[:, 0])
    found = []
    for i in choose(probs, mine, features):
        path, row, similar = extracted.paths[i], probs[i], features @ mine[i]
        nearest = [(samples[j].path, class_names[samples[j].label], float(similar[j]))
                   for j in np.argsort(-similar)[:neighbours]]
        best = int(row.argmax())
        found.append(Suspect(Path(path), None, class_names[best], float(row[best]), ["unlabelled (--add)"],
                             {n: float(p) for n, p in zip(class_names, row)}, nearest, new=True))
    found += [Suspect(Path(p), None, None, None, [f"unlabelled (--add), could not be read: {why}"], new=True)
              for p, why in extracted.skipped.items()]
    return found


def row(suspect: Suspect, root: Path) -> dict:
    return {"path": relative(suspect.path, root), "given_label": suspect.given or "",
            "suggested_label": suspect.suggested or "",
            "score": "" if suspect.score is None else f"{suspect.score:.4f}", "reason": suspect.reason}
