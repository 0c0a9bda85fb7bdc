"""--device: what each name resolves to with and without CUDA, the errors that name the fix, CPU features
bit-identical to the pass before devices existed; on a GPU (marked gpu, skipped without CUDA) the autocast pass
against float32 and a run trained there."""

import numpy as np
import pytest
import torch

from stopsign.cli import main
from stopsign.errors import StopsignError
from stopsign.model import devices
from stopsign.model.rewrites import inference_model
from stopsign.model.devices import resolve_device
from stopsign.model.features import FeatureExtractor
from stopsign.model.transforms import preprocess
from stopsign.data.images import read_image

from conftest import train_tiny

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def images(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"a": 4, "b": 4}, layout="folders")
    return sorted(root.glob("*/*.png"))


def test_without_cuda_auto_is_the_cpu_and_cuda_is_an_error_that_names_the_fix(no_cuda):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None) == resolve_device("CPU")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(StopsignError) as raised:
            resolve_device(name)
        message = str(raised.value)
        assert f"--device {name}: PyTorch sees no CUDA GPU" in message and "Fix: install a CUDA build" in message
        assert "--device cpu" in message and "\n" not in message
    with pytest.raises(StopsignError, match="not a device. Fix: auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")


def test_with_cuda_auto_is_the_first_gpu_and_a_missing_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(StopsignError, match=r"has 2 CUDA GPU\(s\), numbered from 0. Fix: --device cuda:0 … cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.autocast_dtype(torch.device("cuda")) == torch.float16  # an older GPU: fp16
    assert devices.cache_suffix(torch.device("cuda")) == "-cuda-float16"


def test_the_cpu_keeps_its_batch_workers_cache_key_and_no_autocast(no_cuda, tiny_backbone):
    cpu = torch.device("cpu")
    assert devices.forward_chunk(cpu, 224) == 8 and devices.decode_workers(cpu, 3) == 3
    assert devices.autocast_dtype(cpu) is None and devices.cache_suffix(cpu) == ""
    auto, plain = FeatureExtractor("tiny", device="auto"), FeatureExtractor("tiny", device="cpu")
    assert auto.key == plain.key and auto.device == plain.device == cpu and auto.autocast is None


def test_bf16_features_never_share_a_cache_folder_with_float32_ones(no_cuda, tiny_backbone):
    for device in (torch.device("cpu"), torch.device("mps")):  # mps: the key alone, nothing runs there
        full, half = FeatureExtractor("tiny", device=device), FeatureExtractor("tiny", device=device, bf16=True)
        assert full.autocast is None and half.autocast == torch.bfloat16
        assert full.key != half.key


def test_cpu_features_are_bit_identical_to_the_pass_before_devices(no_cuda, tmp_path, images, tiny_backbone):
    """The pass as stopsign 0.2 ran it: the folded backbone, channels_last, 8 views a call, float32."""
    extractor = FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)
    features = extractor.extract(images).features[:, 0]
    model = inference_model(extractor.backbone.model)
    batch = torch.from_numpy(np.stack([preprocess(read_image(p, draft=(32, 32)), extractor.preprocessing, False, 0.0)
                                       for p in images]))
    with torch.inference_mode():
        expected = torch.cat([model(part.contiguous(memory_format=torch.channels_last)).float()
                              for part in batch.split(8)])[:, 0].numpy()
    np.testing.assert_array_equal(features, expected)  # equal, not close
    np.testing.assert_array_equal(FeatureExtractor("tiny", cache_dir=tmp_path / "cache").extract(images)
                                  .features[:, 0], expected)  # and so is what the store gives back


def test_an_sgd_head_trained_with_device_cpu_equals_the_default_run(no_cuda, tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    default = train_tiny(tmp_path, data, name="default")
    cpu = train_tiny(tmp_path, data, name="cpu", device="cpu")
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in default.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in cpu.history]
    assert torch.equal(torch.load(default.run_dir / "best.pt", weights_only=True)["head"]["weight"],
                       torch.load(cpu.run_dir / "best.pt", weights_only=True)["head"]["weight"])


def test_asking_for_cuda_without_it_is_one_line_and_leaves_no_run(no_cuda, tmp_path, make_images, tiny_backbone,
                                                                  capsys):
    data = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    out = tmp_path / "runs"
    assert main(["-q", "train", str(data), "--backbone", "tiny", "--device", "cuda", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --device cuda: PyTorch sees no CUDA GPU") and "Fix:" in error
    assert len(error.splitlines()) == 1 and not any(out.glob("*"))


def test_predict_takes_device_and_refuses_cuda_without_it(no_cuda, tiny_checkpoint, capsys):
    checkpoint, data = tiny_checkpoint
    image = str(next(data.glob("stop/*.png")))
    assert main(["predict", str(checkpoint), image, "--device", "cpu", "--format", "csv"]) == 0
    assert image in capsys.readouterr().out
    assert main(["predict", str(checkpoint), image, "--device", "cuda:0"]) == 2
    assert "PyTorch sees no CUDA GPU" in capsys.readouterr().err


# --- on a GPU -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["efficientnet_lite0"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_features_match_float32_cpu_ones_within_autocast_tolerance(tmp_path, images, backbone):
    """bf16 keeps 8 bits of mantissa (fp16 10): each feature within 5% of the largest, cosine >= 0.995."""
    cpu = FeatureExtractor(backbone, device="cpu", num_workers=0).extract(images, pooling="avg").features[:, 0]
    cuda = FeatureExtractor(backbone, device="cuda", num_workers=0).extract(images, pooling="avg").features[:, 0]
    scale = np.abs(cpu).max()
    assert np.abs(cuda - cpu).max() <= 0.05 * scale
    cosine = (cpu * cuda).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(cuda, axis=1)
    assert cosine.min() >= 0.995


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_run_trained_on_the_gpu_is_cached_apart_and_loads_on_the_cpu(tmp_path, make_images, tiny_backbone):
    data = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders")
    result = train_tiny(tmp_path, data, device="cuda", name="gpu")
    assert FeatureExtractor("tiny", device="cuda").key != FeatureExtractor("tiny", device="cpu").key
    checkpoint = torch.load(result.run_dir / "last.pt", weights_only=True)  # CPU tensors: resumes anywhere
    assert all(t.device.type == "cpu" for t in checkpoint["head"].values())
    assert main(["predict", str(result.run_dir), str(next(data.glob("stop/*.png"))), "--device", "cpu"]) == 0
