"""The command line: argparse subcommands, each one call into the public API. The only module that prints."""

from __future__ import annotations

import argparse
import atexit
import csv
import dataclasses
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from . import __version__
from .config import DEMO_PER_CLASS, DEVICE_HELP, RECIPES, SEED_RECIPE, TrainConfig
from .errors import Interrupted, StopsignError

# settings fixed for a whole study; the recipe itself is what tune searches
TUNE_FIELDS = ("backbone", "weights", "image_size", "tiles", "synthetic_negatives", "positive", "seed", "rotation",
               "cache_dir", "num_workers", "device", "out", "name")
# the feature and head settings `review` scores images out of fold with
REVIEW_FIELDS = ("backbone", "weights", "image_size", "pooling", "tiles", "head", "class_weight", "seed", "cache_dir",
                 "num_workers", "bf16", "device")
# what `train` takes from the command line besides DATA, --val and --resume: every setting
TRAIN_FIELDS = tuple(field.name for field in dataclasses.fields(TrainConfig))


def bounded(kind, low=None, high=None, low_open=False, high_open=False, name="value"):
    """An argparse type: `kind` within [low, high] (open ends where asked); anything else exits 2 with one line."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value != value:  # NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {' and '.join(filter(None, (lower, upper)))}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


PROBABILITY = bounded(float, 0, 1)


def comma_list(kind):
    """A flag's value "a,b,c" as a list of `kind`, e.g. --search-tiles 1,2."""
    def parse(text: str) -> list:
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")

    return parse
DEFAULT_MAX_PIXELS = 200_000_000  # data.images.DEFAULT_MAX_PIXELS, here so that --help imports no PIL
QUIET_HELP = "no progress bars (warnings are still shown)"
RECIPE_HELP = ("seed: the seed notebook's recipe exactly (--pooling avg --tiles 1 --head sgd), where stopsign's "
               "defaults differ by measurement (README: Choosing the defaults); flags given still win")
NO_CACHE_HELP = ("a .pt model's backbone features are neither read from nor written to the feature cache (by "
                 "default a second run on the same images makes no backbone pass)")
WEIGHTS_HELP = "a local copy of the backbone's weights (default: the cached download, or the wheel's)"
THRESHOLD_HELP = "two classes: predict the second class when its probability is >= this (default: the likelier class)"


