"""choose(): the order in which to label new photos, so that any first K of them make a useful batch.

Uncertainty alone (least certain first) spends a batch on one side of the boundary and on near-copies of one
scene: on a new source it took 49 of 50 from one class. This is batch-mode active learning by uncertainty-weighted
k-center greedy (Sener & Savarese's core-set rule, its distances weighted by the margin's uncertainty) with the
picks taken in turn from each predicted class:

- uncertainty: 1 - (p_first - p_second), the margin between the two likeliest classes;
- distance: the cosine distance of the L2-normalised features to the nearest labelled or already chosen photo,
  so a near-copy of a chosen photo scores about zero and waits until the end;
- balance: each pick comes from the predicted class with the fewest picks so far (the highest score breaks a
  tie), and within it the highest uncertainty × distance wins; ties go to the lower index, so the order is
  deterministic.
"""

from __future__ import annotations

import numpy as np

# Added to the uncertainty so that photos the model is sure of (a margin of exactly 1) are still ordered by distance.
FLOOR = 1e-3


def choose(probabilities: np.ndarray, features: np.ndarray, labelled: np.ndarray | None = None,
           k: int | None = None) -> np.ndarray:
    """The indices of the first `k` candidates to label (default: all of them), in the order to label them.

    probabilities: (N, C) of the candidates; features: (N, D) of the candidates; labelled: (M, D) of the photos
    already labelled (None or M = 0: none yet).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    count = len(probabilities)
    k = count if k is None else min(k, count)
    top = np.sort(probabilities, axis=1)[:, ::-1]
    weight = 1.0 - (top[:, 0] - top[:, 1] if probabilities.shape[1] > 1 else 0.0) + FLOOR
    predicted = probabilities.argmax(1)
    vectors = normalised(features)
    # The N × N similarities once (one BLAS product), then each pick updates the distances from its own row.
    similarity = vectors @ vectors.T
    distance = np.ones(count)  # nothing labelled: every photo equally far, so uncertainty alone picks first
    if labelled is not None and len(labelled):
        distance = 1.0 - (vectors @ normalised(labelled).T).max(1)
    distance = np.maximum(distance, 0.0)
    picks_per_class = np.zeros(probabilities.shape[1], dtype=int)
    left = np.ones(count, dtype=bool)
    order = []
    for _ in range(k):
        score = np.where(left, weight * distance, -np.inf)
        classes = np.unique(predicted[left])
        fewest = classes[picks_per_class[classes] == picks_per_class[classes].min()]
        best = {c: int(np.argmax(np.where(predicted == c, score, -np.inf))) for c in fewest}
        pick = max(best.values(), key=lambda i: (score[i], -i))
        order.append(pick)
        left[pick] = False
        picks_per_class[predicted[pick]] += 1
        distance = np.minimum(distance, np.maximum(1.0 - similarity[pick], 0.0))
    return np.array(order, dtype=int)


def normalised(features: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero): dot products are then cosine similarities."""
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
