"""Shared test fixtures: small labelled image sets written to disk in each layout `load_data` reads.

    def test_something(tmp_path, make_images):
        root = make_images(tmp_path, {"stop": 6, "not_stop": 6}, layout="cvstudio")
        data = load_data(root)

Every image is different (a seeded 4×4 colour grid, so exact- and near-duplicate checks find
none) and tinted by its class (red for the first class), so a classifier can tell the classes apart.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from stopsign.model.backbones import BACKBONES, BackboneSpec

LAYOUTS = ("cvstudio", "folders", "splits", "csv")
TINTS = [(220, 30, 30), (30, 160, 60), (40, 60, 200), (200, 180, 40)]  # one per class, cycling
SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"


def make_image(seed: int, size: tuple[int, int] = (32, 32), tint=(128, 128, 128)) -> Image.Image:
    """An RGB image unique to `seed`: a random 4×4 colour grid blended half-and-half with `tint`."""
    grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3))
    pixels = (grid * 0.5 + np.array(tint) * 0.5).astype(np.uint8)
    return Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)


def write_images(root: Path, counts: dict, layout: str = "folders", *, size=(32, 32), ext=".png") -> Path:
    """Write a labelled image set under `root` and return the path to give `load_data`.

    counts: {class: number of images}; for layout="splits" {split: {class: number}}, e.g.
    {"train": {"stop": 4, "not_stop": 4}, "val": {"stop": 2, "not_stop": 2}}.
    Layouts: "cvstudio" (root/_annotations.json + root/images/), "folders" (root/<class>/),
    "splits" (root/<split>/<class>/), "csv" (root/labels.csv + root/images/). Files are named
    <class>-<n><ext>, <split>-<class>-<n><ext> for splits.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root.mkdir(parents=True, exist_ok=True)
    groups = counts if layout == "splits" else {None: counts}
    class_names = sorted({name for group in groups.values() for name in group})
    labels = {}  # file name -> class
    seed = 0
    for split, group in groups.items():
        for name, count in group.items():
            for index in range(count):
                seed += 1
                file_name = f"{split}-{name}-{index}{ext}" if split else f"{name}-{index}{ext}"
                folder = {"folders": root / name, "splits": root / str(split) / name}.get(layout, root / "images")
                folder.mkdir(parents=True, exist_ok=True)
                tint = TINTS[class_names.index(name) % len(TINTS)]
                make_image(seed, size, tint).save(folder / file_name)
                labels[file_name] = name
    if layout == "cvstudio":
        annotations = {file: [{"label": name, "id": f"id-{i}"}] for i, (file, name) in enumerate(labels.items())}
        document = {"version": "1.0", "type": "classification", "labels": class_names, "annotations": annotations}
        (root / "_annotations.json").write_text(json.dumps(document, indent=1, ensure_ascii=False), encoding="utf-8")
    elif layout == "csv":
        with open(root / "labels.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label"])
            writer.writerows(labels.items())
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test caches features and file hashes in its own folder, never in the user's ~/.cache."""
    monkeypatch.setenv("STOPSIGN_CACHE", str(tmp_path_factory.mktemp("cache")))


def train_tiny(tmp_path: Path, data, **overrides):
    """Train the `tiny_backbone` fast into tmp_path/runs: the settings training tests share; overrides win.
    The seed's recipe (an SGD head over epochs, the whole image), whose epochs the training tests watch."""
    from stopsign import train
    from stopsign.config import SEED_RECIPE

    settings = SEED_RECIPE | dict(backbone="tiny", epochs=4, out=str(tmp_path / "runs"), progress=False,
                                  num_workers=0, val_fraction=0.25)
    return train(data, **(settings | overrides))


@pytest.fixture
def tiny_checkpoint(tmp_path, make_images, tiny_backbone) -> tuple[Path, Path]:
    """(best.pt of the tiny backbone trained on 10 + 10 tinted images in class folders, that data folder)."""
    data = make_images(tmp_path / "data", {"stop": 10, "not_stop": 10}, layout="folders", size=(48, 40))
    result = train_tiny(tmp_path, data, epochs=6, lr_max=0.1, val_fraction=0.3)
    return result.run_dir / "best.pt", data


@pytest.fixture
def make_images():
    """The `write_images` function: make_images(tmp_path, {"stop": 6, "not_stop": 6}, layout=...)."""
    return write_images


@pytest.fixture
def shared_photos() -> Path:
    """The real CV Studio export (197 street photos, 100 not_stop / 97 stop); skips where absent."""
    if not (SHARED_PHOTOS / "_annotations.json").is_file():
        pytest.skip(f"the shared real photos are not at {SHARED_PHOTOS}")
    return SHARED_PHOTOS


@pytest.fixture(scope="session")
def photo_features(request, tmp_path_factory) -> str:
    """The feature cache the real-photo tests share, so efficientnet_lite0 sees each photo's view once a session:
    the pytest cache's stopsign-features (kept between sessions, as test_serve's real-photo model keeps it), else
    a session folder (pytest run with -p no:cacheprovider). Features are keyed by file content and view, so a test
    that copies the photos reads them too."""
    if hasattr(request.config, "cache"):
        return str(request.config.cache.mkdir("stopsign-features"))
    return str(tmp_path_factory.mktemp("photo-features"))


# --- a tiny backbone, so training tests take seconds -------------------------------------------------


class TinyNet(nn.Module):
    """A stand-in backbone trunk: conv → BatchNorm → ReLU, an 8-channel feature map, random fixed weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, images):
        return torch.relu(self.norm(self.conv(images)))

    def stages(self):
        """The convolution, then BatchNorm and ReLU: what --finetune 1 or 2 trains (model/backbones.py)."""
        return [self.conv, nn.Sequential(self.norm, nn.ReLU())]


def tiny_spec(weights: Path) -> BackboneSpec:
    """The registry entry of backbone "tiny" (32×32 input, 8 features) with its weights in `weights`."""
    def build(state):
        model = TinyNet()
        model.load_state_dict(state)
        return model

    return BackboneSpec("tiny", 8, {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                        lambda given: Path(given) if given else Path(weights), build)


def register_tiny(weights: Path) -> None:
    """Register "tiny" for good, in a fresh interpreter (a test's subprocess): the registry and the CLI's choices."""
    from stopsign import config

    BACKBONES["tiny"] = tiny_spec(weights)
    config.BACKBONE_NAMES = tuple(BACKBONES)


@pytest.fixture
def tiny_backbone(tmp_path_factory, monkeypatch) -> str:
    """Register backbone "tiny" (32×32 input, 8 features) for this test; returns its name."""
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(TinyNet().state_dict(), weights)

    monkeypatch.setitem(BACKBONES, "tiny", tiny_spec(weights))
    monkeypatch.setattr("stopsign.config.BACKBONE_NAMES", tuple(BACKBONES))  # the CLI offers it too
    monkeypatch.setenv("STOPSIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
    return "tiny"
