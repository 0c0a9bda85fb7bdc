"""--finetune N: at most the backbone's last N stages trained with the head (training/finetune.py), kept in the
checkpoint, and used by everything that loads it."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from stopsign import load_classifier, train
from stopsign.cli import main
from stopsign.deploy.export import export, read_metadata
from stopsign.model.backbones import BACKBONES, trunk_stages
from stopsign.model.transforms import jittered

from conftest import train_tiny


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_a_trunk_is_its_stages_applied_in_turn(name):
    """What --finetune splits into frozen and trained parts computes what the trunk does."""
    torch.manual_seed(0)
    if name == "resnet18":  # no ImageNet file offline: any weights show the composition
        from torchvision.models import resnet18

        trunk = BACKBONES[name].build(resnet18().state_dict()).eval()
    else:
        trunk = BACKBONES[name].build(torch.load(BACKBONES[name].weights_file(None), weights_only=True)).eval()
    stages = trunk_stages(trunk)
    assert len(stages) == {"resnet18": 12, "efficientnet_lite0": 18}[name]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        staged = images
        for stage in stages:
            staged = stage(staged)
        assert torch.allclose(staged, trunk(images), atol=1e-5)


def test_the_training_views_are_crops_in_the_image_drawn_from_the_seed():
    image = Image.new("RGB", (200, 100), (120, 60, 30))
    first = [jittered(image, np.random.default_rng(seed), 5.0) for seed in range(20)]
    again = jittered(image, np.random.default_rng(3), 5.0)
    assert again[1:] == first[3][1:] and again[0].size == first[3][0].size
    for crop, flip, angle in first:
        width, height = crop.size
        assert width <= 200 and height <= 100 and width * height >= 0.6 * 200 * 100 * 0.74  # aspect 3/4 to 4/3
        assert abs(angle) <= 5.0
    assert {flip for _, flip, _ in first} == {True, False}
    assert len({crop.getpixel((0, 0)) for crop, _, _ in first}) > 5  # brightness and saturation jittered


@pytest.fixture
def tuned_run(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, size=(48, 40))
    result = train_tiny(tmp_path, data, finetune=2, tiles=2, pooling="regions", head="logistic")
    return result, data


def test_a_finetuned_model_predicts_and_exports_what_it_validated(tuned_run, capsys):
    result, data = tuned_run
    checkpoint = torch.load(result.run_dir / "best.pt", weights_only=True)
    tuned = checkpoint["tuned"]
    base = torch.load(BACKBONES["tiny"].weights_file(None), weights_only=True)
    assert tuned["stages"] == 2 and set(tuned["state"]) >= {"trunk.conv.weight", "trunk.norm.weight"}
    first, second = tuned["tried"]  # two kept: one stage more lowered the validation loss
    assert (first["stages"], second["stages"]) == (1, 2) and second["val_loss"] < first["val_loss"]
    assert not torch.equal(tuned["state"]["trunk.conv.weight"], base["conv.weight"])  # the stages were trained
    assert 1 <= tuned["best_epoch"] <= len(tuned["history"]) and tuned["passes"] == (18 * 4 + 6) * 5

    # the report's validation predictions are what the loaded checkpoint predicts for those images
    rows = list(csv.DictReader(open(result.run_dir / "predictions.csv")))
    classifier = load_classifier(result.run_dir / "best.pt")
    assert classifier.extractor.tuned["sha256"] == tuned["sha256"] and "tuned" in classifier.extractor.key
    predicted = {str(row.path): row for row in classifier.predict([row["path"] for row in rows])}
    for row in rows:
        assert predicted[row["path"]].probabilities["stop"] == pytest.approx(float(row["p_stop"]), abs=1e-5)

    # ... and what its ONNX and TorchScript exports predict (the export's parity check passed too)
    for format in ("onnx", "torchscript"):
        path, report = export(result.run_dir / "best.pt", format=format)
        assert report["same_predictions"] and report["max_abs_diff"] < 1e-4
        assert read_metadata(path)["tuned_sha256"] == tuned["sha256"]
        exported = {str(row.path): row for row in load_classifier(path).predict([row["path"] for row in rows])}
        for row in rows:
            assert exported[row["path"]].probabilities["stop"] == pytest.approx(float(row["p_stop"]), abs=1e-4)

    assert main(["info", str(result.run_dir / "best.pt")]) == 0
    assert "fine-tuned         the backbone's last 2 stage(s)" in capsys.readouterr().out
    assert "fine-tuned" in (result.run_dir / "report.html").read_text()


def test_a_resumed_finetuned_run_keeps_its_tuned_stages(tuned_run, monkeypatch):
    result, data = tuned_run
    before = torch.load(result.run_dir / "best.pt", weights_only=True)["tuned"]["sha256"]
    (result.run_dir / "summary.json").unlink()  # as if stopped before the end

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must not fine-tune again")

    monkeypatch.setattr("stopsign.training.trainer.finetune", refuse)
    resumed = train(resume=result.run_dir, progress=False)
    assert torch.load(resumed.run_dir / "best.pt", weights_only=True)["tuned"]["sha256"] == before


def test_one_stage_more_is_kept_only_where_it_lowers_the_validation_loss(tmp_path, make_images, tiny_backbone,
                                                                          monkeypatch, caplog):
    """The depth stops early as the epochs do: here the second stage's best validation loss is made worse than the
    first's, so the top stage alone is kept, and the checkpoint holds that stage's state and no other's."""
    from stopsign.training import finetune

    real = finetune.train_stages

    def second_is_worse(original, count, *args):
        history, best, kept = real(original, count, *args)
        if count == 2:
            history = [row | {"val_loss": row["val_loss"] + 10} for row in history]
        return history, best, kept

    monkeypatch.setattr(finetune, "train_stages", second_is_worse)
    data = make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, size=(48, 40))
    with caplog.at_level("INFO", logger="stopsign.training.finetune"):
        result = train_tiny(tmp_path, data, finetune=2, pooling="max", head="logistic")
    tuned = torch.load(result.run_dir / "best.pt", weights_only=True)["tuned"]
    assert tuned["stages"] == 1 and [t["stages"] for t in tuned["tried"]] == [1, 2]
    assert set(tuned["state"]) == {"trunk.norm.weight", "trunk.norm.bias", "trunk.norm.running_mean",
                                   "trunk.norm.running_var", "trunk.norm.num_batches_tracked"}
    assert "fine-tuned the backbone's last 1 stage(s) of at most 2" in caplog.text


