"""choose(): which new photos to label first: uncertain ones, unlike each other and what is labelled, from both
predicted classes."""

import numpy as np

from stopsign.training.choose import choose


def two_class(p_stop) -> np.ndarray:
    p_stop = np.asarray(p_stop, dtype=float)
    return np.stack([1 - p_stop, p_stop], axis=1)


def test_a_batch_holds_both_predicted_classes_where_uncertainty_alone_takes_one():
    rng = np.random.default_rng(0)
    probabilities = two_class(np.r_[rng.uniform(0.40, 0.49, 30), rng.uniform(0.9, 0.95, 6)])  # 30 unsure, 6 sure
    features = rng.normal(size=(36, 16))
    least_certain_first = np.argsort(np.abs(probabilities[:, 1] - 0.5))[:6]
    assert (probabilities[least_certain_first].argmax(1) == 0).all()  # what uncertainty alone would ask for
    first = choose(probabilities, features, k=6)
    assert np.bincount(probabilities[first].argmax(1), minlength=2).tolist() == [3, 3]
    assert choose(two_class(rng.uniform(0.4, 0.49, 5)), rng.normal(size=(5, 4)), k=3).shape == (3,)  # one class


def test_near_copies_wait_until_unlike_photos_are_chosen():
    rng = np.random.default_rng(1)
    scene = rng.normal(size=16)
    copies = scene + 0.01 * rng.normal(size=(8, 16))  # eight frames of one scene, the least certain photos
    others = rng.normal(size=(8, 16))
    probabilities = two_class(np.r_[np.full(8, 0.49), np.full(8, 0.40)])
    order = choose(probabilities, np.vstack([copies, others]), k=6)
    assert (order < 8).sum() == 1 and order[0] < 8  # one frame of the scene, first, then other photos
    labelled = choose(probabilities, np.vstack([copies, others]), labelled=scene[None], k=6)
    assert (labelled < 8).sum() == 0  # the scene is labelled already: none of its frames is asked for


def test_the_order_is_deterministic_and_covers_every_photo():
    rng = np.random.default_rng(2)
    probabilities = two_class(rng.uniform(size=40))
    features, labelled = rng.normal(size=(40, 8)), rng.normal(size=(10, 8))
    order = choose(probabilities, features, labelled)
    assert sorted(order.tolist()) == list(range(40))
    assert np.array_equal(order, choose(probabilities.copy(), features.copy(), labelled.copy()))
    assert np.array_equal(choose(probabilities, features, labelled, k=12), order[:12])  # any first K: a prefix
    tied = choose(two_class(np.full(4, 0.5)), np.eye(4))
    assert tied.tolist() == [0, 1, 2, 3]  # equal scores: the lower index first
