"""Does the explanation's box cover the sign? On generated stop scenes (data/demo.py's render_scene, whose stop_box
is the sign's true box), the share of scenes where each box meets it with IoU >= 0.3 (issue #24's bar: 80%), for
the winning region's box and for the class activation map's box (the one rows carry); and what explaining adds to
a serve request (image_explanations against image_probabilities, the same decoded images).

    .venv/bin/python bench/explain.py --model runs/demo/best.pt [--scenes 100] [--seed 7]
    .venv/bin/python bench/explain.py --model runs/demo/best.onnx     # an export: its cell scores' box

The model: `stopsign demo`'s (efficientnet_lite0 trained on generated scenes), or any .pt trained on
make_demo_data output. The scenes are drawn with another seed than the demo data's, so none was trained on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from stopsign import load_classifier
from stopsign.data.demo import render_scene
from stopsign.data.images import read_image

BAR = 0.3


def iou(a, b) -> float:
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/best.pt")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", type=int, default=256, help="the scenes' side (the demo data's: 256)")
    args = parser.parse_args()
    classifier = load_classifier(args.model, **({"cache": False} if args.model.endswith(".pt") else {}))
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        truth = {}
        for index in range(args.scenes):
            scene = render_scene(rng, args.size, stop=True)
            path = Path(folder) / f"{index:03d}.png"
            scene.image.save(path)
            truth[str(path)] = scene.stop_box
        rows = classifier.predict(sorted(truth), explain=True)
        images = [read_image(path) for path in sorted(truth)[:20]]
        timings = {"probabilities": [], "explanations": []}
        for _ in range(3):
            for image in images:
                for name, call in (("probabilities", classifier.image_probabilities),
                                   ("explanations", classifier.image_explanations)):
                    clock = time.perf_counter()
                    call([image])
                    timings[name].append(1000 * (time.perf_counter() - clock))
    stops = sum(row.label == "stop" for row in rows)
    print(f"{args.model}: {len(rows)} generated stop scenes ({args.size} px), {stops} predicted stop")
    print(f"{'box':<22} {'IoU >= 0.3':>10} {'median IoU':>10}")
    for name, boxes in (("winning region", [row.explanation.region_box for row in rows]),
                        ("class activation map", [row.explanation.box for row in rows])):
        if boxes[0] is None:
            print(f"{name:<22} {'-':>10} {'-':>10}   (no regions: pooling {classifier.pooling})")
            continue
        scores = [iou(box, truth[row.path]) for box, row in zip(boxes, rows)]
        hits = np.mean([score >= BAR for score in scores])
        print(f"{name:<22} {100 * hits:>9.0f}% {statistics.median(scores):>10.2f}")
    sides = [max(box[2] - box[0], box[3] - box[1]) for box in truth.values()]
    print(f"the signs' sides: median {statistics.median(sides)} px, {min(sides)}-{max(sides)}")
    plain, explained = (statistics.median(timings[name]) for name in ("probabilities", "explanations"))
    print(f"one decoded image: {plain:.1f} ms to predict, {explained:.1f} ms to predict and explain "
          f"(+{explained - plain:.1f} ms; median of {len(timings['probabilities'])})")


if __name__ == "__main__":
    main()
