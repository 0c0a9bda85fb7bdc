"""Classifier, load_classifier(), evaluate(): predictions on files, folders and globs; safe loading."""

import json
import pickle

import numpy as np
import pytest
import torch

from stopsign import StopsignError, evaluate, load_classifier, train
from stopsign.errors import CheckpointError


@pytest.fixture
def trained(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, layout="folders")
    result = train(data, backbone="tiny", epochs=8, lr_max=0.1, out=str(tmp_path / "runs"), progress=False,
                   num_workers=0, val_fraction=0.25)
    return result.run_dir / "best.pt", data


def test_predict_files_folders_globs_and_bad_files(trained, tmp_path):
    checkpoint, data = trained
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    classifier = load_classifier(checkpoint)
    results = classifier.predict([str(data / "stop"), str(data / "not_stop" / "not_stop-0.png"),
                                  str(data / "not_stop" / "not_stop-1*.png"), str(broken),
                                  str(tmp_path / "missing.png")])
    assert len(results) == 12 + 1 + 3 + 2
    by_path = {r.path: r for r in results}
    assert by_path[str(broken)].label is None and by_path[str(broken)].error
    assert by_path[str(tmp_path / "missing.png")].error
    good = [r for r in results if r.label]
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-5 for r in good)
    # the head learned the tint: most stop images are called stop
    stops = [r for r in good if "/stop/" in r.path]
    assert sum(r.label == "stop" for r in stops) >= 9


def test_threshold_moves_predictions(trained):
    checkpoint, data = trained
    classifier = load_classifier(checkpoint)
    images = [str(data / "stop"), str(data / "not_stop")]
    assert all(r.label == "stop" for r in classifier.predict(images, threshold=0.0))
    assert all(r.label == "not_stop" for r in classifier.predict(images, threshold=1.0))
    with pytest.raises(StopsignError, match="between 0 and 1"):
        classifier.predict(images, threshold=1.01)


def test_evaluate_writes_metrics_predictions_and_plots(trained, tmp_path):
    checkpoint, data = trained
    out_dir, metrics = evaluate(checkpoint, data, out=tmp_path / "evals", progress=False, num_workers=0)
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved["n"] == 24 and saved["accuracy"] == metrics["accuracy"]
    assert sum(map(sum, saved["confusion"])) == 24
    assert (out_dir / "predictions.csv").read_text().startswith("path,label,predicted,p_not_stop,p_stop")
    assert (out_dir / "plots" / "confusion.png").is_file() and (out_dir / "report.html").is_file()


def test_evaluate_refuses_unknown_labels(trained, tmp_path, make_images):
    checkpoint, _ = trained
    other = make_images(tmp_path / "other", {"cat": 2, "dog": 2}, layout="folders")
    with pytest.raises(StopsignError, match="cat"):
        evaluate(checkpoint, other, out=tmp_path / "evals", progress=False)


class RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"format": "stopsign-checkpoint", "payload": RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(evil)
    assert not marker.exists()


def test_checkpoint_problems_are_named(trained, tmp_path):
    checkpoint, _ = trained
    state = torch.load(checkpoint, weights_only=True)
    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in state.items() if k != "class_names"}, broken)
    with pytest.raises(CheckpointError, match="class_names"):
        load_classifier(broken)
    other = tmp_path / "other.pt"
    torch.save(state | {"weights_sha256": "0" * 64}, other)
    with pytest.raises(CheckpointError, match="--weights"):
        load_classifier(other)
    wrong = tmp_path / "wrong.pt"
    torch.save(state | {"head": {"weight": torch.zeros(2, 5), "bias": torch.zeros(2)}}, wrong)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(wrong)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "nothing.pt")


def test_evaluate_on_training_images_says_so_and_scores_the_new_ones_apart(trained, tmp_path, capsys, monkeypatch):
    checkpoint, data = trained
    # The tiny backbone's 8 features make every tinted grid of a class look alike: count exact copies only.
    monkeypatch.setattr("stopsign.model.signature.NEAR_COPY", 1.01)
    trained_on = torch.load(checkpoint, weights_only=True)["trained_on"]
    split = json.loads((checkpoint.parent / "data.json").read_text())["split"]
    assert len(trained_on["digests"]) == sum(row["split"] == "train" for row in split) == 18
    assert trained_on["features"].dtype == torch.float16 and trained_on["features"].shape == (18, 8)
    _, metrics = evaluate(checkpoint, data, out=tmp_path / "evals", progress=False, num_workers=0)
    copies = metrics["training_copies"]
    assert (copies["exact"], copies["near"], copies["new"]) == (18, 0, 6)
    assert copies["new_images"]["n"] == 6 and 0 <= copies["new_images"]["accuracy"] <= 1
    from stopsign.cli import main

    assert main(["-q", "evaluate", str(checkpoint), str(data), "--out", str(tmp_path / "evals")]) == 0
    out = capsys.readouterr().out
    assert "warning: 18 of the 24 images are training images of this model (18 exact, 0 near copies)" in out
    assert "on the 6 new images: accuracy" in out


