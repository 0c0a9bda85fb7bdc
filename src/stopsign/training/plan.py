"""The plan of a run, made once for train(), tune(), review and their torchrun path: which images it reads, how
they are drawn, and which of their features it needs.

prepare(data, settings) finds the duplicate groups (copies of one photo stay on one side of a split, in one fold),
draws the split (or keeps a resumed run's) and renders the synthetic negatives; Plan.requests() says which views
of which images the run reads, and extract(requests) is the one backbone pass ahead of fitting (store or compute).

Under torchrun (`torchrun --nproc-per-node N [--nnodes M ...] -m stopsign train|tune DATA ...`) ranks() opens the
process group (model/ranks.py). Every rank draws the same plan (rank 0 sends the groups, and renders the negatives
before the others read them), then extract(requests, shard=(rank, world)) computes the views of the images the rank
owns (owner(): by a hash of their content) into the shared feature store (store.py: shards of its own). After a
barrier the other ranks are done and rank 0 goes on as a single process: every feature is in the store, so its
results are the single-process run's. A killed rank takes the job down; the next run computes only what no rank
committed. The features travel through the store, so --cache-dir (or $STOPSIGN_CACHE) is one folder for all nodes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch.distributed as dist

from ..cache import SYNTHETIC, store_dir
from ..config import ModelConfig, RunOptions, Settings, TrainConfig
from ..data.checks import duplicate_groups
from ..data.datasets import LabelledData, Sample, kfold_samples, load_data, split_samples
from ..errors import DataError, StopsignError
from ..files import relative
from ..model.features import FeatureExtractor, FeatureSet, default_cache_dir
from ..model.ranks import broadcast, launched_by_torchrun, process_group, rank_and_world, rank_device

log = logging.getLogger(__name__)

OWNER_BYTES = 1 << 16


@dataclass
class Request:
    """`views` of each image (0 plain, k >= 1 the k-th augmented draw of (seed, rotation)), whole and with tiles > 1
    as crops too, pooled by `pooling`. readable_only: less what earlier requests of its extract() could not read."""
    paths: list[Path]
    views: list[int]
    tiles: int = 1
    pooling: str = "avg"
    seed: int = 0
    rotation: float = 5.0
    readable_only: bool = False
    tile_pixels: int = 0


def source_requests(train: list[Sample], held_out: list[Sample], model: ModelConfig, recipe: TrainConfig
                    ) -> dict[str, Request]:
    """What a head is fit from (sources.CachedFeatures): each training image's augmented views (its plain one
    without augmentation), and each held-out image's plain view."""
    views = list(range(1, recipe.views + 1)) if recipe.augment and recipe.views > 0 else [0]
    return {"train": Request([s.path for s in train], views, model.tiles, model.pooling, recipe.seed,
                             recipe.rotation, tile_pixels=model.tile_pixels),
            "held out": Request([s.path for s in held_out], [0], model.tiles, model.pooling,
                                tile_pixels=model.tile_pixels)}


@dataclass
class Plan:
    """What a run reads (prepare() makes it): the images drawn, their groups and folds, and the views it needs."""
    data: LabelledData
    settings: Settings
    train: list[Sample]  # drawn from the data for training (with folds: every image cross-validation draws from)
    val: list[Sample]  # validation (none with folds)
    groups: dict[str, int]  # each image with a copy → its duplicate group (checks.duplicate_groups)
    synthetic: list[Sample] = field(default_factory=list)  # rendered negatives: trained on, never held out

    @property
    def training(self) -> list[Sample]:  # the data's, then the rendered ones
        return self.train + self.synthetic

    @property
    def held_out(self) -> list[Sample]:  # with folds, every training image (by the fold that holds it out)
        return self.training if self.settings.recipe.folds > 1 else self.val

    @property
    def test(self) -> list[Sample]:
        return (self.data.splits or {}).get("test") or []

    @cached_property
    def folds(self) -> dict[str, int]:
        """With folds, each training image's fold (1..K, the folds crossval draws); else nothing. Drawn when first
        read: review settles its K only once it knows which images can be read."""
        recipe = self.settings.recipe
        if recipe.folds < 2:
            return {}
        pairs = kfold_samples(self.train, recipe.folds, recipe.seed, class_names=self.data.class_names,
                              groups=self.groups)
        return {str(s.path): k for k, (_, held_out) in enumerate(pairs, start=1) for s in held_out}

    def requests(self, model: ModelConfig | None = None) -> dict[str, Request]:
        """Every view a training run reads, in order (`model`: another tiling's, as a study searches): what its head
        is fit from (cache=False: the live path reads those itself), the plain views that tell copies of trained
        images, and the test split's, as the head scores it and plain."""
        model = model or self.settings.model
        plain = {"views": [0], "readable_only": True}
        cached = self.settings.run.cache
        return (source_requests(self.training, self.held_out, model, self.settings.recipe) if cached else {}) | {
            "trained": Request([s.path for s in self.training], **plain),
            "validated": Request([s.path for s in self.val], **plain),
            "test": Request([s.path for s in self.test], [0], model.tiles, model.pooling,
                            tile_pixels=model.tile_pixels),
            "test plain": Request([s.path for s in self.test], **plain)}


