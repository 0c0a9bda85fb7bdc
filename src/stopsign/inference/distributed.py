"""`torchrun ... -m stopsign predict MODEL IMAGES` (load.predict calls it there): each rank predicts every
WORLD_SIZE-th input file, and rank 0 gathers the rows and returns them in input order (the other ranks return None
and print nothing)."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..model.ranks import process_group, rank_and_world, rank_device
from .base import Classifier, Prediction, expand_inputs


def predict_sharded(classifier: Classifier, images, device: torch.device, *, threshold: float | None = None,
                    progress: bool = False, explain=False) -> list[Prediction] | None:
    """On rank 0, the rows of all ranks in the order a single process gives them; None on the others. `device`:
    this rank's (model.ranks.rank_device), the classifier's; `explain`: Classifier.predict's (a folder: every
    rank writes its share of the photos into it)."""
    rank, world = rank_and_world()
    inputs = images if isinstance(images, (list, tuple)) else [images]
    names: dict[str, str] = {}  # local copy → the URL it came from, as Classifier.predict names rows
    paths = expand_inputs(inputs, names)
    if not paths:
        return classifier.predict(inputs)  # raises the single-process error: no image found
    with process_group(device if device.type == "cuda" else rank_device("cpu")):
        share = paths[rank::world]
        rows = (classifier.predict(share, threshold=threshold, progress=progress and rank == 0, explain=explain)
                if share else [])
        rows = [dataclasses.replace(row, path=names.get(row.path, row.path)) for row in rows]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
    if rank != 0:
        return None
    return [gathered[i % world][i // world] for i in range(len(paths))]