def add_config_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...]) -> None:
    """A flag for each named TrainConfig field, with the field's own help, choices, range and default."""
    for field in dataclasses.fields(TrainConfig):
        if field.name not in fields:
            continue
        meta, default = field.metadata, field.default
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        if isinstance(default, bool):  # on by default: --no-NAME turns it off; off by default: --NAME turns it on
            flag = f"--no-{flag[2:]}" if default else flag
            # the parser's default, not the flag's: help shows no "(default: True)" beside --no-augment
            parser.set_defaults(**{field.name: default})
            parser.add_argument(flag, dest=field.name, action="store_false" if default else "store_true",
                                default=argparse.SUPPRESS, help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        if kind is not str:
            kind = bounded(kind, meta["low"], meta["high"], meta["low_open"], meta["high_open"])
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        if default is None:  # the help says what None means; argparse would add "(default: None)"
            parser.set_defaults(**{field.name: None})
        parser.add_argument(flag, dest=field.name, type=kind, choices=choices,
                            default=argparse.SUPPRESS if default is None else default, help=meta["help"])


DESCRIPTION = ("stopsign: train an honest image classifier from a few hundred labelled photos by transfer learning "
               "(a frozen ImageNet backbone, a new linear head), then evaluate, predict, export and serve it.")
EPILOG = ("Environment: STOPSIGN_CACHE is where recomputable data is kept (backbone features, file hashes, report "
          "thumbnails; default $XDG_CACHE_HOME/stopsign, else ~/.cache/stopsign); STOPSIGN_MAX_PIXELS sets the "
          "default of --max-pixels. `stopsign COMMAND --help` describes each command.")
Command = Callable[..., argparse.ArgumentParser]  # makes a subcommand: see subcommand_maker
MODEL_HELP = "a checkpoint (runs/NAME/best.pt), a run folder (its best.pt), or an exported .onnx or .torchscript file"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stopsign", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"stopsign {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = subcommand_maker(commands)
    for add_command in (add_train, add_predict, add_evaluate, add_info, add_demo, add_cache, add_export, add_serve,
                        add_tune, add_review):  # in the order --help lists them
        add_command(command)
    return parser


def subcommand_maker(commands) -> Command:
    """`command(name, help, photos=...)`: a subcommand of `commands` with the options every command shares."""
    # -q also after the subcommand, listed in its --help; SUPPRESS keeps a -q given before it
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    storage = argparse.ArgumentParser(add_help=False)  # every command: DATA, MODEL and --out may be URLs
    storage.add_argument("--storage-option", dest="storage_options", metavar="KEY=VALUE", action="append",
                         default=argparse.SUPPRESS,
                         help="an option for the storage of s3:// (gs://, az://...) URLs, passed to fsspec, e.g. "
                              "endpoint_url=https://s3.us-south.cloud-object-storage.appdomain.cloud; repeatable "
                              "(also $STOPSIGN_STORAGE_OPTIONS, a JSON object); credentials come from the usual places "
                              "(AWS_ACCESS_KEY_ID, ~/.aws/credentials, AWS_PROFILE)")
    pixels = argparse.ArgumentParser(add_help=False)  # for the commands that decode photos
    pixels.set_defaults(max_pixels=None)
    pixels.add_argument("--max-pixels", type=bounded(int, 1), default=argparse.SUPPRESS,
                        help="largest width × height decoded; a larger image is refused before any pixel is "
                             f"decoded, smaller ones are decoded at reduced size (default: $STOPSIGN_MAX_PIXELS, else "
                             f"{DEFAULT_MAX_PIXELS}, a 200 MP photo)")

    def command(name: str, help: str, *, photos: bool = False, **kwargs) -> argparse.ArgumentParser:
        """A subcommand whose --help shows every default, and takes -q (and --max-pixels where it reads photos)."""
        return commands.add_parser(name, parents=[quiet, storage, pixels] if photos else [quiet, storage], help=help,
                                   description=kwargs.pop("description", help[0].upper() + help[1:] + "."),
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=EPILOG, **kwargs)

    return command


def add_train(command: Command) -> None:
    """train's arguments: the data, --val, --resume, the recipe's settings and --recipe."""
    train = command("train", "train a classifier", photos=True,
                    description="Train a linear head on a frozen pretrained backbone and write a run folder. DATA: "
                                "a CV Studio export (_annotations.json), class folders, train/ val/ folders, or a CSV "
                                "of filename,label.")
    train.set_defaults(data=None, val=None, resume=None)  # unset by default; SUPPRESS keeps "(default: None)" out of --help
    train.add_argument("data", nargs="?", default=argparse.SUPPRESS,
                       help="the labelled images (optional with --resume: the run's own)")
    train.add_argument("--val", default=argparse.SUPPRESS, help="a separate labelled validation set (any layout)")
    train.add_argument("--resume", metavar="RUN_DIR", default=argparse.SUPPRESS,
                       help="continue an interrupted run from its last finished epoch (its own settings and split)")
    add_config_flags(train, TRAIN_FIELDS)
    train.add_argument("--recipe", choices=RECIPES, default="stopsign", help=RECIPE_HELP)


def add_predict(command: Command) -> None:
    """predict's arguments: a model, the images and how rows are printed."""
    predict = command("predict", "predict images with a trained model", photos=True)
    predict.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)
    predict.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    predict.add_argument("--format", choices=["table", "csv", "json"], default="table", help="how rows are printed")
    predict.set_defaults(threshold=None, weights=None, cache=True)
    predict.add_argument("--threshold", type=PROBABILITY, default=argparse.SUPPRESS, help=THRESHOLD_HELP)
    predict.add_argument("--weights", default=argparse.SUPPRESS, help=WEIGHTS_HELP)
    predict.add_argument("--device", default="auto", help=DEVICE_HELP)
    predict.add_argument("--no-cache", dest="cache", action="store_false", default=argparse.SUPPRESS,
                         help=NO_CACHE_HELP)


def add_evaluate(command: Command) -> None:
    """evaluate's arguments: a model, labelled data and where the evaluation folder goes."""
    evaluate = command("evaluate", "score a model on labelled data (metrics, report, copies of training images)",
                       photos=True)
    evaluate.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)
    evaluate.add_argument("data", help="labelled images in any layout train reads")
    evaluate.add_argument("--out", default="runs", help="folder that holds evaluation folders")
    evaluate.set_defaults(name=None, threshold=None, weights=None, cache=True)
    evaluate.add_argument("--name", default=argparse.SUPPRESS, help="evaluation folder name (default: eval-<time>)")
    evaluate.add_argument("--threshold", type=PROBABILITY, default=argparse.SUPPRESS, help=THRESHOLD_HELP)
    evaluate.add_argument("--weights", default=argparse.SUPPRESS, help=WEIGHTS_HELP)
    evaluate.add_argument("--device", default="auto", help=DEVICE_HELP)
    evaluate.add_argument("--no-cache", dest="cache", action="store_false", default=argparse.SUPPRESS,
                          help=NO_CACHE_HELP)


