"""The command line: argparse subcommands, each one call into the public API. The only module that prints."""

from __future__ import annotations

import argparse
import atexit
import csv
import gc
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .config import BACKBONE_NAMES, TrainConfig
from .errors import StopsignError

DEFAULTS = TrainConfig()

# flag → (TrainConfig field, type, help); defaults come from TrainConfig, the seed recipe.
TRAIN_FLAGS = {
    "--backbone": ("backbone", str, f"pretrained backbone: {', '.join(BACKBONE_NAMES)}"),
    "--weights": ("weights", str, "a local copy of the backbone's weights, for machines without internet"),
    "--epochs": ("epochs", int, "passes over the training set"),
    "--batch-size": ("batch_size", int, "images per optimisation step"),
    "--lr-base": ("lr_base", float, "lowest learning rate of the cycle"),
    "--lr-max": ("lr_max", float, "highest learning rate of the cycle"),
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": ("weight_decay", float, "SGD weight decay"),
    "--label-smoothing": ("label_smoothing", float, "CrossEntropyLoss label smoothing"),
    "--scheduler": ("scheduler", str, "triangular2 (CyclicLR, the seed recipe), cosine or constant"),
    "--cycle-epochs": ("cycle_epochs", int,
                       "CyclicLR is stepped once per epoch: the LR rises linearly from --lr-base to --lr-max "
                       "over this many epochs, falls back over as many, and each later cycle's height halves"),
    "--val-fraction": ("val_fraction", float, "share of each class held out for validation when no split is given"),
    "--seed": ("seed", int, "drives the split, the shuffling and the augmentation draws"),
    "--rotation": ("rotation", float, "largest rotation of an augmented view, degrees either way"),
    "--views": ("views", int, "augmented views cached per training image; each epoch samples one"),
    "--folds": ("folds", int, "K > 1: stratified K-fold cross-validation (report on out-of-fold predictions), "
                           "then the final model on all data"),
    "--cache-dir": ("cache_dir", str, "where backbone features are cached (default: ~/.cache/stopsign/features)"),
    "--workers": ("num_workers", int, "image decoding processes"),
    "--out": ("out", str, "folder that holds run folders"),
    "--name": ("name", str, "run folder name (default: <backbone>-<time>; never overwrites)"),
}

# settings fixed for a whole study; the recipe itself is what tune searches
TUNE_FLAGS = ("--backbone", "--weights", "--seed", "--rotation", "--cache-dir", "--workers", "--out", "--name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stopsign", description=__doc__.split("\n")[0].replace(
        "The command line", "stopsign: transfer-learning image classifiers"))
    parser.add_argument("--version", action="version", version=f"stopsign {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a classifier", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="DATA: a CV Studio export (_annotations.json), class folders, "
                                            "train/ val/ folders, or a CSV of filename,label.")
    train.add_argument("data")
    train.add_argument("--val", help="a separate labelled validation set (any layout)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue an interrupted run from its last finished epoch (its own settings and split)")
    for flag, (field, kind, text) in TRAIN_FLAGS.items():
        train.add_argument(flag, dest=field, type=kind, default=getattr(DEFAULTS, field), help=text)
    train.add_argument("--no-augment", dest="augment", action="store_false", help="no flip or rotation")
    train.add_argument("--no-cache", dest="cache", action="store_false",
                       help="recompute the backbone on augmented images every epoch (the seed's slow loop)")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast for the backbone pass")

    predict = commands.add_parser("predict", help="predict images with a checkpoint")
    predict.add_argument("checkpoint")
    predict.add_argument("images", nargs="+", help="files, folders or glob patterns")
    predict.add_argument("--format", choices=["table", "csv", "json"], default="table")
    predict.add_argument("--threshold", type=float, help="two classes: predict the second when its p >= this")
    predict.add_argument("--weights", help="local copy of the backbone's weights")

    evaluate = commands.add_parser("evaluate", help="score a checkpoint on labelled data")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("data")
    evaluate.add_argument("--out", default="runs")
    evaluate.add_argument("--name")
    evaluate.add_argument("--threshold", type=float)
    evaluate.add_argument("--weights")

    info = commands.add_parser("info", help="show what a checkpoint (.pt) or an exported model (.onnx, .torchscript) holds")
    info.add_argument("checkpoint")

    demo = commands.add_parser("demo", help="generate the built-in stop-sign demo data and train on it (offline)")
    demo.add_argument("--data", default="runs/demo-data", help="where the generated data set goes")
    demo.add_argument("--per-class", type=int, default=120)
    demo.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs")

    cache = commands.add_parser("cache", help="show or empty the feature cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--cache-dir")

    export = commands.add_parser("export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", help="file to write (default: next to the checkpoint, best.onnx or best.torchscript)")

    serve = commands.add_parser("serve", help="serve a model over HTTP: JSON API and a web page at /")
    serve.add_argument("model", help="a checkpoint (runs/NAME/best.pt) or an exported .onnx file")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-upload-mb", type=float, default=10, help="largest image accepted (MiB); more gets 413")

    tune = commands.add_parser("tune", help="search the training recipe by K-fold cross-validation (Optuna)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                               description="Writes study.db, trials.csv, best.json, plots/ and report.html, then "
                                           "the best recipe's model trained on all data in final/.")
    tune.add_argument("data")
    tune.add_argument("--trials", type=int, default=50, help="trials this process adds to the study")
    tune.add_argument("--folds", type=int, default=5, help="K of the K-fold cross-validation that scores a trial")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.add_argument("--resume", metavar="RUN_DIR", help="add trials to the study in this tune folder (its own "
                                                          "settings); several processes may share one study")
    tune.add_argument("--no-final", dest="final", action="store_false",
                      help="no final model (e.g. for extra processes adding trials to a shared study)")
    for flag in TUNE_FLAGS:
        field, kind, text = TRAIN_FLAGS[flag]
        tune.add_argument(flag, dest=field, type=kind, default=getattr(DEFAULTS, field), help=text)
    return parser