def prepare(data: LabelledData, settings: Settings, *, val: str | Path | None = None, recorded: dict | None = None,
            shard: tuple[int, int] = (0, 1), progress: bool = False) -> Plan:
    """The plan of a run on `data` (see the module). val: a separate validation set; recorded: a resumed run's
    data.json, whose split is kept; shard: this process's (rank, world) under torchrun (ranks())."""
    rank, world = shard
    groups = duplicate_groups((s.path for s in data.samples), progress=progress) if rank == 0 else None
    groups = broadcast(groups, rank) if world > 1 else groups
    model, recipe = settings.model, settings.recipe
    train, validation = choose_split(data, recipe, val, recorded, groups)
    synthetic = synthetic_training_images(data, model, recipe, progress) if rank == 0 else []
    if world > 1 and recipe.synthetic_negatives:  # rendered once, into the shared cache, before the others read them
        dist.barrier()
        synthetic = synthetic or synthetic_training_images(data, model, recipe, False)
    return Plan(data, settings, train, validation, groups, synthetic)


def extract(requests: dict[str, Request], extractor: FeatureExtractor, *, shard: tuple[int, int] = (0, 1),
            skipped: dict[str, str] | None = None, progress: bool = False) -> dict[str, FeatureSet] | None:
    """Each request's features, in order, from the store or computed; skipped: images known to be unreadable, which
    readable_only requests leave out too. shard (rank, world) under torchrun: this rank computes the views of the
    images it owns (owner()) into the shared store, then waits for the others; None (rank 0 then reads them all)."""
    rank, world = shard
    if world > 1 and extractor.store.folder is None:
        requests = {}  # no cache folder (cache=False): no store for the ranks to share, so rank 0 computes alone
    found, unreadable, owners = {}, dict(skipped or {}), {}
    for name, request in requests.items():
        paths = [p for p in request.paths if not (request.readable_only and str(p) in unreadable)
                 and (world == 1 or owners.setdefault(p, owner(p, world)) == rank)]
        found[name] = extractor.extract(paths, views=request.views, seed=request.seed, rotation=request.rotation,
                                        pooling=request.pooling, tiles=request.tiles,
                                        tile_pixels=request.tile_pixels, progress=progress)
        unreadable |= found[name].skipped
    if world == 1:
        return found
    dist.barrier()  # every rank's features are committed
    log.debug("rank %d of %d: features of its share written", rank, world)
    return None


def share(plan: Plan, shard: tuple[int, int], progress: bool = False, search: dict[str, list] | None = None) -> None:
    """Under torchrun, this rank's share of every feature the plan's run reads (`search`: of each backbone and tiling
    a study searches, for its trials and its final model); nothing in a plain process."""
    if shard[1] == 1:
        return
    model = plan.settings.model
    for backbone in (search or {}).get("backbone") or [model.backbone]:
        extractor = make_extractor(model.replace(backbone=backbone), plan.settings.run)
        for tiles in (search or {}).get("tiles") or [model.tiles]:
            extract(plan.requests(model.replace(tiles=tiles)), extractor, shard=shard, progress=progress)


