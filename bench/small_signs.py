"""Small signs in big frames: --tiles K grids against --tile-pixels crops, accuracy against seconds per image.

    .venv/bin/python bench/small_signs.py [--frames 60] [--train-frames 160] [--shared ../shared/data]
        [--configs grid2,grid3,grid4,px280] [--beds generated,second-source]

Two test beds, each scored by every tiling:
  generated  --frames dash-camera-like test frames, 1360×800 (the demo's street renderer at 1360 px, cut to the
             road's band): half with one stop sign 23-128 px wide pasted on a pole, half with none (each frame has
             one to three other signs, red cars or brick, as the demo's negatives do). The model is trained on
             --train-frames other such frames, in class folders.
  second     ../shared/data/second-source, per group (close crops of stop signs, street photos with a stop sign,
             street frames without); the model is trained on the 197 shared photos (cvstudio-stop-signs).
Columns: the share of each group called stop (recall for the stop groups, false positives for the others),
passes per image (the mean count of backbone passes: the crops an image needs, plus the whole image), seconds per
image of a prediction with no cache (backbone passes included), and the training's seconds (features cached
between tilings where they are the same: the whole image's).
efficientnet_lite0 (offline). The machine is shared: compare seconds within one run.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from stopsign import load_classifier, train
from stopsign.data.demo import draw_confusers, draw_pole, log_uniform, render_scene, stop_sign_patch, warp_patch
from stopsign.data.images import photo_size
from stopsign.model.transforms import pixel_grid

CONFIGS = {"grid2": {"tiles": 2}, "grid3": {"tiles": 3}, "grid4": {"tiles": 4},
           "px280": {"tiles": 4, "tile_pixels": 280}, "px400": {"tiles": 3, "tile_pixels": 400}}
WIDTH, HEIGHT = 1360, 800


def frame(rng: np.random.Generator, stop: bool) -> Image.Image:
    """A 1360×800 street frame; with `stop`, one stop sign 23-128 px wide on a pole somewhere in it."""
    scene = render_scene(rng, WIDTH, stop=False, confusers=draw_confusers(rng)).image
    top = int(rng.integers(200, WIDTH - HEIGHT - 150))
    image = scene.crop((0, top, WIDTH, top + HEIGHT))
    if stop:
        side = log_uniform(rng, 23, 128)
        x, y = rng.uniform(side, WIDTH - side), rng.uniform(0.15 * HEIGHT, 0.6 * HEIGHT)
        draw_pole(ImageDraw.Draw(image), x, y, y + side * rng.uniform(1.5, 4), max(2, 0.06 * side))
        patch = warp_patch(stop_sign_patch(rng), rng)
        patch = patch.resize((round(side), round(side * patch.height / patch.width)), Image.Resampling.LANCZOS)
        image.paste(patch, (round(x - patch.width / 2), round(y - patch.height / 2)), patch)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(70, 92)))
    return Image.open(buffer).convert("RGB")


def generated(folder: Path, count: int, seed: int) -> dict[str, list[Path]]:
    """`count` frames in class folders stop/ and not_stop/, half each."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Path]] = {"small stop signs": [], "frames without": []}
    for index in range(count):
        stop = index % 2 == 0
        path = folder / ("stop" if stop else "not_stop") / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame(rng, stop).save(path, quality=95)
        groups["small stop signs" if stop else "frames without"].append(path)
    return groups


def second_source(root: Path) -> dict[str, list[Path]]:
    source = root / "second-source"
    return {"close crops": sorted((source / "stop").glob("gaynor-*")),
            "street, stop": sorted((source / "stop").glob("matlab-*")),
            "street, none": sorted((source / "not-stop").glob("*"))}


def passes(paths: list[Path], tiles: int, pixels: int) -> float:
    """The mean backbone passes a plain view of these images takes (the whole image and its crops)."""
    if tiles <= 1:
        return 1.0
    if not pixels:
        return tiles * tiles + 1.0
    return float(np.mean([np.prod(pixel_grid(*photo_size(p), tiles, pixels)[:2]) + 1 for p in paths]))


def score(model: Path, groups: dict[str, list[Path]], config: dict) -> dict:
    classifier = load_classifier(model, cache=False)
    paths = [p for group in groups.values() for p in group]
    started = time.perf_counter()
    rows = {Path(row.path).name: row.label for row in classifier.predict(paths)}
    seconds = (time.perf_counter() - started) / len(paths)
    called = {name: float(np.mean([rows[p.name] == "stop" for p in group])) for name, group in groups.items()}
    return called | {"s/img": seconds, "passes": passes(paths, config["tiles"], config.get("tile_pixels", 0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--train-frames", type=int, default=160)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--configs", default="grid2,grid3,grid4,px280")  # grid3: the default
    parser.add_argument("--beds", default="generated,second-source")
    args = parser.parse_args()
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        beds = {}
        if "generated" in args.beds:
            generated(scratch / "train", args.train_frames, seed=1)
            beds["generated"] = (scratch / "train", generated(scratch / "frames", args.frames, seed=7))
        if "second-source" in args.beds and (args.shared / "second-source").is_dir():
            beds["second-source"] = (args.shared / "cvstudio-stop-signs", second_source(args.shared))
        elif "second-source" in args.beds:
            print(f"no {args.shared / 'second-source'}: the generated frames only", file=sys.stderr)
        for bed, (data, groups) in beds.items():
            print(f"\n{bed}: " + ", ".join(f"{name} {len(group)}" for name, group in groups.items()))
            header = ["tiling", *(f"called stop: {name}" for name in groups), "passes/img", "s/img", "train s"]
            print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            for name in names:
                config = CONFIGS[name]
                started = time.perf_counter()
                result = train(data, backbone="efficientnet_lite0", out=str(scratch / "runs"), name=f"{bed}-{name}",
                               progress=False, **config)
                trained = time.perf_counter() - started
                figures = score(result.run_dir / "best.pt", groups, config)
                flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items())
                print(f"| {name} (`{flags}`) | " + " | ".join(f"{figures[g]:.3f}" for g in groups)
                      + f" | {figures['passes']:.1f} | {figures['s/img']:.2f} | {trained:.0f} |", flush=True)


if __name__ == "__main__":
    main()