def add_info(command: Command) -> None:
    """info's argument: a model."""
    info = command("info", "show what a model holds: backbone, classes, preprocessing, epoch, settings")
    info.add_argument("checkpoint", metavar="MODEL", help=MODEL_HELP)


def add_demo(command: Command) -> None:
    """demo's arguments: where the generated data goes, how much, and the training's epochs and seed."""
    demo = command("demo", "generate the built-in stop-sign demo data and train on it (offline)")
    demo.add_argument("--data", default="runs/demo-data", help="where the generated data set goes (made anew when "
                                                               "--per-class or --seed differ from what is there)")
    demo.add_argument("--per-class", type=bounded(int, 2), default=DEMO_PER_CLASS,
                      help="generated street scenes per class")
    demo.add_argument("--epochs", type=bounded(int, 1), default=TrainConfig().epochs, help="training epochs")
    demo.add_argument("--seed", type=int, default=0, help="drives the generated scenes and the training")
    demo.add_argument("--out", default="runs", help="folder that holds the run folder runs/demo")


def add_cache(command: Command) -> None:
    """cache's arguments: info or clear, and which cache."""
    cache = command("cache", "show or empty the caches (features, file hashes, thumbnails)")
    cache.add_argument("action", choices=["info", "clear"], help="info: sizes; clear: delete (all is recomputable)")
    cache.set_defaults(cache_dir=None)
    cache.add_argument("--cache-dir", default=argparse.SUPPRESS,
                       help="a feature cache folder of its own (as given to train --cache-dir); without it, every "
                            "store under $STOPSIGN_CACHE")


def add_export(command: Command) -> None:
    """export's arguments: a checkpoint, the format and the file to write."""
    export = command("export", "export a checkpoint to ONNX or TorchScript, checked against PyTorch")
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint (runs/NAME/best.pt) or a run folder")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="the file format")
    export.set_defaults(out=None)
    export.add_argument("--out", default=argparse.SUPPRESS,
                        help="file to write (default: next to the checkpoint, best.onnx or best.torchscript)")


