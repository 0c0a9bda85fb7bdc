"""What a model was trained on, compactly, and which evaluated images are copies of it.

A checkpoint keeps the sha256 of every training image (exact copies) and its pooled plain-view backbone
features in float16 (near copies: re-encoded, resized or lightly cropped). Cosine similarity of these features
separates copies from new photos far better than a pixel hash: on the 197 shared photos with
efficientnet_lite0, the copies the duplicate checks find score >= 0.977 against each other, while the most
similar pair of different photos scores 0.873. NEAR_COPY sits between.
"""

from __future__ import annotations

import numpy as np
import torch

NEAR_COPY = 0.92  # cosine similarity of plain-view features at or above which an image is a near copy


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def make_signature(digests: list[str], features: np.ndarray) -> dict:
    """The checkpoint's record of its training images: {"digests": [...], "features": float16 (N, F) tensor}."""
    return {"digests": list(digests), "features": torch.from_numpy(_unit(features).astype(np.float16))}


def match_training(signature: dict | None, digests: list[str], features: np.ndarray) -> list[str | None]:
    """For each image: "exact" (its bytes are a training image's), "near" (a near copy), or None (new).
    Without a signature (an older checkpoint, an exported file) every answer is None."""
    if not signature or not len(digests):
        return [None] * len(digests)
    known = set(signature["digests"])
    trained = signature["features"].float().numpy()
    best = (_unit(features) @ trained.T).max(axis=1) if len(trained) else np.zeros(len(digests))
    return ["exact" if digest in known else "near" if similarity >= NEAR_COPY else None
            for digest, similarity in zip(digests, best)]
