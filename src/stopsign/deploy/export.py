"""Export a checkpoint's whole classifier to ONNX or TorchScript, checked against PyTorch before it is kept.

The exported graph is backbone + head + softmax: a preprocessed float32 batch (N, 3, size, size), any N, in;
class probabilities (N, C) out, and with a regions head each region's score (N, R), where the model looked. The
class names and the preprocessing travel as metadata (ONNX: metadata_props, each value a JSON string;
TorchScript: the extra file `stopsign.json`). Each export is written under a temporary
name, run on real images (the run's validation files, else generated ones) and compared with the PyTorch
classifier, both outputs; only a file that agrees is renamed into place.

An int8 export (`int8=True`, ONNX only) is that checked float file quantised by onnxruntime: statically, its
activations' ranges calibrated on the run's training images. Its probabilities cannot match PyTorch's to
TOLERANCE, so its agreement is measured and reported instead: the largest and mean difference of a probability
(Δp) and the accuracy change on the run's validation images.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import __version__
from ..data.images import read_image
from ..decision import decide
from ..errors import CheckpointError, ImageError, StopsignError
from ..files import read_json
from ..cache import UPLOADS
from ..checkpoint import load_checkpoint
from ..inference.exported import (EXPORT_FORMAT, EXPORT_VERSION, EXTRA_FILE, INPUT_NAME, OUTPUT_NAME,
                                  REGIONS_NAME, CELLS_NAME, parse_onnx_properties)
from ..inference.load import resolve_model_path
from ..inference.pytorch import CheckpointClassifier
from ..inference.torchscript import TorchScriptClassifier, load_torchscript, quiet_torch
from ..model.transforms import REGIONS, tile_count
from ..storage import is_url, join, mirror_dir, upload_file

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}  # format → default file suffix
INT8_SUFFIX = ".int8.onnx"
TOLERANCE = 1e-4  # largest absolute difference of a probability allowed between the export and PyTorch
REGION_TOLERANCE = 1e-3  # ... and of a region's or a cell's score (log-odds or a logit, so of a larger scale)
CHECK_IMAGES = 16
CALIBRATION_IMAGES = 32  # the training images whose activations set the int8 ranges: a sample
OPSET = 17


def export(checkpoint: str | Path, format: str = "onnx", out: str | Path | None = None,
           int8: bool = False) -> tuple[Path, dict]:
    """Export `checkpoint` to `out` (default: next to it, best.onnx, best.torchscript or best.int8.onnx); return
    (path, report). Raises StopsignError, leaving no file, when a probability differs from PyTorch's by TOLERANCE
    or more or a predicted class differs. `int8`: quantise the checked ONNX file to int8, and report its agreement
    with PyTorch in report["int8"] (see quantize)."""
    if format not in FORMATS:
        raise StopsignError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if int8:
        if format != "onnx":
            raise StopsignError(f"--int8 applies to --format onnx, not {format}: drop --int8 or export to onnx")
        quantization()  # before any work
    suffix = INT8_SUFFIX if int8 else FORMATS[format]
    given = str(checkpoint)
    checkpoint = resolve_model_path(checkpoint)
    classifier = CheckpointClassifier(load_checkpoint(checkpoint), source=str(checkpoint))
    if out is None and is_url(given):  # beside the checkpoint in the bucket, as beside a local one
        out = (given[:-3] if given.endswith(".pt") else join(given, "best")) + suffix
    remote = str(out) if out is not None and is_url(str(out)) else None
    out = mirror_dir(remote, UPLOADS) / Path(remote).name if remote else Path(out) if out else \
        checkpoint.with_suffix(suffix)
    metadata = export_metadata(classifier, checkpoint)
    started = time.perf_counter()
    temporary = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        model = export_module(classifier)
        (write_onnx if format == "onnx" else write_torchscript)(model, classifier.preprocessing, metadata, temporary)
        images, source = check_images(checkpoint, classifier.decode_side)
        report = compare(classifier, model, format, temporary, images)
        if int8:
            report["int8"] = quantize(classifier, checkpoint, temporary, metadata)
        os.replace(temporary, out)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    if remote:
        upload_file(out, remote)
    report |= {"format": format, "path": remote or str(out), "bytes": out.stat().st_size, "image_source": source,
               "seconds": round(time.perf_counter() - started, 2)}
    log.debug("exported %s: %s", out, report)
    return out, report


def export_module(classifier: CheckpointClassifier) -> nn.Module:
    """The classifier's own frozen backbone, pooling and head, and a softmax, in eval mode: see _Exported."""
    return _Exported(classifier.extractor.backbone.model, classifier.head, classifier.pooling,
                     classifier.tiles > 1).eval()