def add_serve(command: Command) -> None:
    """serve's arguments: a model, the address, the upload limit, the threshold and the device."""
    serve = command("serve", "serve a model over HTTP: a JSON API and a web page at /", photos=True)
    serve.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 accepts other machines")
    serve.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port to listen on")
    serve.add_argument("--max-upload-mb", type=bounded(float, 0, low_open=True), default=10,
                       help="largest image accepted, in MiB; more gets 413")
    serve.set_defaults(threshold=None)
    serve.add_argument("--threshold", type=PROBABILITY, default=argparse.SUPPRESS, help=THRESHOLD_HELP)
    serve.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_tune(command: Command) -> None:
    """tune's arguments: the data, the search's budget and folds, the baseline recipe and what else to search."""
    tune = command("tune", "search the training recipe by K-fold cross-validation (Optuna)", photos=True,
                   description="Search the training recipe by K-fold cross-validation (Optuna). Writes study.db, "
                               "trials.csv, best.json, plots/ and report.html, then the best recipe's model trained "
                               "on all data in final/.")
    tune.add_argument("data", help="the labelled images (any layout train reads; a test/ split is left out)")
    tune.add_argument("--trials", type=bounded(int, 0), default=50, help="trials this process adds to the study")
    tune.add_argument("--folds", type=bounded(int, 2), default=5,
                      help="K of the K-fold cross-validation that scores a trial")
    tune.set_defaults(timeout=None, resume=None, final=True)
    tune.add_argument("--timeout", type=bounded(float, 0, low_open=True), default=argparse.SUPPRESS,
                      help="stop starting trials after this many seconds (default: no limit)")
    tune.add_argument("--resume", metavar="RUN_DIR", default=argparse.SUPPRESS,
                      help="add trials to the study in this tune folder (its own settings); several processes may "
                           "share one study")
    tune.add_argument("--no-final", dest="final", action="store_false", default=argparse.SUPPRESS,
                      help="no final model (e.g. for extra processes adding trials to a shared study)")
    add_config_flags(tune, TUNE_FIELDS)
    tune.set_defaults(search_backbones=None, search_tiles=None)
    tune.add_argument("--search-backbones", metavar="A,B", type=comma_list(str), default=argparse.SUPPRESS,
                      help="also search these backbones (each one's features are extracted when a trial first draws "
                           "it, then cached); --backbone is the baseline's")
    tune.add_argument("--search-tiles", metavar="1,2", type=comma_list(int), default=argparse.SUPPRESS,
                      help="also search these --tiles values (K×K+1 backbone passes per view each); --tiles is the "
                           "baseline's")
    tune.add_argument("--recipe", choices=RECIPES, default="stopsign",
                      help=RECIPE_HELP + "; the recipe the search starts from and is compared with")


def add_review(command: Command) -> None:
    """review's arguments: the data, unlabelled photos to add, the page's address and the folds."""
    review = command("review", "find suspected label errors, fix them on a page that writes back to the data",
                     photos=True,
                     description="Rank suspected label errors (out-of-fold probabilities, cleanlab), write "
                                 "OUT/label_issues.csv, and serve a review page whose decisions are written to the "
                                 "data set's own files (CV Studio _annotations.json, the CSV, or class folders).")
    review.add_argument("data", help="the labelled images (a CV Studio export, class folders or a CSV)")
    review.set_defaults(add=None, serve=True)  # SUPPRESS keeps "(default: ...)" out of --help
    review.add_argument("--add", metavar="FOLDER", default=argparse.SUPPRESS,
                        help="also propose labels for the unlabelled photos of FOLDER, least certain first; a "
                             "decision copies the photo into the data set")
    review.add_argument("--no-serve", dest="serve", action="store_false", default=argparse.SUPPRESS,
                        help="only write OUT/label_issues.csv, no page")
    review.add_argument("--out", default="review",
                        help="folder for label_issues.csv, decisions.jsonl and backups/")
    review.add_argument("--folds", type=bounded(int, 2), default=5, help="K of the out-of-fold probabilities")
    review.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 accepts other machines")
    review.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port to listen on")
    add_config_flags(review, REVIEW_FIELDS)