def test_near_copies_are_told_apart_from_new_photos_by_feature_similarity():
    from stopsign.model.signature import NEAR_COPY, make_signature, match_training

    rng = np.random.default_rng(0)
    trained = rng.normal(size=(5, 64)).astype(np.float32)
    signature = make_signature([f"d{i}" for i in range(5)], trained)
    copy = trained[2] + 0.05 * rng.normal(size=64)  # re-encoded: cosine about 0.999
    new = rng.normal(size=64)  # a different photo: cosine about 0
    blend = trained[3] * 0.8 + rng.normal(size=64) * 0.8  # cosine well under NEAR_COPY
    marks = match_training(signature, ["d0", "x", "y", "z"], np.stack([trained[0], copy, new, blend]))
    assert marks == ["exact", "near", None, None] and NEAR_COPY == 0.92
    assert match_training(None, ["d0"], trained[:1]) == [None]


def test_predicting_only_unreadable_files_gives_their_reasons_not_a_traceback(trained, tmp_path, capsys):
    checkpoint, _ = trained  # the default recipe: regions of the whole image and a 2×2 grid of tiles
    from stopsign.cli import main

    broken, missing = tmp_path / "broken.jpg", tmp_path / "missing.jpg"
    broken.write_text("not an image")
    rows = load_classifier(checkpoint).predict([str(missing)])
    assert [(r.label, r.error) for r in rows] == [(None, "file not found")]
    assert main(["-q", "predict", str(checkpoint), str(missing), str(broken), "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert [row["error"] for row in json.loads(captured.out)] == ["file not found", "not an image file"]
    assert "none of the 2 files could be read" in captured.err


def test_evaluating_unreadable_data_says_so(trained, tmp_path, make_images):
    checkpoint, _ = trained
    data = make_images(tmp_path / "bad", {"stop": 2, "not_stop": 2}, layout="folders")
    for image in data.rglob("*.png"):
        image.write_text("not an image")
    with pytest.raises(StopsignError, match="none of the 4 images in .* could be read"):
        evaluate(checkpoint, data, out=tmp_path / "evals", progress=False, num_workers=0)


def counting_backbone_loads(monkeypatch) -> list:
    """Patch the backbone loader of feature extraction to record each load: a pass needs one, a cache hit none."""
    from stopsign.model import features

    loads, load = [], features.load_backbone
    monkeypatch.setattr(features, "load_backbone", lambda *args: loads.append(args) or load(*args))
    return loads


def test_a_second_predict_of_the_same_files_runs_no_backbone_and_agrees_with_no_cache(trained, capsys, monkeypatch):
    checkpoint, data = trained
    from stopsign.cli import main

    loads = counting_backbone_loads(monkeypatch)

    def predict(*flags) -> dict:
        assert main(["-q", "predict", str(checkpoint), str(data), "--format", "json", *flags]) == 0
        return {row["path"]: row["probabilities"] for row in json.loads(capsys.readouterr().out)}

    # training cached the plain views of its validation images only: the first predict passes the others
    first = predict()
    assert len(first) == 24 and len(loads) == 1
    second = predict()
    assert len(loads) == 1 and second == first  # every feature read from the cache, the same numbers
    uncached = predict("--no-cache")
    assert len(loads) == 2  # --no-cache: the backbone runs again
    for path, probabilities in uncached.items():
        np.testing.assert_allclose(list(probabilities.values()), list(first[path].values()), atol=1e-5)


def test_a_second_evaluate_of_the_same_data_runs_no_backbone(trained, tmp_path, monkeypatch):
    checkpoint, data = trained
    loads = counting_backbone_loads(monkeypatch)
    _, first = evaluate(checkpoint, data, out=tmp_path / "evals", progress=False, num_workers=0)
    assert len(loads) == 1
    _, second = evaluate(checkpoint, data, out=tmp_path / "evals", progress=False, num_workers=0)
    assert len(loads) == 1 and second["accuracy"] == first["accuracy"] and second["log_loss"] == first["log_loss"]


def test_predict_iter_streams_rows_in_input_order_chunk_by_chunk(trained, monkeypatch):
    checkpoint, data = trained
    classifier = load_classifier(checkpoint)
    asked = []
    probabilities = classifier.probabilities
    monkeypatch.setattr(classifier, "probabilities",
                        lambda paths, progress=False: asked.append(len(paths)) or probabilities(paths, progress))
    rows = classifier.predict_iter([str(data / "stop"), str(data / "not_stop")], chunk=5)
    first = next(rows)
    assert asked == [5] and first.path.endswith("stop-0.png")  # one chunk read, its first row out
    rest = list(rows)
    assert asked == [5, 5, 5, 5, 4] and len(rest) == 23
    assert [r.path for r in [first, *rest]] == [r.path for r in classifier.predict([str(data / "stop"),
                                                                                     str(data / "not_stop")])]
    with pytest.raises(StopsignError, match="between 0 and 1"):
        next(classifier.predict_iter([str(data / "stop")], threshold=2.0))