@contextmanager
def ranks(device: str | None, distributed: bool | None = None):
    """((rank, world), the --device this process runs on) for the block: under torchrun (distributed None: when
    launched by it) the ranks' process group is open and a CUDA rank runs on its own GPU; else ((0, 1), device)."""
    if not (launched_by_torchrun() if distributed is None else distributed):
        yield (0, 1), device
        return
    resolved = rank_device(device)
    with process_group(resolved):
        yield rank_and_world(), str(resolved) if resolved.type == "cuda" else device


def owner(path: Path, world: int) -> int:
    """The rank that computes the features of this image, by its content: a hash of its size and first 64 KiB
    (not the whole file's sha256, so that a rank reads only the start of the other ranks' images), so a renamed
    or re-listed image keeps its rank. An unreadable file goes to rank 0, whose run reports it."""
    try:
        with open(path, "rb") as file:
            start = file.read(OWNER_BYTES)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return 0
    return int.from_bytes(hashlib.sha256(size.to_bytes(8, "little") + start).digest()[:8], "little") % world


def make_extractor(model: ModelConfig, run: RunOptions, tuned: dict | None = None) -> FeatureExtractor:
    """The backbone pass of `model` (its backbone, weights and input size; `tuned`: --finetune's stages), where and
    how `run` says."""
    cache_dir = Path(run.cache_dir) if run.cache_dir else default_cache_dir()
    return FeatureExtractor(model.backbone, model.weights, cache_dir=cache_dir if run.cache else None,
                            num_workers=run.num_workers, bf16=run.bf16, image_size=model.image_size,
                            device=run.device, tuned=tuned)


def choose_split(data: LabelledData, recipe: TrainConfig, val: str | Path | None, recorded: dict | None,
                 groups: dict[str, int] | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples: as a resumed run recorded them, a given validation set, the layout's own
    split, everything (cross-validation scores the final model), or a seeded stratified split that keeps each
    duplicate group on one side."""
    if recorded is not None:
        return recorded_split(data, recorded)
    if val is not None:
        train_samples, val_samples = data.samples, load_data(val, class_names=data.class_names).samples
    elif data.splits:
        train_samples, val_samples = data.splits["train"], data.splits["val"]
    else:
        return ((data.samples, []) if recipe.folds > 1 else
                split_samples(data.samples, recipe.val_fraction, recipe.seed, class_names=data.class_names,
                              groups=groups))
    return (train_samples + val_samples, []) if recipe.folds > 1 else (train_samples, val_samples)


def recorded_split(data: LabelledData, record: dict) -> tuple[list[Sample], list[Sample]]:
    """The train/val split a run recorded in data.json, matched against the data as it is now (rendered images
    are left out: synthetic_training_images makes the same ones again)."""
    by_file = {relative(sample.path, data.root): sample for sample in data.samples}
    rows = [row for row in record["split"] if not row.get("synthetic")]
    missing = [row["file"] for row in rows if row["file"] not in by_file]
    if missing:
        raise DataError(f"cannot resume: {len(missing)} files of the recorded split are no longer in {data.root}, "
                        f"e.g. {', '.join(missing[:5])}")
    splits = {"train": [], "val": []}
    for row in rows:
        splits[row["split"]].append(by_file[row["file"]])
    return splits["train"], splits["val"]


def synthetic_training_images(data: LabelledData, model: ModelConfig, recipe: TrainConfig, progress: bool
                              ) -> list[Sample]:
    """recipe.synthetic_negatives rendered negatives (data/demo.py), labelled with the negative class of two-class
    data: the positive class is model.positive, else the class called stop."""
    if not recipe.synthetic_negatives:
        return []
    from ..data.demo import synthetic_negatives  # the scene renderer: off the training path unless asked for

    names = data.class_names
    positive = model.positive_index(names)
    if positive is None:
        raise StopsignError(f"--synthetic-negatives adds images of the negative class of two-class data with a "
                            f"positive class; these data have classes {names}" + ("" if len(names) != 2 else
                            " and none is called stop. Fix: name the positive class with --positive"))
    negative = 1 - positive
    paths = synthetic_negatives(store_dir(SYNTHETIC), recipe.synthetic_negatives, seed=recipe.seed, progress=progress)
    log.info("adding %d rendered %s scenes (other signs, red things) to the training split only",
             len(paths), names[negative])
    return [Sample(path, negative) for path in paths]