def copies_sentence(metrics: dict) -> str | None:
    """How many evaluated images the model was trained on, and the scores on the others (the ones to quote)."""
    copies = metrics.get("training_copies")
    if not copies:
        return None
    seen, n = copies["exact"] + copies["near"], metrics["n"]
    if not seen:
        return f"none of the {n} images is a training image of this model or a near copy of one"
    sentence = (f"warning: {seen} of the {n} images are training images of this model ({copies['exact']} exact, "
                f"{copies['near']} near copies): accuracy on them measures memory")
    new = copies["new_images"]
    if new:
        low, high = new["accuracy_ci95"]
        recall = ", ".join(f"{name} {r:.3f}" for name, r in new["recall"].items() if r is not None)
        sentence += (f"; on the {new['n']} new images: accuracy {new['accuracy']:.3f} (95% CI {low:.2f}-{high:.2f}), "
                     f"recall {recall} (the figure to quote)")
    return sentence


def accuracy_phrase(metrics: dict, where: str = "") -> str:
    """The figure beside its baselines (reporting.metrics.headline)."""
    from .reporting.metrics import headline

    return headline(metrics, where)


def print_warnings(metrics: dict) -> None:
    """What the run found wrong: a head no better than the class prior, a model no better than its baseline."""
    for warning in metrics.get("warnings", []):
        print(f"warning: {warning}")


def print_result(result) -> None:
    """The last lines of a training command: the accuracy to trust, its warnings, and where the report is."""
    metrics = result.metrics
    cv = metrics.get("cv")
    if cv:
        folds = f", mean of folds {cv['mean']['accuracy']:.3f} ± {cv['std']['accuracy']:.3f}"
        print(f"{cv['folds']}-fold cross-validated {accuracy_phrase(metrics, folds)}; final model trained on all data")
        print_warnings(metrics)
    else:
        if len(result.history) > 1:  # the SGD head: the best of its epochs was kept
            print(f"best validation {accuracy_phrase(metrics, f' at epoch {result.best_epoch}')}")
        else:  # a head fit in one step (logistic): nothing was chosen on the validation images
            print(f"validation {accuracy_phrase(metrics)}")
        print_warnings(metrics)
        warning = (metrics.get("selection") or {}).get("warning")
        if warning:
            print(f"warning: {warning}")
        copies = copies_sentence(metrics)
        if copies and copies.startswith("warning"):
            print(copies)
    if metrics.get("test"):
        print(f"test {accuracy_phrase(metrics['test'])}: scored once with the kept model, the figure to quote")
    print(f"report {result.url + '/report.html' if result.url else result.run_dir / 'report.html'}")


def run_train(args) -> None:
    from .training.trainer import train

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: every rank extracts its share, rank 0 trains
        from .training.distributed import distributed_train as train
    if args.resume:  # the run's own settings; any given here must agree with them (train() says which do not)
        result = train(args.data, val=args.val, resume=args.resume, progress=not args.quiet,
                       **{name: getattr(args, name) for name in TRAIN_FIELDS if name in args.given})
    else:
        config = TrainConfig(**{name: getattr(args, name) for name in TRAIN_FIELDS})
        result = train(args.data, val=args.val, config=config, progress=not args.quiet)
    if result is not None:  # None: a torchrun rank other than 0, whose share of the features is written
        print_result(result)


def run_tune(args) -> None:
    from .training.tune import tune

    fixed = {name: getattr(args, name) for name in TUNE_FIELDS if not args.resume or name in args.given}
    if args.recipe == "seed" and not args.resume:  # the search starts from, and compares with, the seed's recipe
        fixed |= {name: getattr(args, name) for name in SEED_RECIPE}
    folds = args.folds if not args.resume or "folds" in args.given else None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: every rank extracts its share, rank 0 tunes
        from .training.distributed import distributed_tune as tune
    search = {name: values for name, values in (("backbone", args.search_backbones), ("tiles", args.search_tiles))
              if values}
    result = tune(args.data, trials=args.trials, folds=folds, timeout=args.timeout, resume=args.resume,
                  progress=not args.quiet, final=args.final, search=search, **fixed)
    if result is None:  # a torchrun rank other than 0, whose share of the features is written
        return
    if not result.best_params:
        print(f"no completed trial yet; the study is in {result.run_dir}")
        return
    if result.final_run:
        print(f"final model (best settings, all data): {result.final_run.run_dir / 'best.pt'}")
    if result.verdict["message"]:
        print(f"warning: {result.verdict['message']}")
    print(f"best {result.folds}-fold cross-validated accuracy {result.best_accuracy:.3f} ({result.start_name} "
          f"{result.start_accuracy:.3f}; always {result.baseline['majority_class']} "
          f"{result.baseline['accuracy']:.3f}); output folder {result.run_dir}")


