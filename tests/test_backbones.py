"""The backbone registry: weights from a file, the download cache, the offline error, preprocessing."""

import urllib.error

import pytest
import torch
from torchvision.models import resnet18

from stopsign.model.backbones import BACKBONES, download_weights, load_backbone
from stopsign.errors import StopsignError


def test_resnet18_from_a_local_weights_file(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), weights)
    backbone = load_backbone("resnet18", str(weights))
    assert backbone.feature_size == 512 and backbone.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert not any(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training
    with torch.no_grad():
        assert backbone.model(torch.zeros(2, 3, 224, 224)).shape == (2, 7, 512)  # avg, max, gem, 4 regions


def test_download_is_cached_and_offline_error_names_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def fake_download(url, destination, hash_prefix=None):
        calls.append(hash_prefix)
        open(destination, "wb").write(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert download_weights(url).read_bytes() == b"weights"
    assert download_weights(url).name == "resnet18-f37072fd.pth"
    assert calls == ["f37072fd"]  # the second call found the cached copy; the hash prefix was checked

    def offline(url, destination, hash_prefix=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(StopsignError) as error:
        load_backbone("resnet18")
    assert "--weights" in str(error.value) and "efficientnet_lite0" in str(error.value)


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                        ("efficientnet_lite2", 260)])
def test_efficientnet_lites_load_offline_at_their_native_size_with_every_pooling(name, size):
    backbone = load_backbone(name)
    assert backbone.feature_size == 1280 and backbone.preprocessing == {"size": size, "mean": [127 / 255] * 3,
                                                                        "std": [128 / 255] * 3}
    images = torch.rand(2, 3, size, size) * 4 - 2
    with torch.no_grad():
        pooled = backbone.model(images)
        maps = backbone.model.trunk(images)
    assert pooled.shape == (2, 7, 1280)
    average, largest, gem, *regions = pooled.unbind(1)
    torch.testing.assert_close(average, maps.mean(dim=(2, 3)))
    side = maps.shape[2]  # 7 at 224 px: the quarters are cells 0-3 and 3-6 along each side, overlapping on one
    half = side // 2 + 1
    windows = [(r, c) for r in (0, side - half) for c in (0, side - half)]
    for region, (r, c) in zip(regions, windows):
        torch.testing.assert_close(region, maps[:, :, r:r + half, c:c + half].amax(dim=(2, 3)))
    torch.testing.assert_close(torch.stack(regions).amax(0), largest)  # the quarters cover the map
    torch.testing.assert_close(largest, maps.amax(dim=(2, 3)))
    positive = maps.clamp(min=1e-6)
    torch.testing.assert_close(gem, positive.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    assert bool((gem <= largest + 1e-5).all()) and bool((gem >= positive.mean(dim=(2, 3)) - 1e-5).all())


def test_wrong_weights_and_unknown_names_are_explained(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"layer": torch.zeros(1)}, wrong)
    with pytest.raises(StopsignError, match="does not hold resnet18 weights"):
        load_backbone("resnet18", str(wrong))
    with pytest.raises(StopsignError, match="does not exist"):
        load_backbone("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(StopsignError, match="efficientnet_lite0"):
        load_backbone("vgg99")
    assert "resnet18" in BACKBONES