def test_finetune_is_refused_where_it_cannot_apply(tmp_path, make_images, tiny_backbone, capsys):
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8})
    common = [str(data), "--backbone", "tiny", "--out", str(tmp_path / "runs"), "--workers", "0"]
    assert main(["train", *common, "--finetune", "1", "--folds", "3"]) == 2
    assert "--finetune stops early on the validation split, and --folds" in capsys.readouterr().err
    assert main(["train", *common, "--finetune", "3"]) == 2
    assert "--finetune 3: tiny's trunk has 2 stages. Fix: --finetune 1 to 2" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("*/best.pt"))


def test_the_frozen_stages_give_the_same_outputs_in_decode_workers_as_in_the_main_process(tmp_path, make_images,
                                                                                         tiny_backbone, monkeypatch):
    from stopsign.config import ModelConfig, TrainConfig
    from stopsign.data.datasets import load_data
    from stopsign.model.features import FeatureExtractor
    from stopsign.training.finetune import lower_outputs

    samples = load_data(make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, size=(48, 40))).samples
    model, recipe = ModelConfig(backbone="tiny", tiles=2), TrainConfig()
    outputs = {}
    for workers in (0, 2):
        monkeypatch.setattr("stopsign.model.features.available_cores", lambda: 2)  # workers run the stages
        extractor = FeatureExtractor("tiny", num_workers=workers, device="cpu")
        lower = torch.nn.Sequential(*trunk_stages(extractor.backbone.model.trunk)[:1])
        outputs[workers], labels = lower_outputs(lower, extractor, samples, model, recipe, 2, progress=False)
    assert outputs[0].shape == (12, 2, 5, 8, 15, 15) and outputs[0].dtype == np.float16
    assert np.array_equal(outputs[0], outputs[2]) and outputs[0].any()
    assert labels.tolist() == [s.label for s in samples]
