"""Which device the backbone (and an SGD head) runs on, and what that device wants: `--device auto|cpu|cuda|
cuda:N|mps`. auto is the first CUDA GPU when PyTorch sees one, else the CPU (MPS only when asked: its kernels
differ from the CPU's more than CUDA's, and Apple machines train fine on the CPU).

On the CPU nothing changes from stopsign without this module: float32, 8 views a backbone call, the decode
workers asked for. On CUDA the pass autocasts (bf16 where the GPU has it, else fp16), uses channels_last (as the
CPU does), pinned host memory, a batch sized to the GPU's memory and decode workers sized to the CPU's cores.
torch_threads sets torch's CPU thread count for a block (a source's `threads`), for every fitter alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..config import available_cores
from ..errors import StopsignError

CPU_FORWARD_CHUNK = 8  # views per backbone call on the CPU: see model/features.py
# What one 224×224 view costs a backbone pass in GPU memory under autocast, generously (efficientnet_lite2's
# activations at fp16 are ~12 MB, resnet18's ~8 MB); the batch is a quarter of free memory over this, so the
# decode workers' pinned buffers and the allocator's slack fit too.
VIEW_BYTES_224 = 24 << 20
GPU_BATCH_RANGE = (32, 1024)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch.device `name` means, or a StopsignError that names the fix when this machine has none."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise StopsignError("--device mps: this PyTorch sees no Apple GPU (MPS needs macOS 12.3+ on Apple "
                                "silicon). Fix: use --device cpu")
        return torch.device("mps")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise StopsignError(f"--device {name}: PyTorch sees no CUDA GPU (torch {torch.__version__}, {build}). "
                                "Fix: install a CUDA build of PyTorch (pytorch.org/get-started), check nvidia-smi "
                                "and CUDA_VISIBLE_DEVICES, or use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise StopsignError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                f"numbered from 0. Fix: --device cuda:0 … cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    raise StopsignError(f"--device {name!r} is not a device. Fix: auto, cpu, cuda, cuda:N or mps")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the backbone pass's autocast: bf16 on a CUDA GPU that has it, else fp16; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def forward_chunk(device: torch.device, image_size: int) -> int:
    """Views per backbone call: 8 on the CPU (cache-sized), on CUDA as many as a quarter of free memory holds."""
    if device.type != "cuda":
        return CPU_FORWARD_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    per_view = VIEW_BYTES_224 * (image_size / 224) ** 2
    low, high = GPU_BATCH_RANGE
    return int(min(high, max(low, free // 4 // per_view)))


def decode_workers(device: torch.device, asked: int) -> int:
    """DataLoader workers: as asked on the CPU (they share its cores with the backbone); on a GPU, where the CPU
    only decodes, at least one per core but one (up to 16)."""
    if device.type == "cpu":
        return asked
    return max(asked, min(16, available_cores() - 1))


def cache_suffix(device: torch.device) -> str:
    """What the feature cache's key adds for features that are not the CPU's float32 ones (autocast's, MPS's)."""
    dtype = autocast_dtype(device)
    if dtype is not None:
        return f"-{device.type}-{str(dtype).removeprefix('torch.')}"
    return "" if device.type == "cpu" else f"-{device.type}"


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: unchanged) for the block, then restored."""
    previous = torch.get_num_threads()
    if not threads or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
