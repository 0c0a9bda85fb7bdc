"""export --int8: an int8 ONNX file that predict and serve load, its agreement with PyTorch reported."""

import re
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stopsign import StopsignError, load_classifier, train
from stopsign.cli import main
from stopsign.deploy.export import export, read_metadata
from stopsign.deploy.serve import create_app
from stopsign.files import read_json
from stopsign.inference.onnx import OnnxClassifier


def validation_files(checkpoint):
    record = read_json(checkpoint.parent / "data.json")
    return [f"{record['source']}/{row['file']}" for row in record["split"] if row["split"] == "val"]


def test_int8_export_reports_its_agreement_and_loads_in_predict_and_serve(tiny_checkpoint, capsys):
    checkpoint, data = tiny_checkpoint
    assert main(["export", str(checkpoint), "--int8"]) == 0
    shown, told = capsys.readouterr()
    assert "quantising to int8: calibrating on" in told  # a minute without output otherwise
    path = checkpoint.with_name("best.int8.onnx")
    assert path.is_file() and not checkpoint.with_name("best.onnx").exists()
    assert f"exported {path} (onnx int8," in shown

    # The printed figures are the int8 file's own: recomputed here from predict on the validation files.
    files = validation_files(checkpoint)
    exported, pytorch = load_classifier(path), load_classifier(checkpoint)
    assert isinstance(exported, OnnxClassifier) and exported.class_names == pytorch.class_names
    got, expected = exported.predict(files), pytorch.predict(files)
    difference = np.array([[abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities]
                           for a, b in zip(got, expected)])
    assert 0 < difference.max() < 0.2  # quantised: close, never exactly PyTorch's
    truth = [file.split("/")[-2] for file in files]
    accuracy = [np.mean([row.label == label for row, label in zip(rows, truth)]) for rows in (expected, got)]
    line = re.search(r"int8 \(static, calibrated on (\d+) training images\) against PyTorch on (\d+) validation "
                     r"images of the run: \|difference\| of probabilities max (\S+), mean (\S+); "
                     r"accuracy (\S+) -> (\S+) \(\S+\)", shown)
    assert line, shown
    assert [int(line[1]), int(line[2])] == [len(read_json(checkpoint.parent / "data.json")["split"]) - len(files),
                                            len(files)]
    assert [float(x) for x in line.groups()[2:]] == pytest.approx(
        [difference.max(), difference.mean(), *accuracy], rel=0.01, abs=1e-3)

    metadata = read_metadata(path)
    assert metadata["class_names"] == ["not_stop", "stop"] and metadata["threshold"] == pytorch.threshold
    assert metadata["preprocessing"] == pytorch.preprocessing and metadata["quantization"].startswith("int8")
    client = TestClient(create_app(path))
    answer = client.post("/predict", files={"file": ("a.png", (data / "stop" / "stop-3.png").read_bytes(),
                                                     "image/png")}).json()
    assert client.get("/model").json()["format"] == "onnx"
    assert answer["label"] == exported.predict([data / "stop" / "stop-3.png"])[0].label


def test_int8_file_is_smaller_than_the_float_one(tmp_path, make_images):
    data = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    result = train(data, backbone="efficientnet_lite0", epochs=1, out=str(tmp_path / "runs"), progress=False,
                   num_workers=0, val_fraction=0.5, augment=False, cache_dir=str(tmp_path / "cache"),
                   tiles=2)  # a tiled model, with half the default's passes
    float_path, _ = export(result.run_dir / "best.pt")
    int8_path, report = export(result.run_dir / "best.pt", int8=True)
    assert int8_path == float_path.with_name("best.int8.onnx")
    assert report["bytes"] == int8_path.stat().st_size < float_path.stat().st_size / 3
    assert report["int8"]["image_source"] == "4 validation images of the run"
    assert report["int8"]["pytorch_accuracy"] is not None and report["int8"]["max_abs_diff"] < 0.2


def test_without_onnxruntime_quantisation_int8_says_so_and_writes_nothing(tiny_checkpoint, monkeypatch):
    checkpoint, _ = tiny_checkpoint
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import fails as where it is missing
    with pytest.raises(StopsignError, match="--int8 needs onnxruntime's quantisation.*pip install onnxruntime"):
        export(checkpoint, int8=True)
    assert sorted(p.name for p in checkpoint.parent.glob("*best*")) == ["best.pt"]


def test_int8_applies_to_onnx_only(tiny_checkpoint):
    with pytest.raises(StopsignError, match="--int8 applies to --format onnx"):
        export(tiny_checkpoint[0], format="torchscript", int8=True)


def test_a_tiled_regions_model_exports_to_int8(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    result = train(data, backbone="tiny", epochs=3, tiles=2, pooling="regions", out=str(tmp_path / "runs"),
                   progress=False, num_workers=0, val_fraction=0.3)
    path, report = export(result.run_dir / "best.pt", int8=True)
    exported = load_classifier(path)
    assert exported.tiles == 2 and read_metadata(path)["pooling"] == "regions"
    images = [str(data / "stop"), str(data / "not_stop")]
    got, expected = exported.predict(images), load_classifier(result.run_dir).predict(images)
    assert max(abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(got, expected)
               for k in a.probabilities) < 0.2
    assert report["int8"]["image_source"] == "4 validation images of the run"