def run_predict(args) -> int:
    from .inference.load import load_classifier  # torch is imported only for a .pt or .torchscript model

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: each rank predicts its share, rank 0 prints
        from .inference.distributed import predict_sharded

        classifier, results = predict_sharded(args.checkpoint, args.images, threshold=args.threshold,
                                              progress=not args.quiet, device=args.device, weights=args.weights,
                                              cache=args.cache)
        if results is None:
            return 0
    else:
        classifier = load_classifier(args.checkpoint, weights=args.weights, device=args.device, cache=args.cache)
        results = classifier.predict(args.images, threshold=args.threshold, progress=not args.quiet)
    names = classifier.class_names
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif args.format == "csv":  # the columns of a run's predictions.csv: one probability per class
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "label", *(f"p_{name}" for name in names), "error"])
        for r in results:
            probabilities = [f"{r.probabilities[name]:.4f}" if r.label else "" for name in names]
            writer.writerow([r.path, r.label or "", *probabilities, r.error or ""])
    else:
        # With a threshold the label follows the positive class's probability, so that is the one shown.
        shown_class = names[1] if args.threshold is not None else None
        column = f"p({shown_class})" if shown_class else "probability"
        width = max([len(r.path) for r in results] + [4])
        label_width = max([len(name) for name in names] + [5])
        print(f"{'path':<{width}}  {'label':<{label_width}} {column}")
        for r in results:
            if r.label:
                shown = f"{r.label:<{label_width}} {r.probabilities[shown_class or r.label]:.3f}"
            else:
                shown = f"{'-':<{label_width}} error: {r.error}"
            print(f"{r.path:<{width}}  {shown}")
    if not any(r.label for r in results):
        print(f"error: none of the {len(results)} files could be read (each row says why)", file=sys.stderr)
    return 0 if all(r.label for r in results) else 1


def run_evaluate(args) -> None:
    from .inference.evaluate import evaluate

    out_dir, metrics = evaluate(args.checkpoint, args.data, out=args.out, name=args.name,
                                threshold=args.threshold, progress=not args.quiet, weights=args.weights,
                                device=args.device, cache=args.cache)
    print(accuracy_phrase(metrics))
    print_warnings(metrics)
    confusion = metrics["confusion"]
    for k, (name, row) in enumerate(metrics["per_class"].items()):
        predicted = sum(line[k] for line in confusion)  # no image called this class: its precision is undefined
        precision = f"{row['precision']:.3f}" if predicted else "n/a"
        recall = f"{row['recall']:.3f}" if row["support"] else "n/a"
        print(f"  {name:<16} precision {precision:<5}  recall {recall:<5}  f1 {row['f1']:.3f}  "
              f"support {row['support']}")
    names = list(metrics["per_class"])
    corner = "truth / predicted"
    width = max(len(name) for name in names + [corner])
    print("confusion (rows: truth, columns: predicted)")
    print(f"  {corner:<{width}} " + " ".join(f"{name:>{max(len(name), 5)}}" for name in names))
    for name, line in zip(names, confusion):
        print(f"  {name:<{width}} " + " ".join(f"{count:>{max(len(other), 5)}}" for other, count in zip(names, line)))
    copies = copies_sentence(metrics)
    if copies:
        print(copies)
    from .storage import is_url, join

    print(f"report {join(args.out, out_dir.name, 'report.html') if is_url(args.out) else out_dir / 'report.html'}")