def print_result(result) -> None:
    """The last line of a training command: the accuracy to trust and where the run folder is."""
    cv = result.metrics.get("cv")
    if cv:
        print(f"{cv['folds']}-fold cross-validated accuracy {cv['mean']['accuracy']:.3f} "
              f"± {cv['std']['accuracy']:.3f}; final model trained on all data; run folder {result.run_dir}")
    else:
        print(f"best validation accuracy {result.best_val_acc:.3f} (epoch {result.best_epoch}); "
              f"run folder {result.run_dir}")


def run_train(args) -> None:
    from .train import train

    fields = {field for field, _, _ in TRAIN_FLAGS.values()} | {"augment", "cache", "bf16"}
    config = TrainConfig(**{f: getattr(args, f) for f in fields})
    result = train(args.data, val=args.val, config=config, resume=args.resume, progress=not args.quiet)
    print_result(result)


def run_tune(args) -> None:
    from .tune import tune

    fixed = {TRAIN_FLAGS[flag][0]: getattr(args, TRAIN_FLAGS[flag][0]) for flag in TUNE_FLAGS}
    result = tune(args.data, trials=args.trials, folds=args.folds, timeout=args.timeout, resume=args.resume,
                  progress=not args.quiet, final=args.final, **fixed)
    if not result.best_params:
        print(f"no completed trial yet; the study is in {result.run_dir}")
        return
    if result.final_run:
        print(f"final model (best settings, all data): {result.final_run.run_dir / 'best.pt'}")
    print(f"best {result.folds}-fold cross-validated accuracy {result.best_accuracy:.3f} (seed recipe "
          f"{result.seed_accuracy:.3f}); output folder {result.run_dir}")


def run_predict(args) -> int:
    from .prediction import load_classifier  # torch is imported only for a .pt checkpoint

    classifier = load_classifier(args.checkpoint, weights=args.weights)
    results = classifier.predict(args.images, threshold=args.threshold, progress=not args.quiet)
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "label", "probability", "error"])
        for r in results:
            writer.writerow([r.path, r.label or "", f"{r.probabilities[r.label]:.4f}" if r.label else "", r.error or ""])
    else:
        width = max([len(r.path) for r in results] + [4])
        print(f"{'path':<{width}}  {'label':<12} probability")
        for r in results:
            shown = f"{r.label:<12} {r.probabilities[r.label]:.3f}" if r.label else f"{'-':<12} error: {r.error}"
            print(f"{r.path:<{width}}  {shown}")
    return 0 if all(r.label for r in results) else 1


