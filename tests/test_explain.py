"""Where the model looked (inference/explain.py): region boxes, the class activation map's box, predict --explain,
serve's box."""

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stopsign import StopsignError, evaluate, load_classifier, train
from stopsign.cli import main
from stopsign.deploy.serve import create_app
from stopsign.inference.explain import explanation
from stopsign.model.transforms import REGIONS, region_box

SIGN = 28  # the planted sign's side, in pixels of a 96-pixel scene


def scene(seed: int, sign: bool) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A 96×96 grey-noise scene with a square at a random place: red for a sign, blue for none; and its box."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 170, (96, 96, 3)).astype(np.uint8)
    left, top = (int(v) for v in rng.integers(0, 96 - SIGN, 2))
    pixels[top:top + SIGN, left:left + SIGN] = (210, 25, 30) if sign else (40, 60, 200)
    return Image.fromarray(pixels), (left, top, left + SIGN, top + SIGN)


def iou(a, b) -> float:
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return width * height / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height)


@pytest.fixture
def sign_model(tmp_path, tiny_backbone):
    """best.pt of the tiny backbone with the default recipe (regions of the whole image and a 2×2 grid), trained
    on 24 + 24 scenes, and the folder of 20 new sign scenes with their true boxes."""
    for name, sign in (("stop", True), ("not_stop", False)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(24):
            scene(1000 * sign + index, sign)[0].save(tmp_path / "data" / name / f"{index}.png")
    result = train(tmp_path / "data", backbone="tiny", out=str(tmp_path / "runs"), progress=False, num_workers=0)
    (tmp_path / "new").mkdir()
    boxes = {}
    for index in range(20):
        image, boxes[f"{index}.png"] = scene(5000 + index, True)
        image.save(tmp_path / "new" / f"{index}.png")
    return result.run_dir / "best.pt", tmp_path / "new", boxes


def test_a_region_index_is_its_tiles_quarter_in_pixels():
    # 300×240 on a 2×2 grid: tile 2 is the top-right crop (x 100-300, y 0-160); on a 7-cell map quarter 0 is cells
    # 0-3 (4/7 of the side), quarter 3 the bottom-right cells 3-6
    assert region_box(300, 240, 2, 0, (7, 7)) == pytest.approx((0, 0, 300 * 4 / 7, 240 * 4 / 7))
    assert region_box(300, 240, 2, 2 * REGIONS + 3, (7, 7)) == pytest.approx((100 + 200 * 3 / 7, 160 * 3 / 7, 300, 160))
    assert region_box(300, 240, 1, 1, (1, 1)) == (0, 0, 300, 240)  # a 1-cell map: every quarter is the tile


def test_the_planted_region_wins_and_the_box_is_the_hot_cells_around_the_best():
    scores = np.zeros(5 * REGIONS)
    scores[3 * REGIONS + 1] = 4.0  # tile 3 (bottom-left crop: x 0-200, y 80-240 of 300×240), its top-right quarter
    cam = np.zeros((7, 7))
    cam[5, 1], cam[5, 2], cam[0, 6] = 1.0, 0.9, 0.8  # (0, 6) is hot too, but not connected to the best cell
    explained = explanation((300, 240), (600, 480), 2, scores, (7, 7), cam, cam_tile=3)
    assert explained.region_score == 4.0 and len(explained.regions) == 5 * REGIONS
    expected = region_box(300, 240, 2, 3 * REGIONS + 1, (7, 7))
    assert explained.region_box == tuple(round(2 * value) for value in expected)  # in the photo's own pixels
    # cells (5, 1)-(5, 2) of tile 3: x 200/7 to 3 × 200/7, y 80 + 5 × 160/7 to 80 + 6 × 160/7; ×2
    assert explained.box == (round(400 / 7), round(2 * (80 + 800 / 7)), round(1200 / 7), round(2 * (80 + 960 / 7)))
    assert explained.to_dict() == {"box": list(explained.box), "region_score": 4.0}


def test_the_box_covers_the_planted_sign(sign_model):
    checkpoint, new, boxes = sign_model
    rows = load_classifier(checkpoint).predict([new], explain=True)
    hits = [iou(row.explanation.box, boxes[row.path.rsplit("/", 1)[1]]) >= 0.3 for row in rows]
    assert len(hits) == 20 and sum(hits) >= 16, [row.explanation.box for row in rows]


def test_predict_explain_writes_each_photo_and_the_rows_carry_boxes(sign_model, tmp_path, capsys):
    checkpoint, new, _ = sign_model
    capsys.readouterr()
    assert main(["-q", "predict", str(checkpoint), str(new), "--format", "json", "--explain",
                 str(tmp_path / "looked")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20 and all(len(row["box"]) == 4 and row["region_score"] is not None for row in rows)
    written = sorted(p.name for p in (tmp_path / "looked").iterdir())
    assert written == sorted(f"{i}.jpg" for i in range(20))
    with Image.open(tmp_path / "looked" / "0.jpg") as drawn:
        assert drawn.size == (96, 96)
    assert main(["-q", "predict", str(checkpoint), str(new / "0.png"), "--format", "csv", "--explain",
                 str(tmp_path / "again")]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.endswith("box_left,box_top,box_right,box_bottom,region_score")
    assert line.split(",")[-5:-1] == [str(v) for v in rows[0]["box"]]
    # without --explain the rows are as they were
    assert main(["-q", "predict", str(checkpoint), str(new / "0.png"), "--format", "json"]) == 0
    assert "box" not in json.loads(capsys.readouterr().out)[0]


def test_serve_answers_with_the_box_when_asked(sign_model):
    checkpoint, new, _ = sign_model
    client = TestClient(create_app(checkpoint))
    data = (new / "0.png").read_bytes()
    plain = client.post("/predict", content=data).json()
    asked = client.post("/predict?explain=true", content=data).json()
    expected = load_classifier(checkpoint).predict([new / "0.png"], explain=True)[0]
    assert "box" not in plain and asked["box"] == list(expected.explanation.box)
    assert asked["region_score"] == pytest.approx(expected.explanation.region_score, abs=1e-4)
    batch = client.post("/predict/batch?explain=true", files=[("files", ("0.png", data, "image/png"))]).json()
    assert batch["results"][0]["box"] == asked["box"]
    assert client.get("/model").json()["explains"] is True


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_an_exported_model_explains_with_its_region_scores(sign_model, tmp_path, format):
    from stopsign.deploy.export import export

    checkpoint, new, boxes = sign_model
    exported, report = export(checkpoint, format, tmp_path / f"model.{format}")
    # the second and third outputs, checked against PyTorch
    assert report["region_scores_max_abs_diff"] < 1e-3 and report["cell_scores_max_abs_diff"] < 1e-3
    rows = load_classifier(exported).predict([new], explain=True)
    expected = {Path(row.path).name: row.explanation for row in load_classifier(checkpoint).predict([new], explain=True)}
    for row in rows:
        looked, truth = row.explanation, expected[Path(row.path).name]
        assert looked.region_box == truth.region_box  # the winning region, the one the checkpoint outlines in white
        assert looked.region_score == pytest.approx(truth.region_score, abs=1e-3)
        assert [box for box, _ in looked.regions] == [box for box, _ in truth.regions]
    # the box: the winning tile's class activation map at the model's input side (the checkpoint's is at 3×)
    hits = [iou(row.explanation.box, boxes[Path(row.path).name]) for row in rows]
    assert np.mean(np.array(hits) >= 0.3) >= 0.8, hits
    (tmp_path / "broken.png").write_bytes(b"not an image")  # one pass gives both: an unreadable file is a row
    good, bad = load_classifier(exported).predict([new / "0.png", tmp_path / "broken.png"], explain=True)
    assert good.explanation.box == expected_boxes(rows, "0.png") and bad.label is None and bad.error
    client = TestClient(create_app(exported))
    asked = client.post("/predict?explain=true", content=(new / "0.png").read_bytes()).json()
    zero = next(row for row in rows if Path(row.path).name == "0.png")
    assert asked["box"] == list(zero.explanation.box) and client.get("/model").json()["explains"] is True


def expected_boxes(rows, name: str) -> tuple:
    return next(row.explanation.box for row in rows if Path(row.path).name == name)


def test_a_model_without_regions_exports_without_them_and_says_it_cannot_explain(tmp_path, make_images,
                                                                                 tiny_backbone, capsys):
    from stopsign.deploy.export import export

    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders", size=(40, 40))
    result = train(data, backbone="tiny", pooling="avg", tiles=1, out=str(tmp_path / "runs"), progress=False,
                   num_workers=0)
    exported, report = export(result.run_dir / "best.pt", "onnx", tmp_path / "model.onnx")
    assert "region_scores_max_abs_diff" not in report
    with pytest.raises(StopsignError, match="no region scores to explain"):
        load_classifier(exported).predict([data], explain=True)
    capsys.readouterr()
    assert main(["-q", "predict", str(exported), str(data), "--explain", str(tmp_path / "looked")]) == 2
    assert "explain with the run's best.pt" in capsys.readouterr().err and not (tmp_path / "looked").exists()


def test_the_reports_mistakes_are_outlined_where_the_model_looked(sign_model, tmp_path):
    checkpoint, new, _ = sign_model
    wrong = tmp_path / "wrong"
    for name in ("stop", "not_stop"):
        (wrong / name).mkdir(parents=True)
    for index in range(6):  # sign scenes labelled not_stop, and one without a sign labelled stop: all mistakes
        (wrong / "not_stop" / f"{index}.png").write_bytes((new / f"{index}.png").read_bytes())
    scene(9999, False)[0].save(wrong / "stop" / "plain.png")
    out_dir, _ = evaluate(checkpoint, wrong, out=tmp_path / "evals", progress=False, num_workers=0)
    with Image.open(out_dir / "plots" / "errors.jpg") as grid:
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 170) & (pixels[..., 2] < 90)  # the outline; no scene has any
    assert yellow.sum() > 6 * 40
