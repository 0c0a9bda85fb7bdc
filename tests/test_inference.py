"""inference: one predict() for every backend, the loader's choice by suffix, the one decision rule, and what
each model's path imports (a .pt path without matplotlib or scikit-learn, an .onnx path without torch)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stopsign import Classifier, load_classifier
from stopsign.cli import main
from stopsign.decision import decide
from stopsign.deploy.export import export
from stopsign.deploy.serve import create_app
from stopsign.errors import CheckpointError, StopsignError
from stopsign.inference.onnx import OnnxClassifier
from stopsign.inference.pytorch import CheckpointClassifier
from stopsign.inference.torchscript import TorchScriptClassifier
from stopsign.reporting.metrics import Predictions

TESTS = Path(__file__).resolve().parent


def test_the_loader_picks_the_backend_by_suffix_and_all_predict_alike(tiny_checkpoint, tmp_path):
    checkpoint, data = tiny_checkpoint
    onnx_path, _ = export(checkpoint, out=tmp_path / "m.onnx")
    script_path, _ = export(checkpoint, format="torchscript", out=tmp_path / "m.torchscript")
    kinds = {checkpoint.parent: CheckpointClassifier, checkpoint: CheckpointClassifier,
             onnx_path: OnnxClassifier, script_path: TorchScriptClassifier}
    images = [str(data / "stop"), str(data / "not_stop")]
    reference = load_classifier(checkpoint).predict(images)
    for path, kind in kinds.items():
        classifier = load_classifier(path)
        assert type(classifier) is kind and isinstance(classifier, Classifier)
        rows = classifier.predict(images)
        assert [r.label for r in rows] == [r.label for r in reference]
        for row, expected in zip(rows, reference):
            assert max(abs(row.probabilities[k] - v) for k, v in expected.probabilities.items()) < 1e-4
    with pytest.raises(StopsignError, match="--weights applies to .pt"):
        load_classifier(onnx_path, weights="x.pth")


def test_a_torchscript_file_without_stopsign_metadata_is_refused(tmp_path):
    import torch

    path = tmp_path / "plain.torchscript"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="not a TorchScript model exported by stopsign"):
        load_classifier(path)


def test_decide_is_argmax_or_at_least_the_threshold():
    probs = np.array([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    assert decide(probs).tolist() == [0, 0, 1]
    assert decide(probs, 0.3).tolist() == [1, 1, 1]  # p == threshold is positive
    assert decide(probs, np.nextafter(0.3, 1)).tolist() == [0, 1, 1]
    with pytest.raises(StopsignError, match="two-class"):
        decide(np.full((1, 3), 1 / 3), 0.5)
    with pytest.raises(StopsignError, match="between 0 and 1"):
        decide(probs, 1.5)


def test_every_path_decides_alike_at_the_threshold_itself(tiny_checkpoint, capsys):
    """decide(), Predictions.y_pred, `predict --threshold` and `serve --threshold` agree on p == threshold."""
    checkpoint, data = tiny_checkpoint
    image = sorted((data / "stop").glob("*.png"))[0]
    classifier = load_classifier(checkpoint)
    _, probs, _ = classifier.probabilities([image])
    p = float(probs[0, 1])  # the image's own probability of the second class is the threshold
    assert decide(probs, p).tolist() == [1] and decide(probs, np.nextafter(p, 1)).tolist() == [0]
    names = classifier.class_names
    assert Predictions([str(image)], [0], probs, names, threshold=p).y_pred.tolist() == [1]
    assert Predictions([str(image)], [0], probs, names, threshold=np.nextafter(p, 1)).y_pred.tolist() == [0]

    for threshold, expected in ((p, names[1]), (np.nextafter(p, 1), names[0])):
        assert main(["-q", "predict", str(checkpoint), str(image), "--format", "json",
                     "--threshold", repr(float(threshold))]) == 0
        assert json.loads(capsys.readouterr().out)[0]["label"] == expected

    # The service decodes uploads itself; its probability of the same image is the threshold there.
    p_served = float(classifier.image_probabilities([Image.open(image).convert("RGB")])[0, 1])
    for threshold, expected in ((p_served, names[1]), (np.nextafter(p_served, 1), names[0])):
        client = TestClient(create_app(checkpoint, threshold=float(threshold)))
        answer = client.post("/predict", files={"file": (image.name, image.read_bytes())}).json()
        assert answer["label"] == expected


def test_the_threshold_flag_is_a_probability(tiny_checkpoint, capsys):
    checkpoint, data = tiny_checkpoint
    for command in (["predict", str(checkpoint), str(data)], ["serve", str(checkpoint)]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--threshold", "1.5"])
        assert exited.value.code == 2
        assert "--threshold: 1.5 is out of range: it must be >= 0 and <= 1" in capsys.readouterr().err


# A fresh interpreter registers the tests' tiny backbone, predicts with a .pt checkpoint (and builds the app
# that serves it), then prints which heavy libraries got imported.
IMPORTS = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import register_tiny
register_tiny(Path({weights!r}))
import stopsign
rows = stopsign.load_classifier({model!r}).predict([{image!r}])
assert rows[0].label, rows
{serve}
print(json.dumps(sorted(name for name in ("matplotlib", "sklearn", "scipy", "onnxruntime", "torch")
                        if name in sys.modules)))
"""


def imported(checkpoint: Path, image: Path, serve: bool) -> list[str]:
    from stopsign.model.backbones import BACKBONES

    script = IMPORTS.format(tests=str(TESTS), weights=str(BACKBONES["tiny"].weights_file(None)),
                            model=str(checkpoint), image=str(image),
                            serve=f"from stopsign.deploy.serve import create_app; create_app({str(checkpoint)!r})"
                            if serve else "")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_predicting_or_serving_a_checkpoint_loads_no_charting_stack(tiny_checkpoint):
    checkpoint, data = tiny_checkpoint
    image = sorted((data / "stop").glob("*.png"))[0]
    assert imported(checkpoint, image, serve=False) == ["torch"]
    assert imported(checkpoint, image, serve=True) == ["torch"]


def test_a_torchscript_export_needs_no_onnx(tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    from stopsign.model.backbones import BACKBONES

    script = f"""
import sys
sys.modules['onnxruntime'] = sys.modules['onnx'] = None  # as where neither is installed
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from conftest import register_tiny
register_tiny(Path({str(BACKBONES["tiny"].weights_file(None))!r}))
from stopsign import export
path, report = export({str(checkpoint)!r}, format="torchscript", out={str(tmp_path / "m.torchscript")!r})
print(report["same_predictions"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "True" and (tmp_path / "m.torchscript").is_file()


def test_a_torchscript_model_predicts_quietly(tiny_checkpoint, tmp_path):
    checkpoint, data = tiny_checkpoint
    path, _ = export(checkpoint, format="torchscript", out=tmp_path / "m.torchscript")
    done = subprocess.run([sys.executable, "-m", "stopsign.cli", "-q", "predict", str(path), str(data / "stop"),
                           "--format", "json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 10
    assert done.stderr == ""  # no torch deprecation notice past -q
