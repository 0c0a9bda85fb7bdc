"""`torchrun --nproc-per-node N [--nnodes M ...] -m stopsign train|tune DATA ...`: the backbone pass spread over
processes.

Every rank reads the same listing and draws the same split (rank 0 finds the duplicate groups the split keeps
together and sends them to the others), then computes the features of its own share of the images, an image
going to a rank by a hash of its content (owner()), into the shared feature store (store.py: each process appends
to shards of its own, so ranks never write one file). After a barrier, rank 0 runs train() as a single process
would: every feature it asks for is in the store, so it trains the head and writes the run folder and the
report alone, and its results are the single-process run's. The other ranks exit 0 at the barrier. A rank that
is killed takes the job down (torchrun's default); the next run computes only what no rank had committed.
`tune` works the same way: the ranks extract the views the study's folds need, then rank 0 runs tune().

gloo on the CPU, NCCL on CUDA (each rank on the GPU of its LOCAL_RANK); only small Python objects (the groups,
predictions) travel between ranks, the features go through the store, so the shared --cache-dir (or
$STOPSIGN_CACHE) must be one folder for all nodes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..data.checks import duplicate_groups
from ..data.datasets import LabelledData, Sample, load_data
from ..files import read_json
from ..model.devices import resolve_device
from .trainer import (RunResult, choose_split, make_extractor, recorded_data, resolve_config,
                      synthetic_training_images, train)

log = logging.getLogger(__name__)

# A barrier waits for the slowest rank's whole extraction, which may take hours on a large set.
BARRIER_TIMEOUT = timedelta(days=2)
OWNER_BYTES = 1 << 16


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_by_torchrun() -> bool:
    return rank_and_world()[1] > 1 and "MASTER_ADDR" in os.environ


def rank_device(device: str | None) -> torch.device:
    """The device a rank runs on: `device` resolved, and with CUDA the GPU of this rank's LOCAL_RANK."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return resolved


@contextmanager
def process_group(device: torch.device):
    """The ranks' process group for the block: NCCL when the ranks run on CUDA, gloo otherwise."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def owner(path: Path, world: int) -> int:
    """The rank that computes the features of this image, by its content: a hash of its size and first 64 KiB
    (not the whole file's sha256, so that a rank reads only the start of the other ranks' images), so a renamed
    or re-listed image keeps its rank. An unreadable file goes to rank 0, whose train() reports it."""
    try:
        with open(path, "rb") as file:
            start = file.read(OWNER_BYTES)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return 0
    return int.from_bytes(hashlib.sha256(size.to_bytes(8, "little") + start).digest()[:8], "little") % world


def broadcast(value, rank: int):
    """Rank 0's `value`, on every rank."""
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def feature_requests(train_samples: list[Sample], val_samples: list[Sample], test_samples: list[Sample],
                     config: TrainConfig) -> list[tuple[list[Sample], list[int], int]]:
    """(samples, views, tiles) of every extraction train() makes, so that the ranks compute exactly those:
    trainer.make_source (augmented views of training images; the plain view of held-out ones), trainer.
    describe_training (plain, whole image) and trainer.score_test (plain)."""
    augmented = list(range(1, config.views + 1)) if config.augment and config.views > 0 else [0]
    held_out = train_samples if config.folds > 1 else val_samples
    return [(train_samples, augmented, config.tiles), (held_out, [0], config.tiles),
            (train_samples + val_samples, [0], 1), (test_samples, [0], config.tiles)]


def distributed_train(data: str | Path | None = None, *, val: str | Path | None = None,
                      config: TrainConfig | None = None, resume: str | Path | None = None, progress: bool = True,
                      **overrides) -> RunResult | None:
    """train() under torchrun (see the module): rank 0's RunResult; None on the other ranks."""
    rank, world = rank_and_world()
    config, run_dir = resolve_config(config, overrides, resume)
    device = rank_device(config.device)
    if device.type == "cuda":
        config = config.replace(device=str(device))
    progress = progress and rank == 0
    with process_group(device):
        data = data if data is not None else recorded_data(run_dir)
        data = data if isinstance(data, LabelledData) else load_data(data)
        groups = broadcast(duplicate_groups(s.path for s in data.samples) if rank == 0 else None, rank)
        recorded = read_json(run_dir / "data.json") if resume and (run_dir / "data.json").is_file() else None
        train_samples, val_samples = choose_split(data, config, val, recorded, groups)
        if rank == 0:  # rendered once, into the shared cache, before the others read them
            synthetic_training_images(data, config, progress)
        dist.barrier()
        train_samples = train_samples + synthetic_training_images(data, config, False)
        test_samples = (data.splits or {}).get("test") or []
        extractor = make_extractor(config)
        if config.cache:
            ranks = {s.path: owner(s.path, world) for s in train_samples + val_samples + test_samples}
            for samples, views, tiles in feature_requests(train_samples, val_samples, test_samples, config):
                mine = [s.path for s in samples if ranks[s.path] == rank]
                extractor.extract(mine, views=views, seed=config.seed, rotation=config.rotation, tiles=tiles,
                                  progress=progress)
            log.debug("rank %d of %d: features of its share written", rank, world)
        dist.barrier()  # every rank's features are committed
    if rank != 0:
        return None
    if resume:  # the run's own settings, and the overrides train() checks against them
        return train(data, val=val, resume=resume, progress=progress, **overrides)
    return train(data, val=val, config=config, progress=progress)


def distributed_tune(data: str | Path, *, folds: int | None = None, resume: str | Path | None = None,
                     progress: bool = True, **options) -> object | None:
    """tune() under torchrun: every rank extracts its share of what the study reads (each image's plain view
    and MAX_VIEWS augmented views, as tune.tune's CachedFeatures asks), then rank 0 tunes; None on the others."""
    from .tune import MAX_VIEWS, reopen_tune_folder, tune  # optuna: only for tune

    rank, world = rank_and_world()
    fixed = {k: v for k, v in options.items() if k not in ("trials", "timeout", "final", "search")}
    data = data if isinstance(data, LabelledData) else load_data(data)
    samples = data.splits["train"] + data.splits["val"] if data.splits else data.samples  # as tune() reads them
    if resume:
        config = reopen_tune_folder(Path(resume), data, samples)[1]
    else:
        config = TrainConfig().replace(folds=folds or 5, **fixed)
    device = rank_device(config.device)
    if device.type == "cuda":
        options["device"] = str(device)
    progress = progress and rank == 0
    with process_group(device):
        ranks = {s.path: owner(s.path, world) for s in samples}
        search = options.get("search") or {}
        for backbone in search.get("backbone") or [config.backbone]:  # and every feature choice the study searches
            extractor = make_extractor(config.replace(backbone=backbone, device=str(device)))
            for tiling in search.get("tiles") or [config.tiles]:
                study = config.replace(views=max(MAX_VIEWS, config.views), folds=max(2, config.folds), tiles=tiling)
                for chosen, views, tiles in feature_requests(samples, [], [], study):
                    extractor.extract([s.path for s in chosen if ranks[s.path] == rank], views=views,
                                      seed=config.seed, rotation=config.rotation, tiles=tiles, progress=progress)
        dist.barrier()
    if rank != 0:
        return None
    return tune(data, folds=folds, resume=resume, progress=progress, **options)