class _Exported(nn.Module):
    """images (N, 3, S, S) → probabilities (N, C); with tiles, each image's tiles (N, T, 3, S, S), cut by the
    deployment (model.transforms.tile_views, numpy), combined as model.features does. A regions head also gives
    where the model looked: each region's score (N, R) as the head ranks them (RegionHead.region_scores), and each
    cell's of every tile's last feature map (N, T, h, w; RegionHead.cell_scores)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, pooling: str, tiled: bool):
        super().__init__()
        self.backbone, self.head, self.pooling, self.tiled = backbone, head, pooling, tiled

    def forward(self, images: torch.Tensor):
        flat = images.reshape(-1, *images.shape[2:]) if self.tiled else images
        maps = self.backbone.feature_maps(flat.contiguous(memory_format=torch.channels_last))
        features = self.backbone.image_features(maps, images.shape[0], self.pooling)
        probabilities = self.head(features).softmax(dim=1)
        if self.pooling == "regions":
            return probabilities, self.head.region_scores(features), self.head.cell_scores(maps, features)
        return probabilities


def example_input(preprocessing: dict, tiles: int) -> torch.Tensor:
    """The batch of 2 the graph is traced with: images, or each image's tiles."""
    size = preprocessing["size"]
    return torch.zeros(2, tile_count(tiles), 3, size, size) if tiles > 1 else torch.zeros(2, 3, size, size)


def region_cells(classifier: CheckpointClassifier) -> list[int]:
    """(rows, columns) of the backbone's last feature map at the model's input side: the cells its regions
    quarter (model.transforms.region_box), which an exported model's explanation needs."""
    size = classifier.preprocessing["size"]
    with torch.no_grad():
        maps = classifier.extractor.backbone.model.trunk(torch.zeros(1, 3, size, size))
    return [1, 1] if maps.dim() == 2 else list(maps.shape[2:])


def export_metadata(classifier: CheckpointClassifier, checkpoint: Path) -> dict:
    source, regions = classifier.checkpoint, classifier.pooling == "regions"
    metadata = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "stopsign_version": __version__,
                "class_names": classifier.class_names, "preprocessing": classifier.preprocessing,
                "backbone": classifier.backbone_name, "weights_sha256": source["weights_sha256"],
                "tuned_sha256": (source.get("tuned") or {}).get("sha256"),  # --finetune's stages, in the graph
                "checkpoint": str(checkpoint), "epoch": source.get("epoch"), "val_acc": source.get("val_acc"),
                "pooling": classifier.pooling, "tiles": classifier.tiles, "tile_pixels": classifier.tile_pixels,
                "threshold": classifier.threshold,
                # the checkpoint's cut-off, for the record: the graph outputs no features, so an export cannot compare
                # a photo with the training images, and its rows say so (similarity and unfamiliar None)
                "unfamiliar_below": classifier.unfamiliar_below,
                "input": f"{INPUT_NAME}: float32 (N, "
                         + (f"{tile_count(classifier.tiles)} tiles, " if classifier.tiles > 1 else "")
                         + f"3, {classifier.preprocessing['size']}, {classifier.preprocessing['size']}), preprocessed",
                "output": f"{OUTPUT_NAME}: float32 (N, {len(classifier.class_names)}), in class_names order"
                          + (f"; {REGIONS_NAME}: float32 (N, {tile_count(classifier.tiles) * REGIONS}), each region's "
                             "score (the positive class's log-odds, else the predicted class's logit), regions laid out "
                             f"as region_cells' quarters, tile after tile; {CELLS_NAME}: float32 (N, "
                             f"{tile_count(classifier.tiles)}, rows, columns), each cell's score of each tile's last "
                             "feature map, alike" if regions else "")}
    if regions:
        metadata["region_cells"] = region_cells(classifier)
    return metadata


