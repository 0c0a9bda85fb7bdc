"""How long a training run takes on the shared photos, against the seed notebook's loop and against the floor.

    .venv/bin/python bench/bench_speed.py [--repeats 3] [--only seed,floor,...]

Cases (each repeat runs each case in its own subprocess, so peak memory is the case's own):
  seed     the seed notebook's loop: torchvision transforms, the backbone over every augmented training image
           every epoch, 10 epochs, validation batch size 1
  floor    one decode and one backbone forward per image (batch 32, channels_last, inference mode)
  pass     stopsign's extraction pass alone: the plain view of every image, no cache
  cold     stopsign.train() with its defaults (efficientnet_lite0), fresh cache folders
  warm     the same again on the cache the cold run filled
  lr       another pooling (gem) on that warm cache: every pooling was cached by the cold run's passes
  seedcold train(..., --recipe seed): the seed's features and head (average pooling, whole image, SGD), cold
  seedwarm the same again, warm
Prints median wall seconds, the ratio to the floor and to the seed loop, training-only seconds (the "train
head" phase), the other phases, peak RSS (main process and its largest child: a DataLoader worker), views per second of the extraction pass and the best validation accuracy, all on
stopsign's split (val_fraction 0.1, seed 0).
The machine is shared: read the ratios, and the spread across repeats printed below the table.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data/cvstudio-stop-signs"
BACKBONE = "efficientnet_lite0"
CASES = ("seed", "floor", "pass", "cold", "warm", "lr", "seedcold", "seedwarm")
SEED_RECIPE = {"pooling": "avg", "tiles": 1, "head": "sgd"}  # stopsign.config.SEED_RECIPE, here so the parent imports nothing


def split():
    from stopsign.data.datasets import load_data, split_samples

    data = load_data(DATA)
    train, val = split_samples(data.samples, 0.1, 0, class_names=data.class_names)
    return data, train, val


# --- 1. the seed notebook's loop ----------------------------------------------------------------------------

def run_seed(workdir: Path) -> dict:
    """The notebook's loop as written there: everything recomputed every epoch, validation one image at a time."""
    import torch
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from stopsign.model.backbones import load_backbone

    class PhotoDataset(Dataset):
        def __init__(self, samples, transform):
            self.samples, self.transform = samples, transform

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, index):
            sample = self.samples[index]
            return self.transform(Image.open(sample.path).convert("RGB")), sample.label

    torch.manual_seed(0)
    data, train_samples, val_samples = split()
    backbone = load_backbone(BACKBONE)
    pre = backbone.preprocessing
    size = (pre["size"], pre["size"])
    augment = transforms.Compose([transforms.Resize(size), transforms.RandomHorizontalFlip(),
                                  transforms.RandomRotation(5), transforms.ToTensor(),
                                  transforms.Normalize(pre["mean"], pre["std"])])
    plain = transforms.Compose([transforms.Resize(size), transforms.ToTensor(),
                                transforms.Normalize(pre["mean"], pre["std"])])
    train_loader = DataLoader(PhotoDataset(train_samples, augment), batch_size=32, shuffle=True)
    val_loader = DataLoader(PhotoDataset(val_samples, plain), batch_size=1)
    # the trunk, average-pooled (what the notebook's ResNet-18 does before its fc), then the new linear layer
    model = nn.Sequential(backbone.model.trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(backbone.feature_size, len(data.class_names)))
    for parameter in model[0].parameters():
        parameter.requires_grad = False
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model[-1].parameters(), lr=1e-2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=1e-6, max_lr=1e-2, step_size_up=5,
                                                  mode="triangular2")
    best = 0.0
    for _ in range(10):
        model.train()  # as the notebook: the frozen backbone's BatchNorm in training mode too
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images.contiguous(memory_format=torch.channels_last)), labels)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct = 0
        for images, labels in val_loader:
            correct += (model(images).argmax(1) == labels).sum().item()
        best = max(best, correct / len(val_samples))
    return {"val_acc": best}


# --- 2. the floor ----------------------------------------------------------------------------------------------

def run_floor(workdir: Path) -> dict:
    """One decode (in 2 DataLoader workers) and one forward of the plain backbone per image, batch 32."""
    import torch
    from torch.utils.data import DataLoader

    from stopsign.model.backbones import load_backbone
    from stopsign.model.features import ViewsDataset

    data, _, _ = split()
    backbone = load_backbone(BACKBONE)
    dataset = ViewsDataset([s.path for s in data.samples], [[(False, 0.0)]] * len(data.samples),
                           backbone.preprocessing)
    features = []
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=list):
            images = torch.cat([tensor for _, tensor, _ in batch]).contiguous(memory_format=torch.channels_last)
            features.append(backbone.model(images))
    return {"views": len(torch.cat(features))}


# --- 3. stopsign ---------------------------------------------------------------------------------------------------

def run_pass(workdir: Path) -> dict:
    from stopsign.model.features import FeatureExtractor

    data, _, _ = split()
    extracted = FeatureExtractor(BACKBONE).extract([s.path for s in data.samples])
    return {"views": extracted.computed}


