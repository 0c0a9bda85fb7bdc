"""The decision threshold chosen out of fold in training: what it maximises, where it is stored, and that predict,
evaluate and exports decide with it unless told another."""

import json
import threading
import time

import numpy as np
import pytest

from stopsign import evaluate, load_classifier, train
from stopsign.deploy.export import export
from stopsign.training import heads, trainer
from stopsign.training.threshold import choose_threshold
from conftest import make_image


def test_the_threshold_maximises_balanced_accuracy_and_does_not_jump_with_noise():
    # 90 negatives below 0.4, 10 positives from 0.3: at 0.5 six positives are missed
    y = np.array([0] * 90 + [1] * 10)
    p = np.r_[np.linspace(0.0, 0.39, 90), np.linspace(0.30, 0.60, 10)]
    chosen = choose_threshold(y, p)
    assert chosen["oof_at_0.5_recall"] == pytest.approx(0.4)

    def balanced(t):
        decided = p >= t
        return (decided[y == 1].mean() + (~decided[y == 0]).mean()) / 2

    assert balanced(chosen["value"]) == pytest.approx(chosen["oof_balanced_accuracy"])
    assert chosen["oof_balanced_accuracy"] > chosen["oof_at_0.5_balanced_accuracy"] + 0.15
    assert chosen["oof_balanced_accuracy"] >= max(balanced(t) for t in np.linspace(0, 1, 1001)) - 0.03
    noisy = np.clip(p + np.random.default_rng(0).normal(0, 0.005, len(p)), 0, 1)
    assert abs(choose_threshold(y, noisy)["value"] - chosen["value"]) < 0.02


def test_separable_scores_keep_the_threshold_nearest_one_half():
    y = np.array([0] * 20 + [1] * 20)
    p = np.r_[np.linspace(0.0, 0.2, 20), np.linspace(0.8, 1.0, 20)]
    assert choose_threshold(y, p)["value"] == pytest.approx(0.5)


def test_a_target_recall_gives_the_largest_threshold_that_reaches_it():
    y = np.array([0] * 10 + [1] * 10)
    p = np.r_[np.linspace(0.0, 0.5, 10), np.linspace(0.1, 1.0, 10)]
    chosen = choose_threshold(y, p, target_recall=0.9)
    assert chosen["oof_recall"] >= 0.9 and "recall" in chosen["rule"]
    assert (p[y == 1] >= chosen["value"]).mean() >= 0.9
    assert choose_threshold(y, p, target_recall=0.8)["value"] > chosen["value"]


def add_new_source(root, count: int) -> None:
    """Photos of a 'new source': stop signs whose tint is nearer the not_stop class's, labelled stop."""
    for k in range(count):
        make_image(5000 + k, (32, 32), (90, 110, 60)).save(root / "stop" / f"new-stop-{k}.png")


@pytest.fixture
def imbalanced(tmp_path, make_images):
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 32}, layout="folders")
    add_new_source(data, 6)
    return data


def test_training_stores_the_threshold_and_predict_uses_it_unless_told_another(imbalanced, tmp_path, tiny_backbone):
    result = train(imbalanced, backbone="tiny", out=str(tmp_path / "runs"), progress=False, num_workers=0,
                   val_fraction=0.2)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    chosen = summary["threshold"]
    assert chosen["rule"] == "balanced accuracy out of fold" and chosen["images"] > 30
    assert chosen["oof_balanced_accuracy"] >= chosen["oof_at_0.5_balanced_accuracy"]
    classifier = load_classifier(result.run_dir / "best.pt")
    assert classifier.threshold == pytest.approx(chosen["value"])
    rows = classifier.predict([str(imbalanced)])
    p_stop = np.array([r.probabilities["stop"] for r in rows])
    assert [r.label == "stop" for r in rows] == list(p_stop >= chosen["value"])  # decided as recorded
    assert [r.label == "stop" for r in classifier.predict([str(imbalanced)], threshold=0.99)] == list(p_stop >= 0.99)
    out, metrics = evaluate(result.run_dir / "best.pt", imbalanced, out=str(tmp_path / "evals"), progress=False)
    assert metrics["threshold"] == pytest.approx(chosen["value"])
    exported, _ = export(result.run_dir / "best.pt", format="onnx")
    onnx = load_classifier(exported)
    assert onnx.threshold == pytest.approx(chosen["value"])
    assert [r.label for r in onnx.predict([str(imbalanced)])] == [r.label for r in rows]


def test_added_photos_of_a_new_source_move_the_threshold(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 32}, layout="folders")
    settings = dict(backbone="tiny", progress=False, num_workers=0, val_fraction=0.2)
    before = train(data, out=str(tmp_path / "before"), **settings)
    add_new_source(data, 8)
    after = train(data, out=str(tmp_path / "after"), **settings)
    old, new = (json.loads((run.run_dir / "summary.json").read_text())["threshold"] for run in (before, after))
    assert new["images"] > old["images"] + 4  # chosen again, over the new photos too
    assert abs(new["value"] - old["value"]) > 0.01
    assert load_classifier(after.run_dir / "best.pt").threshold == new["value"]


@pytest.mark.parametrize("head", ["logistic", "sgd"])
def test_a_logistic_heads_threshold_folds_run_beside_its_final_fit(imbalanced, tmp_path, tiny_backbone, monkeypatch,
                                                                   head):
    """They need only the chosen C and class weight, so they start before the final fit, on another thread; the
    threshold they give is the one a run stores. An SGD head's folds share the source's batches: after its fit."""
    calls, choose = [], trainer.out_of_fold_threshold

    def spy(*args, **kwargs):
        calls.append((threading.current_thread() is threading.main_thread(), args[6], choose(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(trainer, "out_of_fold_threshold", spy)
    sgd = {"pooling": "avg", "tiles": 1, "epochs": 2} if head == "sgd" else {}
    result = train(imbalanced, backbone="tiny", out=str(tmp_path / "runs"), progress=False, num_workers=0,
                   val_fraction=0.2, head=head, **sgd)
    (on_main, fitted, chosen), = calls
    assert on_main == (head == "sgd")
    if head == "logistic":
        row, = result.history
        assert fitted == {"C": row["C"], "class_weight": row["class_weight"]}
    stored = json.loads((result.run_dir / "summary.json").read_text())["threshold"]
    assert stored == chosen and load_classifier(result.run_dir / "best.pt").threshold == chosen["value"]


def test_no_more_fits_run_at_once_than_the_slots_allow(imbalanced, tmp_path, tiny_backbone, monkeypatch):
    """The final fit and the threshold's fold fits share heads.FIT_SLOTS (one per core): a third fit on two cores
    only slows the other two. Here 4 fold threads beside the final fit, and 2 slots."""
    monkeypatch.setattr(heads, "available_cores", lambda: 4)
    monkeypatch.setattr(heads, "FIT_SLOTS", threading.BoundedSemaphore(2))
    running, most, lock, fit = [0], [0], threading.Lock(), heads.RegionLogistic.fit

    def counted(self, *args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # long enough for the others to start, were they allowed
        try:
            return fit(self, *args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(heads.RegionLogistic, "fit", counted)
    train(imbalanced, backbone="tiny", out=str(tmp_path / "runs"), progress=False, num_workers=0, val_fraction=0.2)
    assert most[0] == 2
