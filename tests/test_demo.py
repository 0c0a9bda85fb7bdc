"""The demo data: a CV Studio export of rendered street scenes, with stop signs a model must tell from red things."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stopsign.data.datasets import load_data
from stopsign.data.demo import make_demo_data, render_scene, stop_sign_patch
from stopsign.errors import StopsignError


def red_fraction(pixels) -> float:
    """Share of pixels a "find the red" shortcut would flag: clearly red, even in dim light."""
    pixels = np.asarray(pixels, dtype=int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return float(((red > 90) & (red > 1.6 * green) & (red > 1.6 * blue)).mean())


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "export", per_class=6, seed=0, size=128)


def load_export(export):
    annotations = json.loads((export / "_annotations.json").read_text())["annotations"]
    return {name: (entries[0]["label"], Image.open(export / "images" / name)) for name, entries in annotations.items()}


def test_export_is_a_cv_studio_classification_export(export):
    data = json.loads((export / "_annotations.json").read_text())
    assert (data["version"], data["type"], data["labels"]) == ("1.0", "classification", ["not_stop", "stop"])
    annotations = data["annotations"]
    labels = [entries[0]["label"] for entries in annotations.values()]
    assert labels.count("stop") == labels.count("not_stop") == 6
    for name, [entry] in annotations.items():
        assert name == f"{uuid.UUID(entry['id'])}.jpg"
        with Image.open(export / "images" / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (128, 128))
    # Nothing else in the export: a CV Studio loader must see exactly the annotated images.
    assert sorted(path.name for path in export.iterdir()) == ["_annotations.json", "demo.json", "images"]
    assert sorted(path.name for path in (export / "images").iterdir()) == sorted(annotations)


def test_red_alone_does_not_separate_the_classes(export):
    redness = {"stop": [], "not_stop": []}
    for label, image in load_export(export).values():
        redness[label].append(red_fraction(image))
    assert max(redness["not_stop"]) > min(redness["stop"])


def test_same_seed_gives_identical_files_and_another_seed_other_images(tmp_path):
    def contents(folder):
        return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    first = contents(make_demo_data(tmp_path / "a", per_class=2, seed=3, size=96))
    again = contents(make_demo_data(tmp_path / "b", per_class=2, seed=3, size=96))
    other = contents(make_demo_data(tmp_path / "c", per_class=2, seed=4, size=96))
    assert first == again
    assert len(first) == 6  # 4 images, the annotations and demo.json
    assert set(first.values()).isdisjoint(other.values())


def test_stop_sign_is_a_red_octagon_with_white_text():
    sign = np.asarray(stop_sign_patch(np.random.default_rng(0)))
    opaque = sign[..., 3] > 127
    rows, columns = np.nonzero(opaque)
    # A regular octagon fills 2(sqrt 2 - 1) = 0.828 of its bounding square; a disc 0.785, a square 1.
    box = opaque[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    assert box.mean() == pytest.approx(0.828, abs=0.01)
    assert red_fraction(sign[opaque]) > 0.6
    middle = sign[int(0.4 * len(sign)) : int(0.6 * len(sign))]
    assert (middle[..., :3].min(axis=-1) > 200).mean() > 0.1  # the white letters


def test_stop_scenes_show_the_sign_and_confusers_make_negatives_red():
    rng = np.random.default_rng(0)
    stops = [render_scene(rng, 96, stop=True) for _ in range(15)]
    for scene in stops:
        left, top, right, bottom = scene.stop_box
        crop = np.asarray(scene.image)[max(top, 0) : bottom, max(left, 0) : right]
        assert red_fraction(crop) > (0.2 if scene.occluder else 0.3), scene.stop_box
    plain = [render_scene(rng, 96, stop=False) for _ in range(15)]
    red_things = ("red_car", "no_entry", "brick_building") * 5
    confused = [render_scene(rng, 96, stop=False, confusers=(name,)) for name in red_things]
    assert all(scene.stop_box is None for scene in plain + confused)
    stop_red, plain_red, confused_red = (
        np.median([red_fraction(scene.image) for scene in scenes]) for scenes in (stops, plain, confused)
    )
    # Plain streets are hardly red; red confusers bring negatives close to the stop scenes.
    assert plain_red < 0.25 * stop_red
    assert confused_red > max(4 * plain_red, 0.4 * stop_red)


def test_progress_bar_only_when_asked(tmp_path, capsys):
    make_demo_data(tmp_path / "quiet", per_class=1, size=64)
    assert capsys.readouterr().err == ""
    make_demo_data(tmp_path / "loud", per_class=1, size=64, progress=True)
    assert "demo images" in capsys.readouterr().err


def test_refuses_a_folder_that_holds_other_files(tmp_path):
    (tmp_path / "photos.txt").write_text("mine")
    with pytest.raises(StopsignError, match="not empty"):
        make_demo_data(tmp_path, per_class=1, size=64)
    assert [path.name for path in tmp_path.iterdir()] == ["photos.txt"]


def test_demo_data_is_reused_only_for_the_same_parameters(tmp_path):
    from stopsign.data.demo import demo_data

    first, reused = demo_data(tmp_path / "demo", per_class=2, seed=0, size=64)
    assert not reused and len(load_data(first).samples) == 4
    _, reused = demo_data(tmp_path / "demo", per_class=2, seed=0, size=64)
    assert reused
    _, reused = demo_data(tmp_path / "demo", per_class=3, seed=0, size=64)  # other parameters: made anew
    assert not reused and len(load_data(tmp_path / "demo").samples) == 6
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StopsignError, match="other than stopsign's demo data"):
        demo_data(tmp_path / "mine", per_class=2, size=64)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_demo_data_takes_the_permissions_the_umask_gives(tmp_path):
    from stopsign.data.demo import demo_data

    previous = os.umask(0o022)
    try:
        data, _ = demo_data(tmp_path / "runs" / "demo-data", per_class=1, size=64)
    finally:
        os.umask(previous)
    assert data.stat().st_mode & 0o777 == 0o755 and (data / "images").stat().st_mode & 0o777 == 0o755
    files = [data / "_annotations.json", data / "demo.json", *(data / "images").iterdir()]
    assert {path.stat().st_mode & 0o777 for path in files} == {0o644}


def test_a_second_demo_reuses_the_data_and_trains_into_a_new_folder(tmp_path, tiny_backbone, monkeypatch, capsys):
    from stopsign.cli import main
    from stopsign.training import trainer

    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda data, **settings: real_train(
        data, **(settings | {"backbone": tiny_backbone, "num_workers": 0})))  # seconds, not efficientnet's minutes
    out = tmp_path / "runs"
    command = ["-q", "demo", "--data", str(out / "demo-data"), "--per-class", "4", "--epochs", "1", "--out", str(out)]
    assert main(command) == 0
    assert "demo data: 8 generated street scenes" in capsys.readouterr().out
    images = {path.name: path.stat().st_mtime_ns for path in (out / "demo-data" / "images").iterdir()}
    assert main(command) == 0
    assert f"demo data: reusing the 8 generated street scenes in {out / 'demo-data'}" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in (out / "demo-data" / "images").iterdir()} == images
    assert sorted(path.name for path in out.iterdir()) == ["demo", "demo-2", "demo-data"]
    assert (out / "demo" / "summary.json").is_file() and (out / "demo-2" / "summary.json").is_file()


# A fresh interpreter, which no other test has made import the renderer: the training API, then `stopsign train`
# on a folder, then with --synthetic-negatives; after each, whether data/demo.py is loaded.
RENDERER_LOADED = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import register_tiny
register_tiny(Path({weights!r}))
import stopsign.training
from stopsign import find_suspects, train, tune
print("renderer after import", "stopsign.data.demo" in sys.modules)
from stopsign.cli import main
for extra in ([], ["--synthetic-negatives", "2"]):
    assert main(["-q", "train", {data!r}, "--backbone", "tiny", "--epochs", "1", "--workers", "0", "--out", {out!r},
                 *extra]) == 0
    print("renderer after train", *extra, "stopsign.data.demo" in sys.modules)
"""


def test_training_loads_the_scene_renderer_only_for_synthetic_negatives(tmp_path, make_images, tiny_backbone):
    from stopsign.model.backbones import BACKBONES

    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    script = RENDERER_LOADED.format(tests=str(Path(__file__).resolve().parent), data=str(data),
                                    weights=str(BACKBONES[tiny_backbone].weights_file(None)), out=str(tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("renderer")] == [
        "renderer after import False", "renderer after train False", "renderer after train --synthetic-negatives 2 True"]
