"""export: ONNX and TorchScript files that predict as the checkpoint does, and ONNX prediction without torch."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

import stopsign.deploy.export as export_module
from stopsign.cli import main
from stopsign import StopsignError, load_classifier, train
from stopsign.deploy.export import export, read_metadata
from stopsign.data.images import read_image
from stopsign.model.transforms import preprocess
from stopsign.inference.onnx import OnnxClassifier

from conftest import make_image


@pytest.fixture
def trained(tiny_checkpoint):
    return tiny_checkpoint


def run_exported(path, batch: np.ndarray) -> np.ndarray:
    if path.suffix == ".onnx":
        return OnnxClassifier(path).run(batch)
    with torch.no_grad(), export_module.quiet_torch():
        return torch.jit.load(str(path))(torch.from_numpy(batch)).numpy()


@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("torchscript", ".torchscript")])
def test_export_round_trip_matches_pytorch_at_any_batch_size(trained, format, suffix, capsys):
    checkpoint, data = trained
    path, report = export(checkpoint, format=format)
    assert path == checkpoint.with_suffix(suffix) and path.is_file()
    assert report["image_source"] == "6 validation images of the run"
    assert report["max_abs_diff"] < 1e-4 and report["same_predictions"]

    classifier = load_classifier(checkpoint)
    metadata = read_metadata(path)
    assert metadata["class_names"] == classifier.class_names == ["not_stop", "stop"]
    assert metadata["preprocessing"] == classifier.preprocessing and metadata["backbone"] == "tiny"
    assert main(["info", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "class_names        not_stop stop" in shown and "backbone           tiny" in shown

    images = [read_image(p) for p in sorted((data / "stop").glob("*.png"))[:5]]
    expected = classifier.image_probabilities(images)
    batch = np.stack([preprocess(image, classifier.preprocessing) for image in images])
    for size in (1, 5):
        got = run_exported(path, batch[:size])
        assert got.shape == (size, 2)
        assert np.abs(got - expected[:size]).max() < 1e-4
        assert (got.argmax(1) == expected[:size].argmax(1)).all()


class Drift(nn.Module):
    """Moves every probability by about 0.005: what a subtly wrong exporter would produce."""

    def forward(self, probs):
        return probs * 0.99 + 0.005


class Swap(nn.Module):
    def forward(self, probs):
        return probs.flip(1)


@pytest.mark.parametrize("corruption", [Drift, Swap])
def test_an_export_that_disagrees_with_pytorch_is_refused_and_not_written(trained, monkeypatch, corruption):
    checkpoint, _ = trained
    original = export_module.export_module
    monkeypatch.setattr(export_module, "export_module", lambda classifier: nn.Sequential(original(classifier),
                                                                                         corruption()))
    with pytest.raises(StopsignError, match="does not match PyTorch"):
        export(checkpoint, format="onnx")
    assert sorted(p.name for p in checkpoint.parent.glob("*best*")) == ["best.pt"]


def test_without_validation_files_the_check_uses_generated_images(trained, tmp_path):
    checkpoint, _ = trained
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(checkpoint, lone)
    path, report = export(lone, format="torchscript", out=tmp_path / "out" / "classifier.ts")
    assert path == tmp_path / "out" / "classifier.ts" and path.is_file()
    assert report["image_source"].startswith("8 generated images") and report["max_abs_diff"] < 1e-4


def test_efficientnet_lite0_exports_to_onnx(tmp_path, make_images):
    data = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    result = train(data, backbone="efficientnet_lite0", epochs=2, out=str(tmp_path / "runs"), progress=False,
                   num_workers=0, val_fraction=0.5, augment=False, cache_dir=str(tmp_path / "cache"),
                   tiles=2)  # a tiled model, with half the default's passes
    path, report = export(result.run_dir / "best.pt")
    assert report["max_abs_diff"] < 1e-4 and report["same_predictions"] and report["images"] == 4
    assert OnnxClassifier(path).preprocessing == {"size": 224, "mean": [127 / 255] * 3, "std": [128 / 255] * 3}


def test_numpy_preprocessing_is_exactly_torchvisions():
    preprocessing = {"size": 40, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    for size in [(97, 61), (40, 40), (13, 200)]:
        image = make_image(sum(size), size)
        resized = TF.resize(image, [40, 40], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        expected = TF.normalize(TF.to_tensor(resized), preprocessing["mean"], preprocessing["std"]).numpy()
        assert np.array_equal(preprocess(image, preprocessing), expected)


# Run in a fresh interpreter where any `import torch` or `import torchvision` fails, as on a deployment
# machine that has only onnxruntime.
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "
                 "import stopsign, stopsign.cli; from stopsign.cli import main; sys.exit(main(sys.argv[1:]))")


def test_onnx_predict_needs_no_torch_and_agrees_with_the_checkpoint(trained):
    checkpoint, data = trained
    path, _ = export(checkpoint)
    images = [str(data / "stop"), str(data / "not_stop")]
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "-q", "predict", str(path), *images,
                           "--format", "json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    expected = {r.path: r for r in load_classifier(checkpoint).predict(images)}
    assert len(rows) == len(expected) == 20
    for row in rows:
        assert row["label"] == expected[row["path"]].label
        for name, p in row["probabilities"].items():
            assert abs(p - expected[row["path"]].probabilities[name]) < 1e-4

    blocked = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "predict", str(checkpoint), images[0]],
                             capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0  # the check above is real: a .pt checkpoint does need torch


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
@pytest.mark.parametrize("pooling", ["max", "regions"])
def test_a_tiled_model_exports_and_predicts_alike(tmp_path, make_images, tiny_backbone, format, pooling):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    result = train(data, backbone="tiny", epochs=3, tiles=2, pooling=pooling, out=str(tmp_path / "runs"),
                   progress=False, num_workers=0, val_fraction=0.3)
    path, report = export(result.run_dir / "best.pt", format=format)
    assert report["same_predictions"] and report["max_abs_diff"] < 1e-4
    exported = load_classifier(path)
    assert exported.tiles == 2 and read_metadata(path)["pooling"] == pooling
    images = [str(data / "stop"), str(data / "not_stop")]
    for row, expected in zip(exported.predict(images), load_classifier(result.run_dir).predict(images)):
        assert row.label == expected.label
        assert max(abs(row.probabilities[k] - v) for k, v in expected.probabilities.items()) < 1e-4
