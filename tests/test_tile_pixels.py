"""`--tile-pixels P`: crops of P pixels of the photo, however large the frame, so a small sign stays seen
(model/transforms.py pixel_grid, model/features.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from stopsign import load_classifier, train
from stopsign.cli import main
from stopsign.data.images import read_image
from stopsign.model.features import FeatureExtractor
from stopsign.model.transforms import decode_size, pixel_grid, tile_box

SIGN = 10  # the square's side in pixels, in the training scenes and the big frames alike


def test_a_dash_camera_frame_is_cut_in_crops_that_show_a_25_pixel_sign_at_20_pixels():
    columns, rows, side = pixel_grid(1360, 800, 4, 280)
    assert (columns, rows, side) == (5, 3, 280) and 25 * 224 / side >= 20
    boxes = [tile_box(1360, 800, 4, index, 280) for index in range(1, 17)]
    assert all(right - left == 280 and bottom - top == 280 for left, top, right, bottom in boxes[:15])
    covered = np.zeros((800, 1360), dtype=bool)
    for left, top, right, bottom in boxes[:15]:
        covered[top:bottom, left:right] = True
    assert covered.all()
    assert boxes[15] == (0, 0, 1360, 800)  # the 16th slot is left over: the whole frame again
    # more than 16 crops of 280 would be needed: the fewest larger squares that cover it in 16
    assert pixel_grid(1500, 1100, 4, 280) == (5, 3, pytest.approx(1100 / 3))
    # a photo smaller than a crop: crops of 2/3 of its shorter side, as the default 2×2 grid cuts it
    assert pixel_grid(200, 150, 4, 280) == (2, 2, 100)


def frame(rng, size: tuple[int, int], colour) -> Image.Image:
    """Grey noise of `size` with a SIGN-pixel square of `colour` somewhere in it."""
    pixels = rng.integers(90, 170, (size[1], size[0], 3)).astype(np.uint8)
    left, top = rng.integers(0, size[0] - SIGN), rng.integers(0, size[1] - SIGN)
    pixels[top:top + SIGN, left:left + SIGN] = colour
    return Image.fromarray(pixels)


@pytest.fixture
def scenes(tmp_path):
    """Training scenes of 40 px (the square a quarter of the side), and big frames of 400 × 240 with the same
    square: red is a stop, blue is not."""
    rng = np.random.default_rng(0)
    for folder, size, count in (("data", (40, 40), 16), ("frames", (400, 240), 10)):
        for name, colour in (("stop", (210, 25, 30)), ("not_stop", (40, 60, 200))):
            (tmp_path / folder / name).mkdir(parents=True)
            for index in range(count):
                frame(rng, size, colour).save(tmp_path / folder / name / f"{index}.png")
    return tmp_path


def test_pixel_crops_find_the_small_square_that_a_grid_shrinks_away(scenes, tiny_backbone):
    frames = sorted((scenes / "frames").rglob("*.png"))
    truth = [path.parent.name for path in frames]
    recall = {}
    for name, tiling in (("grid", {"tiles": 4}), ("pixels", {"tiles": 4, "tile_pixels": 40})):
        result = train(scenes / "data", backbone="tiny", out=str(scenes / "runs"), name=name, progress=False,
                       num_workers=0, **tiling)
        rows = load_classifier(result.run_dir / "best.pt").predict(frames)
        recall[name] = np.mean([row.label == "stop" for row, label in zip(rows, truth) if label == "stop"])
        called = np.mean([row.label == "stop" for row, label in zip(rows, truth) if label == "not_stop"])
        if name == "pixels":
            assert recall[name] >= 0.9 and called <= 0.1
            config = json.loads((result.run_dir / "config.json").read_text())
            assert (config["tiles"], config["tile_pixels"]) == (4, 40)
            assert "up to 16 crops of 40×40 of its pixels" in (result.run_dir / "README.md").read_text()
    assert recall["pixels"] > recall["grid"] + 0.3, recall


def test_left_over_slots_are_copied_not_computed_and_match_the_decoded_path(tmp_path, tiny_backbone):
    rng = np.random.default_rng(1)
    paths = []
    # 10 × 6 crops of 40 px are more than 16: 5 × 3 of 80 px; a 60 × 50 photo is 2 × 2 crops of 2/3 of 50
    for index, size in enumerate([(400, 240), (60, 50)]):
        paths.append(tmp_path / f"{index}.png")
        frame(rng, size, (210, 25, 30)).save(paths[-1])
    extractor = FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)
    found = extractor.extract(paths, pooling="regions", tiles=4, tile_pixels=40)
    assert [pixel_grid(*size, 4, 40) for size in ((400, 240), (60, 50))] == [(5, 3, 80), (2, 2, pytest.approx(100 / 3))]
    assert found.computed == (15 + 1) + (4 + 1)  # the crops each photo needs, and the whole photo: not 2 × 17
    decoded = [read_image(path, draft=(decode_size(extractor.preprocessing, 4, 40),) * 2) for path in paths]
    np.testing.assert_allclose(found.features[:, 0],
                               extractor.image_features(decoded, pooling="regions", tiles=4, tile_pixels=40),
                               atol=1e-5)
    assert extractor.extract(paths, pooling="regions", tiles=4, tile_pixels=40).computed == 0


def test_an_exported_pixel_tiled_model_predicts_what_its_checkpoint_does(scenes, tiny_backbone):
    from stopsign.deploy.export import export

    result = train(scenes / "data", backbone="tiny", tiles=4, tile_pixels=40, out=str(scenes / "runs"),
                   progress=False, num_workers=0)
    exported, report = export(result.run_dir / "best.pt", "onnx", scenes / "model.onnx")
    frames = sorted((scenes / "frames").rglob("*.png"))
    expected = [row.probabilities for row in load_classifier(result.run_dir / "best.pt").predict(frames)]
    got = [row.probabilities for row in load_classifier(exported).predict(frames)]
    assert report["max_abs_diff"] < 1e-4
    assert all(a[name] == pytest.approx(b[name], abs=1e-4) for a, b in zip(expected, got) for name in a)


def test_tile_pixels_without_tiles_is_refused_before_any_work(scenes, tiny_backbone, capsys):
    out = scenes / "runs"
    code = main(["-q", "train", str(scenes / "data"), "--backbone", "tiny", "--tiles", "1", "--tile-pixels", "280",
                 "--out", str(out)])
    assert code == 2 and "--tile-pixels" in capsys.readouterr().err and not out.exists()