def write_onnx(model: nn.Module, preprocessing: dict, metadata: dict, path: Path) -> None:
    import onnx

    outputs = [OUTPUT_NAME, REGIONS_NAME, CELLS_NAME] if "region_cells" in metadata else [OUTPUT_NAME]
    # The TorchScript-based exporter: the torch.export-based one would add the onnxscript dependency.
    with quiet_torch():
        torch.onnx.export(model, (example_input(preprocessing, metadata["tiles"]),), str(path), dynamo=False,
                          opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    save_onnx(onnx.load(str(path)), metadata, path)


def save_onnx(graph, metadata: dict, path: Path) -> None:
    """Write the ONNX graph with `metadata` as its only metadata_props (each value a JSON string), checked."""
    import onnx

    del graph.metadata_props[:]  # onnxruntime's quantiser adds plain-text entries, which are not JSON
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=json.dumps(value))
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def write_torchscript(model: nn.Module, preprocessing: dict, metadata: dict, path: Path) -> None:
    with torch.no_grad(), quiet_torch():
        traced = torch.jit.trace(model, example_input(preprocessing, metadata["tiles"]))
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(metadata)})


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported file, ONNX (read with the onnx package, no onnxruntime) or TorchScript."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnx

        if not path.is_file():
            raise CheckpointError(f"model file {path} does not exist")
        try:
            graph = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # onnx raises protobuf's DecodeError and others for files that are no model
            raise CheckpointError(f"{path} is not a readable ONNX model ({error})") from error
        return parse_onnx_properties({p.key: p.value for p in graph.metadata_props}, path)
    return load_torchscript(path)[1]


