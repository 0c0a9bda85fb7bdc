"""`torchrun ... -m stopsign predict MODEL IMAGES`: each rank predicts every WORLD_SIZE-th input file, and rank 0
gathers the rows and returns them in input order (the other ranks return None and print nothing)."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from ..model.ranks import process_group, rank_and_world, rank_device
from .base import Classifier, Prediction, expand_inputs
from .load import load_classifier


def predict_sharded(model, images, *, threshold: float | None = None, progress: bool = False, device: str = "auto",
                    **options) -> tuple[Classifier, list[Prediction] | None]:
    """The classifier and, on rank 0, the rows of all ranks in the order a single process gives them."""
    rank, world = rank_and_world()
    device = rank_device(device)
    classifier = load_classifier(model, device=str(device), **options)
    inputs = images if isinstance(images, (list, tuple)) else [images]
    names: dict[str, str] = {}  # local copy → the URL it came from, as Classifier.predict names rows
    paths = expand_inputs(inputs, names)
    if not paths:
        return classifier, classifier.predict(inputs)  # raises the single-process error: no image found
    with process_group(device if device.type == "cuda" else rank_device("cpu")):
        share = paths[rank::world]
        rows = classifier.predict(share, threshold=threshold, progress=progress and rank == 0) if share else []
        rows = [dataclasses.replace(row, path=names.get(row.path, row.path)) for row in rows]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
    if rank != 0:
        return classifier, None
    return classifier, [gathered[i % world][i // world] for i in range(len(paths))]