def run_info(args) -> None:
    from .checkpoint import describe, load_checkpoint, short
    from .inference.load import EXPORT_SUFFIXES, resolve_model_path

    path = resolve_model_path(args.checkpoint)
    if path.suffix.lower() in EXPORT_SUFFIXES:  # an exported file: the metadata `stopsign export` wrote
        if path.suffix.lower() == ".onnx":
            from .inference.onnx import OnnxClassifier  # no torch

            metadata = OnnxClassifier(path).metadata
        else:
            from .inference.torchscript import load_torchscript

            metadata = load_torchscript(path)[1]
        for key, value in metadata.items():
            print(f"{key:<18} {short(value) if not isinstance(value, dict) else ', '.join(f'{k} {short(v)}' for k, v in value.items())}")
        return
    checkpoint = load_checkpoint(path)
    for key, value in describe(checkpoint, path):
        print(f"{key:<18} {value}")
    print("settings")
    for key, value in (checkpoint.get("config") or {}).items():
        if key not in ("backbone_weights_sha256", "preprocessing", "versions"):  # shown above
            print(f"  {key:<16} {short(value)}")


def run_demo(args) -> None:
    from .data.demo import demo_data
    from .training.trainer import train

    data, reused = demo_data(args.data, per_class=args.per_class, seed=args.seed, progress=not args.quiet)
    print(f"demo data: {'reusing the ' if reused else ''}{2 * args.per_class} generated street scenes in {data}")
    result = train(data, backbone="efficientnet_lite0", epochs=args.epochs, seed=args.seed, out=args.out,
                   name="demo", progress=not args.quiet)
    print(f"plots: {result.run_dir / 'plots'}; report: {result.run_dir / 'report.html'}")
    print_result(result)


def run_cache(args) -> None:
    from .cache import cache_info, clear_cache

    info = (clear_cache if args.action == "clear" else cache_info)(args.cache_dir)
    verb = "removed" if args.action == "clear" else "holds"
    print(f"feature cache {info['root']} {verb} {info['entries']} entries, {info['bytes'] / 1e6:.1f} MB")
    for name, folder in info["folders"].items():
        print(f"  {name:<32} {folder['entries']:>8} entries {folder['bytes'] / 1e6:>9.1f} MB")
    for name, store in info["stores"].items():
        print(f"{name} {store['path']} {verb} {store['files']} files, {store['bytes'] / 1e6:.1f} MB")


def run_export(args) -> None:
    from .deploy.export import export

    path, report = export(args.checkpoint, format=args.format, out=args.out)
    print(f"exported {report['path']} ({report['format']}, {report['bytes'] / 1e6:.1f} MB)")
    print(f"checked against PyTorch on {report['image_source']}, batch sizes "
          f"{' and '.join(map(str, report['batch_sizes']))}: max |difference| of probabilities "
          f"{report['max_abs_diff']:.2g} (limit {report['tolerance']:g}), same predicted classes")


