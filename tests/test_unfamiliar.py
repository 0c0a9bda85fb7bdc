"""Photos unlike the training ones (model.signature): the cut-off calibrated on the training images, stored in the
checkpoint, and the marks that predict, evaluate, serve and the report show."""

import csv
import html
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from stopsign import evaluate, load_classifier, train
from stopsign.cli import main
from stopsign.deploy.serve import create_app
from stopsign.model.signature import UNFAMILIAR_SHARE, make_signature, unfamiliar_cutoff
from stopsign.reporting.metrics import Predictions, compute_metrics, evaluation_lines


def write_noise(folder, count: int, seed: int = 99):
    """Per-pixel noise at the training images' size: of another kind than conftest's blocky tinted colour grids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"noise-{index}.png")
    return folder


@pytest.fixture
def trained(tmp_path, make_images, tiny_backbone):
    """best.pt of the tiny backbone trained on tinted grids, and the data: train/val/test splits of that kind."""
    data = make_images(tmp_path / "data", {"train": {"stop": 10, "not_stop": 10}, "val": {"stop": 3, "not_stop": 3},
                                           "test": {"stop": 8, "not_stop": 8}}, layout="splits", size=(48, 40))
    result = train(data, backbone="tiny", out=str(tmp_path / "runs"), progress=False, num_workers=0)
    return result.run_dir / "best.pt", data


def test_unfamiliar_marks_rise_on_photos_of_another_kind(trained, tmp_path):
    checkpoint, data = trained
    classifier = load_classifier(checkpoint, num_workers=0)
    held_out = classifier.predict([str(data / "test")])  # the training kind, never trained on
    other = classifier.predict([str(write_noise(tmp_path / "noise", 12))])
    assert all(0 < row.similarity <= 1 + 1e-6 for row in held_out + other)
    share = {name: np.mean([row.unfamiliar for row in rows]) for name, rows in (("held", held_out), ("other", other))}
    assert share["other"] >= 0.5 and share["other"] > share["held"] + 0.4
    assert np.mean([r.similarity for r in other]) < np.mean([r.similarity for r in held_out])


def test_the_cutoff_is_stored_in_the_checkpoint_and_read_back_and_older_checkpoints_still_predict(trained, tmp_path):
    checkpoint, data = trained
    state = torch.load(checkpoint, weights_only=True)
    cutoff = state["trained_on"]["unfamiliar_below"]
    assert isinstance(cutoff, float) and 0 < cutoff < 1
    assert load_classifier(checkpoint).unfamiliar_below == cutoff
    rows = load_classifier(checkpoint).predict([str(data / "test" / "stop")])
    assert all(row.unfamiliar == (row.similarity < cutoff) for row in rows)
    older = tmp_path / "older.pt"  # a checkpoint written before the cut-off was kept
    signature = {key: value for key, value in state["trained_on"].items() if key != "unfamiliar_below"}
    torch.save(state | {"trained_on": signature}, older)
    older_rows = load_classifier(older).predict([str(data / "test" / "stop")])
    assert [row.similarity for row in older_rows] == pytest.approx([row.similarity for row in rows])
    assert all(row.unfamiliar is None for row in older_rows)
    _, metrics = evaluate(older, data / "test", out=tmp_path / "evals", progress=False, num_workers=0)
    assert "familiarity" not in metrics and metrics["n"] == 16


def test_predict_csv_and_json_have_similarity_and_unfamiliar(trained, tmp_path, capsys):
    checkpoint, data = trained
    noise = write_noise(tmp_path / "noise", 3)
    capsys.readouterr()
    assert main(["-q", "predict", str(checkpoint), str(data / "test" / "stop"), str(noise), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(table[0]) == ["path", "label", "p_not_stop", "p_stop", "error", "similarity", "unfamiliar"]
    assert all(0 < float(row["similarity"]) <= 1.0001 and row["unfamiliar"] in ("true", "false") for row in table)
    assert [row["unfamiliar"] for row in table if "noise" in row["path"]] == ["true"] * 3
    assert main(["-q", "predict", str(checkpoint), str(noise), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(row["unfamiliar"] is True and isinstance(row["similarity"], float) for row in rows)


def test_evaluate_scores_familiar_and_unfamiliar_photos_apart(trained, tmp_path, capsys):
    checkpoint, data = trained
    mixed = tmp_path / "mixed"
    for kind in ("stop", "not_stop"):
        (mixed / kind).mkdir(parents=True)
        for path in (data / "test" / kind).iterdir():
            (mixed / kind / path.name).write_bytes(path.read_bytes())
    write_noise(mixed / "stop", 5)  # labelled stop: unlike anything trained on
    _, metrics = evaluate(checkpoint, mixed, out=tmp_path / "evals", progress=False, num_workers=0)
    sides = metrics["familiarity"]
    assert sides["familiar"]["n"] + sides["unfamiliar"]["n"] == metrics["n"] == 21
    assert sides["unfamiliar"]["n"] >= 5 - 1 and sides["familiar"]["n"] >= 16 - 1
    assert main(["-q", "evaluate", str(checkpoint), str(mixed), "--out", str(tmp_path / "evals")]) == 0
    out = capsys.readouterr().out
    assert f"{sides['unfamiliar']['n']} of the 21 images are unlike the training photos" in out
    assert "familiar accuracy" in out and "unfamiliar accuracy" in out


def test_the_run_and_its_report_count_the_unfamiliar_validation_and_test_photos(trained):
    checkpoint, _ = trained
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert metrics["familiarity"]["familiar"]["n"] + metrics["familiarity"]["unfamiliar"]["n"] == metrics["n"] == 6
    assert metrics["test"]["familiarity"]["familiar"]["n"] + metrics["test"]["familiarity"]["unfamiliar"]["n"] == 16
    report = html.unescape((checkpoint.parent / "report.html").read_text())
    assert "of these 6 photos" in report and "of the test split's 16 photos" in report


def test_serve_answers_and_its_page_mark_unfamiliar_photos(trained, tmp_path):
    checkpoint, data = trained
    client = TestClient(create_app(checkpoint))
    familiar = client.post("/predict", content=(data / "train" / "stop" / "train-stop-0.png").read_bytes()).json()
    unlike = client.post("/predict", content=(write_noise(tmp_path / "noise", 1) / "noise-0.png").read_bytes()).json()
    assert familiar["unfamiliar"] is False and familiar["similarity"] > 0.99
    assert unlike["unfamiliar"] is True and unlike["similarity"] < client.get("/model").json()["unfamiliar_below"]
    assert "unlike the training photos" in client.get("/").text


def test_the_cutoff_leaves_out_copies_as_neighbours():
    """Without the duplicate groups, each of a pair of copies is the other's nearest image and the cut-off rises."""
    rng = np.random.default_rng(0)
    photos = rng.normal(size=(40, 16))
    features = np.concatenate([photos, photos + 0.01 * rng.normal(size=photos.shape)])  # each photo and its copy
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    digests = [f"d{i}" for i in range(80)]
    grouped = unfamiliar_cutoff(unit, digests, groups=list(range(40)) * 2)
    assert unfamiliar_cutoff(unit, digests) > 0.99 > grouped
    copies = np.arange(80)[:, None] % 40 == np.arange(80) % 40  # itself and its copy
    nearest = np.where(copies, -np.inf, unit @ unit.T).max(axis=1)
    assert grouped == pytest.approx(np.quantile(nearest, UNFAMILIAR_SHARE), abs=1e-6)
    stored = make_signature(digests, features, list(range(40)) * 2)["unfamiliar_below"]  # of float16 features
    assert stored == pytest.approx(grouped, abs=1e-3)
    assert make_signature(digests[:1], features[:1])["unfamiliar_below"] is None  # no neighbour, no cut-off


def test_accuracy_is_scored_on_each_side():
    predictions = Predictions([f"{i}.png" for i in range(6)], [1, 1, 0, 0, 1, 0],
                              [[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9], [0.9, 0.1], [0.6, 0.4]], ["a", "b"],
                              unfamiliar=[False, False, False, False, True, True])
    metrics = compute_metrics(predictions)
    assert metrics["familiarity"]["familiar"]["n"] == 4 and metrics["familiarity"]["familiar"]["accuracy"] == 0.75
    assert metrics["familiarity"]["unfamiliar"]["n"] == 2 and metrics["familiarity"]["unfamiliar"]["accuracy"] == 0.5
    assert evaluation_lines(metrics)[-1].startswith("2 of the 6 images are unlike the training photos (similarity "
                                                    "below the model's cut-off): familiar accuracy 0.750 (95% CI")