def run_evaluate(args) -> None:
    from .predict import evaluate

    out_dir, metrics = evaluate(args.checkpoint, args.data, out=args.out, name=args.name,
                                threshold=args.threshold, progress=not args.quiet, weights=args.weights)
    low, high = metrics["accuracy_ci95"]
    print(f"accuracy {metrics['accuracy']:.3f} (95% CI {low:.2f}-{high:.2f}, n={metrics['n']})")
    for name, row in metrics["per_class"].items():
        print(f"  {name:<16} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {row['support']}")
    print(f"confusion (rows = truth): {metrics['confusion']}")
    print(f"report {out_dir / 'report.html'}")


def run_info(args) -> None:
    suffix = Path(args.checkpoint).suffix.lower()
    if suffix in (".onnx", ".torchscript"):  # an exported file: the metadata `stopsign export` wrote
        if suffix == ".onnx":
            from .onnx_predict import OnnxClassifier  # no torch

            metadata = OnnxClassifier(args.checkpoint).metadata
        else:
            from .export import read_metadata

            metadata = read_metadata(args.checkpoint)
        for key, value in metadata.items():
            print(f"{key:<18} {value}")
        return
    from .runs import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    shown = {k: v for k, v in checkpoint.items() if k not in ("head", "optimizer", "scheduler", "config")}
    shown["head parameters"] = sum(t.numel() for t in checkpoint["head"].values())
    for key, value in shown.items():
        print(f"{key:<18} {value}")
    print("settings")
    for key, value in (checkpoint.get("config") or {}).items():
        print(f"  {key:<16} {value}")


def run_demo(args) -> None:
    from .demo import make_demo_data
    from .train import train

    data = Path(args.data)
    if (data / "_annotations.json").is_file():  # the generator writes atomically: an export there is whole
        print(f"demo data: reusing {data} (delete it to generate anew)")
    else:
        make_demo_data(data, per_class=args.per_class, seed=args.seed, progress=not args.quiet)
        print(f"demo data: {2 * args.per_class} generated street scenes in {data}")
    result = train(data, backbone="efficientnet_lite0", epochs=args.epochs, seed=args.seed, out=args.out,
                   name="demo", progress=not args.quiet)
    print(f"plots: {result.run_dir / 'plots'}; report: {result.run_dir / 'report.html'}")
    print_result(result)


def run_cache(args) -> None:
    from .features import cache_info, clear_cache

    info = (clear_cache if args.action == "clear" else cache_info)(args.cache_dir)
    verb = "removed" if args.action == "clear" else "holds"
    print(f"feature cache {info['root']} {verb} {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB")
    for name, folder in info["folders"].items():
        print(f"  {name:<32} {folder['entries']:>8} entries {folder['bytes'] / 1e6:>9.1f} MB")
    for name, store in info["stores"].items():
        print(f"{name} {store['path']} {verb} {store['files']} files, {store['bytes'] / 1e6:.1f} MB")


def run_export(args) -> None:
    from .export import export

    path, report = export(args.checkpoint, format=args.format, out=args.out)
    print(f"exported {path} ({report['format']}, {report['bytes'] / 1e6:.1f} MB)")
    print(f"checked against PyTorch on {report['image_source']}, batch sizes "
          f"{' and '.join(map(str, report['batch_sizes']))}: max |difference| of probabilities "
          f"{report['max_abs_diff']:.2g} (limit {report['tolerance']:g}), same predicted classes")


def run_serve(args) -> None:
    from .serve import serve

    print(f"serving {args.model} at http://{args.host}:{args.port}/ (API docs at /docs; Ctrl+C stops)")
    serve(args.model, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 2**20),
          log_level="warning" if args.quiet else "info")


COMMANDS = {"train": run_train, "predict": run_predict, "evaluate": run_evaluate, "info": run_info,
            "demo": run_demo, "cache": run_cache, "export": run_export, "serve": run_serve, "tune": run_tune}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except StopsignError as error:
        interrupted = type(error).__name__ == "Interrupted"
        print(f"{'interrupted' if interrupted else 'error'}: {error}", file=sys.stderr)
        return 130 if interrupted else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `stopsign` command: main(), then an exit that skips the interpreter's last garbage collections.

    They walk every object that torch, matplotlib and the rest created, to free memory the ending process
    gives back anyway: 0.9 s of every command on the development machine, longer than training on cached
    features. Frozen objects are skipped (0.2 s); atexit handlers, flushing and closing still happen.
    """
    atexit.register(gc.freeze)  # freezing stops no other exit handler, whatever the order they run in
    sys.exit(main())


if __name__ == "__main__":
    run()