def run_serve(args) -> None:
    from .deploy.serve import check_port, create_app, run_app

    check_port(args.host, args.port)  # a port in use is one line before the model loads and before "serving"
    app = create_app(args.model, max_upload_bytes=int(args.max_upload_mb * 2**20), threshold=args.threshold,
                     device=args.device)
    classes = ", ".join(app.state.classifier.class_names)  # said once the model has loaded, not before
    print(f"serving {args.model} ({classes}) at http://{args.host}:{args.port}/ (Ctrl+C stops)", flush=True)
    run_app(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


def run_review(args) -> None:
    from .training.review import REVIEW_DEFAULTS, find_suspects

    config = TrainConfig(**REVIEW_DEFAULTS, **{name: getattr(args, name) for name in REVIEW_FIELDS})
    review = find_suspects(args.data, config=config, folds=args.folds, add=args.add, out=args.out,
                           progress=not args.quiet)
    kinds = [("suspected label errors", lambda s: not s.new and s.suggested is not None),
             ("unreadable", lambda s: not s.new and s.suggested is None), ("new photos", lambda s: s.new)]
    counts = ", ".join(f"{sum(map(test, review.suspects))} {kind}" for kind, test in kinds)
    print(f"{counts} among {len(review.data.samples)} images ({review.folds}-fold, {review.seconds:.1f} s): "
          f"{review.issues_file}")
    if args.serve:
        from .deploy.review import create_review_app
        from .deploy.serve import run_app

        app = create_review_app(review, out=args.out)
        print(f"review page at http://{args.host}:{args.port}/ : decisions are written to {review.data_path} and "
              f"logged in {Path(args.out) / 'decisions.jsonl'} (Ctrl+C stops)", flush=True)
        run_app(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


COMMANDS = {"train": run_train, "predict": run_predict, "evaluate": run_evaluate, "info": run_info,
            "demo": run_demo, "cache": run_cache, "export": run_export, "serve": run_serve, "tune": run_tune,
            "review": run_review}


class _Messages(logging.StreamHandler):
    """stopsign's own INFO messages (the data line, a row per epoch) as plain lines on stderr, unless -q."""

    def __init__(self):
        super().__init__()
        self.addFilter(lambda record: record.levelno == logging.INFO and record.name.startswith("stopsign"))
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr  # looked up for each record: whoever replaced sys.stderr since (a test runner) gets it

    @stream.setter
    def stream(self, value) -> None:
        """StreamHandler.__init__ assigns the stream it was given; this handler always writes to sys.stderr."""


def configure_logging(quiet: bool) -> None:
    """Warnings from everyone as "WARNING: ..." lines (also with -q); stopsign's INFO lines unless quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    root = logging.getLogger()
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)  # INFO goes through _Messages only, once
    messages = next((h for h in root.handlers if isinstance(h, _Messages)), None)
    if quiet and messages:
        root.removeHandler(messages)
    elif not quiet and not messages:
        root.addHandler(_Messages())
    logging.getLogger("stopsign").setLevel(logging.WARNING if quiet else logging.INFO)


def given_options(argv: list[str] | None) -> set[str]:
    """The destinations of the options written on the command line (not their defaults): a second parse in which
    every default of the subcommand is suppressed."""
    parser = build_parser()
    command = parser.parse_args(argv).command
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    sub._defaults.clear()
    return set(vars(parser.parse_args(argv))) - {"command", "quiet"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.given = given_options(argv)
    configure_logging(args.quiet)
    if getattr(args, "recipe", None) == "seed":  # the seed's values for the settings the command line left unset
        for name, value in SEED_RECIPE.items():
            if name not in args.given:
                setattr(args, name, value)
    if getattr(args, "max_pixels", None):
        from .data.images import set_max_pixels

        set_max_pixels(args.max_pixels)
    try:
        if getattr(args, "storage_options", None):  # in the try: a malformed KEY=VALUE is one line and exit 2
            from .storage import set_storage_options

            set_storage_options(args.storage_options)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and args.command not in ("train", "tune", "predict"):
            raise StopsignError(f"`stopsign {args.command}` runs in one process; under torchrun only train, tune "
                                f"and predict share their work. Fix: run `stopsign {args.command} ...` without "
                                "torchrun")
        return COMMANDS[args.command](args) or 0
    except StopsignError as error:
        interrupted = isinstance(error, Interrupted)
        print(f"{'interrupted' if interrupted else 'error'}: {error}", file=sys.stderr)
        return 130 if interrupted else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `stopsign` command: main(), then an exit that skips the interpreter's last garbage collections.

    They walk every object that torch, matplotlib and the rest created, to free memory the ending process gives
    back anyway. Frozen objects are skipped; atexit handlers, flushing and closing still happen (freezing stops
    no other handler, whatever the order). This process is the command's own, so no caller's heap is touched;
    bench/bench_side_effects.py measures what it saves (case cliexit).
    """
    atexit.register(gc.freeze)
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `stopsign predict … | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error while exiting
        code = 141  # the shell's code for a command ended by SIGPIPE
    sys.exit(code)


if __name__ == "__main__":
    run()
