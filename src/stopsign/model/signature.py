"""What a model was trained on, compactly: which evaluated images are copies of it, and which are unlike it.

A checkpoint keeps the sha256 of every training image (exact copies) and its pooled plain-view backbone
features in float16 (near copies: re-encoded, resized or lightly cropped). Cosine similarity of these features
separates copies from new photos far better than a pixel hash: on the 197 shared photos with
efficientnet_lite0, the copies the duplicate checks find score >= 0.977 against each other, while the most
similar pair of different photos scores 0.873. NEAR_COPY sits between.

The same similarity, to the nearest training image, says how familiar a photo is. Below the signature's
`unfamiliar_below` cut-off a photo is unlike anything the model was trained on, so the validation figures do
not vouch for its prediction (a stop-sign model shown a cat still answers stop or not stop, often confidently).
The cut-off is calibrated out of fold: each training image is held out against the others, as a new photo of the
same kind would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NEAR_COPY = 0.92  # cosine similarity of plain-view features at or above which an image is a near copy
UNFAMILIAR_SHARE = 0.01  # the share of held-out training images the cut-off marks unfamiliar
BLOCK = 2048  # rows of a similarity matrix computed at once: bounded memory on tens of thousands of images


@dataclass
class TrainingMatch:
    """How each of some images compares with a model's training images."""

    copies: list[str | None]  # "exact" (its bytes are a training image's), "near" (a near copy), None (new)
    similarity: list[float]  # cosine similarity to the nearest training image's plain-view features
    unfamiliar: list[bool] | None  # similarity below the cut-off; None: the signature keeps none (an older one)


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def make_signature(digests: list[str], features: np.ndarray, groups: list[int | None] | None = None) -> dict:
    """The checkpoint's record of its training images: {"digests": [...], "features": float16 (N, F) tensor,
    "unfamiliar_below": the cut-off (unfamiliar_cutoff), None with fewer than two images apart}. groups: each
    image's duplicate group (None: it has no copy), so that copies are not each other's neighbours."""
    stored = _unit(features).astype(np.float16)
    return {"digests": list(digests), "features": torch.from_numpy(stored),
            "unfamiliar_below": unfamiliar_cutoff(stored.astype(np.float32), digests, groups)}


def unfamiliar_cutoff(unit: np.ndarray, digests: list[str], groups: list[int | None] | None = None) -> float | None:
    """The UNFAMILIAR_SHARE quantile of each training image's similarity to its nearest other training image
    outside its duplicate group (and not of the same bytes): exact and near copies must not count as neighbours,
    or every photo would look familiar. None when no image has a neighbour."""
    group = np.array([-1 - index if number is None else number  # no group: a group of its own
                      for index, number in enumerate(groups or [None] * len(unit))])
    digest = np.array(digests)
    nearest = np.full(len(unit), -np.inf, dtype=np.float32)
    for start in range(0, len(unit), BLOCK):
        rows = slice(start, start + BLOCK)
        block = unit[rows] @ unit.T
        block[(group[rows, None] == group) | (digest[rows, None] == digest)] = -np.inf  # itself and its copies
        nearest[rows] = block.max(axis=1, initial=-np.inf)
    nearest = nearest[np.isfinite(nearest)]
    return float(np.quantile(nearest, UNFAMILIAR_SHARE)) if len(nearest) else None


def nearest_similarity(signature: dict, features: np.ndarray) -> np.ndarray:
    """Each feature row's cosine similarity to the nearest training image of the signature."""
    trained, unit = signature["features"].float().numpy(), _unit(features)
    if not len(trained) or not len(unit):
        return np.zeros(len(unit), dtype=np.float32)
    blocks = (unit[start:start + BLOCK] @ trained.T for start in range(0, len(unit), BLOCK))
    return np.concatenate([block.max(axis=1) for block in blocks])


def match_training(signature: dict | None, digests: list[str], features: np.ndarray) -> list[str | None]:
    """For each image: "exact" (its bytes are a training image's), "near" (a near copy), or None (new).
    Without a signature (an older checkpoint, an exported file) every answer is None."""
    found = compare_with_training(signature, digests, features)
    return found.copies if found else [None] * len(digests)


def compare_with_training(signature: dict | None, digests: list[str] | None, features: np.ndarray
                          ) -> TrainingMatch | None:
    """How each image (its sha256 in `digests`, None for decoded uploads, which then have no exact copies; its
    plain-view features) compares with the training images; None without a signature (a checkpoint before 0.2,
    an exported file)."""
    if not signature:
        return None
    similarity = nearest_similarity(signature, features)
    known = set(signature["digests"])
    copies = ["exact" if digest in known else "near" if value >= NEAR_COPY else None
              for digest, value in zip(digests or [None] * len(similarity), similarity)]
    cutoff = signature.get("unfamiliar_below")  # signatures written before the cut-off have none
    unfamiliar = None if cutoff is None else [bool(value < cutoff) for value in similarity]
    return TrainingMatch(copies, [float(value) for value in similarity], unfamiliar)
