"""Pooling and the head's forward: every pooling of a backbone's last feature map in one pass (AllPoolings; from
tiles' feature maps to a head's input, AllPoolings.image_features),
one pooling of it (pooled), tiles combined into one row per image (combine_tiles), the regions head's forward
(region_logits, RegionHead), what a head scores each region or feature-map cell by (score_weights), a new head for
a pooling (make_head), and a frozen backbone with its head as one model (FrozenBackboneClassifier).

FrozenBackboneClassifier lives here, not with the registry: it is the forward from a backbone pass to logits
(the pass's `pooled` slot into the head), needs any trunk but nothing of how one is found or loaded, and so
sits beside the pieces it composes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import POOLINGS
from .transforms import REGIONS, quarters

GEM_POWER = 3.0  # generalised-mean pooling's p (Radenović et al.): between the average (1) and the max (∞)
# Where each pooling sits in a backbone pass's output (N, STORED, C): regions is several rows.
SLOTS = {"avg": 0, "max": 1, "gem": 2, "regions": slice(3, 3 + REGIONS)}
STORED = 3 + REGIONS
assert tuple(SLOTS) == POOLINGS, "config.POOLINGS must list the poolings a backbone pass computes"


class AllPoolings(nn.Module):
    """A trunk, then every pooling of its last feature map at once, in SLOTS order (avg, max, gem, then the max
    of each region): one backbone pass gives them all, so trying another costs no forward."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_maps(images))

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's last feature maps (N, C, h, w); a trunk that pools by itself gives 1×1 maps."""
        maps = self.trunk(images)
        return maps[:, :, None, None] if maps.dim() == 2 else maps

    @staticmethod
    def image_features(maps: torch.Tensor, images: int, pooling: str) -> torch.Tensor:
        """What a head is fed (images, width) from the last feature maps of each image's tiles (images × T, C, h, w),
        as model/features.py stores and combines them: one pooling of each map, the tiles combined."""
        features = pooled(AllPoolings.pool(maps), pooling)
        return combine_tiles(features.reshape(images, -1, features.shape[1]), pooling)

    @staticmethod
    def pool(maps: torch.Tensor) -> torch.Tensor:
        """Every pooling of feature maps (N, C, h, w): (N, STORED, C)."""
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

    def region_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Each region's score (N, R) as the head ranks them (score_weights): the positive class's log-odds, else
        the predicted class's logit. What an explanation shows, and an exported model's second output."""
        weight, bias = self._ranking(features)
        regions = features.reshape(features.shape[0], -1, self.in_features)
        return (regions @ weight[:, :, None])[..., 0] + bias[:, None]

    def cell_scores(self, maps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Each cell's score (N, T, h, w) of the last feature maps (N × T, C, h, w) of each image's T tiles, as
        region_scores scores a region: a class activation map per tile (Zhou et al., 2016), which an exported
        model's explanation outlines."""
        weight, bias = self._ranking(features)
        count = maps.shape[0] // features.shape[0]
        weight = weight[:, None].expand(-1, count, -1).reshape(-1, weight.shape[1])
        bias = bias[:, None].expand(-1, count).reshape(-1)
        cells = torch.einsum("nchw,nc->nhw", maps, weight) + bias[:, None, None]
        return cells.reshape(features.shape[0], count, *cells.shape[1:])

    def _ranking(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the weights (N, C) and bias (N,) a region or cell is scored by (score_weights)."""
        if self.positive is not None:
            weight, bias = score_weights(self, self.positive, 0)
            return weight[None].expand(features.shape[0], -1), bias.expand(features.shape[0])
        predicted = self(features).argmax(dim=1)
        return self.weight[predicted], self.bias[predicted]


def score_weights(head: nn.Linear, positive: int | None, predicted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight vector (C,) and bias that score one region's, or one feature-map cell's, C features as the head
    ranks them: the log-odds of the positive class for two classes with a positive class (RegionHead's ranking),
    else the logit of the predicted class. Applied to every cell of a last feature map, this is a class activation
    map (Zhou et al., 2016): exact for a linear head on average pooling, and for max-pooled regions it says which
    cells the region's score came from."""
    if positive is not None and head.out_features == 2:
        other = 1 - positive
        return head.weight[positive] - head.weight[other], head.bias[positive] - head.bias[other]
    return head.weight[predicted], head.bias[predicted]


def make_head(num_features: int, num_classes: int, pooling: str, positive: int | None = None) -> nn.Linear:
    """A new head for features of this pooling (num_features: the backbone's width C); `positive`: see RegionHead."""
    if pooling == "regions":
        return RegionHead(num_features, num_classes, positive if num_classes == 2 else None)
    return nn.Linear(num_features, num_classes)


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