class PhaseLog(logging.Handler):
    """Catches train()'s "phases: {...}" line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.phases = {}

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("phases: "):
            self.phases = ast.literal_eval(message[len("phases: "):])


def run_train(workdir: Path, cache_name: str = "cache", **overrides) -> dict:
    import stopsign
    from stopsign.cache import cache_info

    handler = PhaseLog()
    logger = logging.getLogger("stopsign.training.trainer")
    logger.setLevel(logging.DEBUG)  # the "phases:" line is a debug message
    logger.addHandler(handler)
    cache = workdir / cache_name
    before = cache_info(cache)["entries"]
    result = stopsign.train(DATA, backbone=BACKBONE, cache_dir=str(cache), out=str(workdir / "runs"),
                            progress=False, **overrides)
    views = cache_info(cache)["entries"] - before
    return {"val_acc": result.best_val_acc, "phases": handler.phases, "views": views}


def child(case: str, workdir: Path, views: int | None) -> None:
    # Imports (about 2 s, the same for every case) stay outside the clock, stopsign's own modules included:
    # where bytecode is not cached (PYTHONDONTWRITEBYTECODE) compiling them would count against stopsign only.
    import importlib

    import torch  # noqa: F401
    import torchvision  # noqa: F401

    for module in ("stopsign.training.trainer", "stopsign.reporting.report"):
        importlib.import_module(module)

    overrides = {} if views is None else {"views": views}
    runners = {"seed": run_seed, "floor": run_floor, "pass": run_pass, "cold": lambda w: run_train(w, **overrides),
               "warm": lambda w: run_train(w, **overrides),
               "lr": lambda w: run_train(w, pooling="gem", **overrides),
               "seedcold": lambda w: run_train(w, "cache-seed", **SEED_RECIPE, **overrides),
               "seedwarm": lambda w: run_train(w, "cache-seed", **SEED_RECIPE, **overrides)}
    clock = time.perf_counter()
    result = runners[case](workdir)
    result["seconds"] = time.perf_counter() - clock
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


# --- the table -----------------------------------------------------------------------------------------------------

def measure(case: str, workdir: Path, views: int | None) -> dict:
    extra = [] if views is None else ["--views", str(views)]
    # Every cache (features, file hashes, report thumbnails) lives in the repeat's folder: cold is cold.
    env = os.environ | {"STOPSIGN_CACHE": str(workdir / "cache-root")}
    out = subprocess.run([sys.executable, __file__, "--child", case, "--workdir", str(workdir), *extra],
                         capture_output=True, text=True, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(results: dict[str, list[dict]]) -> str:
    def median(case, key, default=None):
        values = [r[key] for r in results.get(case, []) if r.get(key) is not None]
        return statistics.median(values) if values else default

    floor, seed = median("floor", "seconds"), median("seed", "seconds")
    names = {"seed": "1 seed loop (notebook)", "floor": "2 floor", "pass": "  stopsign pass, plain views",
             "cold": "3 stopsign.train, cold cache", "warm": "4 stopsign.train, warm cache",
             "lr": "5 --pooling gem, warm cache",
             "seedcold": "6 --recipe seed, cold cache", "seedwarm": "7 --recipe seed, warm cache"}
    rows = ["| case | wall s | × floor | × seed | train head s | other phases s | views/s | peak RSS MB "
            "(main / child) | val acc |", "|" + "---|" * 9]
    for case in (c for c in CASES if c in results):
        seconds = median(case, "seconds")
        phases = {k: statistics.median(r["phases"][k] for r in results[case])
                  for k in results[case][0].get("phases", {})}
        head = phases.pop("train head", None)
        views = median(case, "views")
        extracting = phases.get("features") if case in ("cold", "warm", "lr", "seedcold", "seedwarm") \
            else seconds
        rate = f"{views / extracting:.1f}" if views and extracting else "–"
        others = ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) or "–"
        acc = median(case, "val_acc")
        rows.append(" | ".join([
            f"| {names[case]}", f"{seconds:.2f}", f"{seconds / floor:.2f}" if floor else "–",
            f"{seconds / seed:.3f}" if seed else "–", f"{head:.2f}" if head is not None else "–", others, rate,
            f"{median(case, 'rss_mb'):.0f} / {median(case, 'worker_rss_mb'):.0f}",
            f"{acc:.3f}" if acc is not None else "–"]) + " |")
    spread = [f"{case}: " + ", ".join(f"{r['seconds']:.2f}" for r in runs) for case, runs in results.items()]
    return "\n".join(rows) + "\n\nwall seconds of each repeat: " + "; ".join(spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases; cold comes before warm/lr")
    parser.add_argument("--views", type=int, help="TrainConfig.views for cases 3-5 (default: the config's)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.views)
    cases = [c for c in CASES if c in args.only.split(",")]
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-speed-") as workdir:  # a fresh cache each repeat
            for case in cases:
                results.setdefault(case, []).append(measure(case, Path(workdir), args.views))
                print(f"repeat {repeat + 1}/{args.repeats} {case}: {results[case][-1]['seconds']:.2f} s",
                      file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    from stopsign.config import TrainConfig

    views = TrainConfig().views if args.views is None else args.views
    print(f"{BACKBONE} on {DATA.name} ({len(split()[0].samples)} photos), views={views}, median of {args.repeats}")
    print(table(results))


if __name__ == "__main__":
    main()
