"""int8 against float ONNX: file size, speed, and agreement with PyTorch, in one table.

    .venv/bin/python bench/bench_int8.py [RUN_DIR] [--images 32] [--repeats 3]

RUN_DIR: a trained run (default: efficientnet_lite0 trained on the shared CV Studio photos into a temporary
folder). Rows: the float export, `export(..., int8=True)` (static quantisation, what `stopsign export --int8`
writes), and onnxruntime's dynamic quantisation of the float file, the alternative export.quantize did not take.
Speed: images/s of onnxruntime on preprocessed batches of 16 (decoding left out), with one intra-op thread and with
all of them, the best of --repeats passes over --images validation images. Agreement: |Δp| (max, mean) and accuracy
against the PyTorch model on the run's validation images. Ratios are against the float row of this run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
from onnxruntime.quantization import QuantType, quantize_dynamic

import stopsign
from stopsign.decision import decide
from stopsign.deploy.export import export, run_images
from stopsign.inference.onnx import OnnxClassifier

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"
BATCH = 16


def images_per_second(path: Path, batch: np.ndarray, threads: int, repeats: int) -> float:
    """onnxruntime's speed on `batch` in chunks of BATCH; threads 0: all cores."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": batch[:BATCH]})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        for start in range(0, len(batch), BATCH):
            session.run(None, {"images": batch[start:start + BATCH]})
        best = min(best, time.perf_counter() - clock)
    return len(batch) / best


def agreement(path: Path, batch: np.ndarray, expected: np.ndarray, truth: np.ndarray, threshold) -> tuple:
    """(max |Δp|, mean |Δp|, accuracy) of the file at `path` on the preprocessed validation batch."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"images": batch[start:start + BATCH]})[0]
                          for start in range(0, len(batch), BATCH)])
    difference = np.abs(got - expected)
    return difference.max(), difference.mean(), (decide(got, threshold) == truth).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a run folder (default: train efficientnet_lite0 on the shared photos)")
    parser.add_argument("--images", type=int, default=32, help="validation images the speed is timed on")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # quantize_dynamic logs the model's inputs at length
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as workdir:
        run = Path(args.run) if args.run else stopsign.train(DATA, backbone="efficientnet_lite0", out=workdir,
                                                             progress=False).run_dir
        checkpoint = run / "best.pt"
        float_path, _ = export(checkpoint, out=Path(workdir) / "float.onnx")
        int8_path, _ = export(checkpoint, out=Path(workdir) / "int8.onnx", int8=True)
        dynamic_path = Path(workdir) / "dynamic.onnx"
        quantize_dynamic(str(float_path), str(dynamic_path), weight_type=QuantType.QInt8)

        pytorch = stopsign.load_classifier(checkpoint)
        images, labels = run_images(checkpoint, pytorch.decode_side, "val")
        batch = np.stack([OnnxClassifier(float_path).prepare(image) for image in images]).astype(np.float32)
        expected = pytorch.image_probabilities(images)
        truth = np.array([pytorch.class_names.index(label) for label in labels])
        timed = np.concatenate([batch] * -(-args.images // len(batch)))[:args.images]
        print(f"{run}: {pytorch.backbone_name}, {len(images)} validation images; speed on {len(timed)} images, "
              f"batches of {BATCH}, best of {args.repeats}; PyTorch accuracy "
              f"{(decide(expected, pytorch.threshold) == truth).mean():.3f}")
        print("| model | MB | × float | img/s, 1 thread | × float | img/s, all threads | × float "
              "| max abs Δp | mean abs Δp | accuracy |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        base = None
        for name, path in [("float", float_path), ("int8 static (export --int8)", int8_path),
                           ("int8 dynamic", dynamic_path)]:
            row = (path.stat().st_size / 1e6, images_per_second(path, timed, 1, args.repeats),
                   images_per_second(path, timed, 0, args.repeats))
            base = base or row
            most, mean, accuracy = agreement(path, batch, expected, truth, pytorch.threshold)
            print(f"| {name} | {row[0]:.2f} | {row[0] / base[0]:.2f} | {row[1]:.1f} | {row[1] / base[1]:.2f} "
                  f"| {row[2]:.1f} | {row[2] / base[2]:.2f} | {most:.4f} | {mean:.4f} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