def run_images(checkpoint: Path, side: int, split: str, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """Up to `limit` of the images of the run's `split` (its data.json) that still exist, decoded at `side` (the
    classifier's decode_side), and their labels."""
    images, labels = [], []
    data_file = checkpoint.parent / "data.json"
    if data_file.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = read_json(data_file)
            rows = [row for row in record["split"] if row["split"] == split]
            for row in rows:
                if len(images) == limit:
                    break
                with contextlib.suppress(ImageError):
                    images.append(read_image(Path(record["source"]) / row["file"],
                                             draft=(side, side)))
                    labels.append(row["label"])
    return images, labels


def check_images(checkpoint: Path, side: int) -> tuple[list[Image.Image], str]:
    """Up to CHECK_IMAGES of the run's validation images that still exist, else generated street-like images."""
    images, _ = run_images(checkpoint, side, "val", CHECK_IMAGES)
    if images:
        return images, f"{len(images)} validation images of the run"
    # No data at hand: seeded colour grids of assorted shapes, smoothed by the resize.
    rng = np.random.default_rng(0)
    for width, height in [(320, 240), (240, 320), (224, 224), (500, 180), (64, 64), (800, 600), (150, 400), (96, 128)]:
        grid = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
    return images, f"{len(images)} generated images (no validation files found next to the checkpoint)"


def compare(classifier: CheckpointClassifier, model: nn.Module, format: str, path: Path, images: list[Image.Image]
            ) -> dict:
    """Run the exported file on `images`, as one batch and the first alone, against the PyTorch classifier; its
    other outputs (where the model looked) against `model`, the module it was made from, on the same batch."""
    expected = classifier.image_probabilities(images)
    # The deployed path end to end: the file's own metadata, numpy preprocessing, its own runtime.
    if format == "onnx":
        from ..inference.onnx import OnnxClassifier  # onnxruntime: needed only to check an ONNX export

        exported = OnnxClassifier(path)
    else:
        exported = TorchScriptClassifier(path)
    got, single = exported.image_probabilities(images), exported.image_probabilities(images[:1])
    difference = float(max(np.abs(got - expected).max(), np.abs(single - expected[:1]).max()))
    same = bool((got.argmax(1) == expected.argmax(1)).all() and single.argmax(1)[0] == expected.argmax(1)[0])
    report = {"images": len(images), "batch_sizes": [len(images), 1], "max_abs_diff": difference,
              "tolerance": TOLERANCE, "same_predictions": same}
    problems = [] if difference < TOLERANCE and same else [
        f"max |difference| of probabilities {difference:.3g} (limit {TOLERANCE:g}), predicted classes "
        f"{'identical' if same else 'differ'}"]
    if exported.explains:  # the region and cell scores: where the model looked
        batch = np.stack([exported.prepare(image) for image in images])
        with torch.no_grad():
            expected_looked = [tensor.numpy() for tensor in model(torch.from_numpy(batch))[1:]]
        for name, got_looked, wanted in zip(("region", "cell"), exported.outputs(batch)[1:], expected_looked):
            report[f"{name}_scores_max_abs_diff"] = difference = float(np.abs(got_looked - wanted).max())
            if not difference < REGION_TOLERANCE:
                problems.append(f"max |difference| of {name} scores {difference:.3g} (limit {REGION_TOLERANCE:g})")
    if problems:
        raise StopsignError(f"the {format} export of {classifier.backbone_name} does not match PyTorch: "
                            f"{'; '.join(problems)}; nothing was written. Try the other --format, or report this "
                            "with your torch and onnxruntime versions.")
    return report


def quantization():
    """onnxruntime.quantization, or a StopsignError that says how to get it."""
    try:
        return importlib.import_module("onnxruntime.quantization")
    except ImportError as error:
        raise StopsignError(f"--int8 needs onnxruntime's quantisation, which cannot be imported here ({error}); "
                            "install onnxruntime (`pip install onnxruntime`), or export without --int8") from error


class _Batches:
    """The calibration images as onnxruntime's CalibrationDataReader gives them (it accepts any object with
    get_next): an input batch a call, then None."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = iter([{INPUT_NAME: batch} for batch in batches])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def quantize(classifier: CheckpointClassifier, checkpoint: Path, path: Path, metadata: dict) -> dict:
    """Replace the float ONNX file at `path` by its int8 quantisation, with the same metadata; return its agreement
    with the PyTorch classifier on the run's validation images (else the generated check images).

    Static quantisation in QDQ form (per-channel int8 weights, uint8 activations whose ranges come from up to
    CALIBRATION_IMAGES training images): dynamic quantisation computes activation ranges at run time and differs
    more from PyTorch on these conv nets (bench/bench_int8.py measures both)."""
    import onnx

    from ..inference.onnx import OnnxClassifier

    ort = quantization()
    images, labels = run_images(checkpoint, classifier.decode_side, "train", CALIBRATION_IMAGES)
    if not images:
        images, _ = check_images(checkpoint, classifier.decode_side)
    log.info("quantising to int8: calibrating on %d images, then checking it on the run's validation images "
             "(onnxruntime reports no progress; about a minute on a 2-core CPU)", len(images))
    prepare = OnnxClassifier(path).prepare
    batches = [np.stack([prepare(image) for image in images[start:start + 8]]) for start in range(0, len(images), 8)]
    prepared, quantized = path.with_name(path.name + ".pre"), path.with_name(path.name + ".int8")
    try:
        ort.shape_inference.quant_pre_process(str(path), str(prepared))
        ort.quantize_static(str(prepared), str(quantized), _Batches(batches), quant_format=ort.QuantFormat.QDQ,
                            activation_type=ort.QuantType.QUInt8, weight_type=ort.QuantType.QInt8, per_channel=True)
        method = f"static, calibrated on {len(images)} {'training' if labels else 'generated'} images"
        save_onnx(onnx.load(str(quantized)), metadata | {"quantization": f"int8 ({method})"}, path)
    finally:
        for file in (prepared, quantized):
            with contextlib.suppress(OSError):
                file.unlink()
    return agreement(classifier, OnnxClassifier(path), checkpoint) | {"method": method}


def agreement(classifier: CheckpointClassifier, exported, checkpoint: Path) -> dict:
    """How an exported classifier's probabilities and decisions differ from PyTorch's on the run's validation
    images: the largest and mean |Δp|, and each one's accuracy (None without labelled validation images)."""
    images, labels = run_images(checkpoint, classifier.decode_side, "val")
    source = f"{len(images)} validation images of the run"
    if not images:
        images, source = check_images(checkpoint, classifier.decode_side)
    expected, got = classifier.image_probabilities(images), exported.image_probabilities(images)
    difference = np.abs(got - expected)
    report = {"image_source": source, "max_abs_diff": float(difference.max()),
              "mean_abs_diff": float(difference.mean()), "pytorch_accuracy": None, "int8_accuracy": None}
    if labels:
        truth = np.array([classifier.class_names.index(label) for label in labels])
        report["pytorch_accuracy"], report["int8_accuracy"] = (
            float((decide(probs, classifier.threshold) == truth).mean()) for probs in (expected, got))
    return report
