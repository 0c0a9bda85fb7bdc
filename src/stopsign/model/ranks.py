"""A process under torchrun: its rank and the world's size, the device it runs on (with CUDA, the GPU of its
LOCAL_RANK), the ranks' process group (NCCL on CUDA, gloo otherwise) and rank 0's value sent to the others.
What the ranks compute is their callers' (training/plan.py, inference/distributed.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .devices import resolve_device

# A barrier waits for the slowest rank's whole extraction, which may take hours on a large set.
BARRIER_TIMEOUT = timedelta(days=2)


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


def broadcast(value, rank: int):
    """Rank 0's `value`, on every rank."""
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
