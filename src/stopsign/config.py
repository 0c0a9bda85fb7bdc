"""The settings, in three dataclasses by kind, whose defaults are stopsign's recipe:

- ModelConfig: what defines the model (backbone, input size, pooling, tiles, head, positive class). The checkpoint
  stores it with the head's own arguments, so a model rebuilds itself; a resumed run may not change it.
- TrainConfig: the recipe that fits the head (split, augmentation, optimisation, folds); `--recipe seed` is a preset.
- RunOptions: where and how fast a run goes (device, workers, cache, output folder); free to change on resume.

Settings holds one of each, and turns the flat settings (the command line's flags, config.json) into the three
parts and back. Each field carries its one help text (and, where it has one, its flag, choices and range) as
metadata; the command line builds `stopsign train`'s and `stopsign tune`'s flags from it, so a setting is described
once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StopsignError

# The registered backbones and schedulers, by name, here so that the CLI can offer them without importing
# torch; model/backbones.py and training/fitting.py check that their registries match.
BACKBONE_NAMES = ("resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SCHEDULER_NAMES = ("triangular2", "cosine", "constant")
POOLINGS = ("avg", "max", "gem", "regions")  # every one is computed by each backbone pass and cached (model/features.py)
HEADS = ("sgd", "logistic")
CLASS_WEIGHTS = ("none", "balanced")  # what `tune` searches; train also takes "auto" (the logistic head's K-fold)
DEVICE_HELP = ("where the backbone (and an SGD head) runs: auto (a CUDA GPU when PyTorch sees one, else the CPU), "
               "cpu, cuda, cuda:N or mps; CUDA autocasts to bf16 (else fp16), so its features are cached apart")


# Where train's defaults differ from the seed notebook's recipe, and why: bench/accuracy.py (README, "Choosing
# the defaults") scored region scoring over the whole image and a 3×3 grid of crops with a logistic head at
# 0.966 grouped 5-fold balanced accuracy and 0.934 on the second-source photos (negatives 0.966), against 0.932
# and 0.896 for a 2×2 grid, 0.926 and 0.699 for the seed's average pooling, whole image and SGD head; on the
# demo's held-out scenes 0.983 against 0.950 for a 2×2 grid. `--recipe seed` (Settings.seed_recipe()) is the
# seed's exactly.
SEED_RECIPE = {"pooling": "avg", "tiles": 1, "head": "sgd"}
# The settings only the SGD head reads. The logistic head solves a convex problem exactly (its C chosen by K-fold on
# the training split), so it has no epochs, batches, learning rates, schedule or label smoothing.
SGD_SETTINGS = ("epochs", "batch_size", "lr_base", "lr_max", "momentum", "weight_decay", "label_smoothing",
                "scheduler", "cycle_epochs")
# `stopsign demo`'s scenes per class: 270 per class train the head (held-out accuracy rises from about 0.91 with
# 108 to 0.95 with 270 on these features), and 30 per class make a held-out split worth reading (n = 60, not 24).
DEMO_PER_CLASS = 300
RECIPES = ("stopsign", "seed")
# The order the command line lists the settings' flags, and config.json, `stopsign info` and the report list them
# (that of the one settings class before the split, so that none of them changed).
LISTED = ("backbone", "weights", "image_size", "pooling", "tiles", "tile_pixels", "head", "class_weight",
          "val_fraction", "seed", "augment", "rotation", "views", "synthetic_negatives", "positive", "epochs",
          "batch_size", "lr_base", "lr_max", "momentum", "weight_decay", "label_smoothing", "scheduler",
          "cycle_epochs", "finetune", "cache", "cache_dir", "num_workers", "bf16", "device", "folds", "target_recall",
          "learning_curve", "log", "out", "name")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS says, else every core): what the decode
    workers, a GPU's decoders and serve's inference threads are sized by."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setting(default, help: str, *, flag: str | None = None, choices=None,
            low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A settings field: its default and what the command line needs to offer and check it.

    choices: a tuple, or a function returning one; low/high bound the value (inclusive unless low_open/high_open);
    flag defaults to --field-name.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "low": low,
                                            "high": high, "low_open": low_open, "high_open": high_open})


class Part:
    """What the three kinds of settings share: a flat dict of them, and a copy with some changed."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict):
        """The fields of this part among `values` (e.g. config.json's, which holds the others' too)."""
        return cls(**{name: value for name, value in values.items() if name in names(cls)})


def names(part: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(part))


def positive_index(class_names: list[str], positive: str | None = None) -> int | None:
    """The index of the positive class of two-class data (`positive`, else the class called stop); None for other
    data."""
    positive = positive or ("stop" if "stop" in class_names else None)
    return class_names.index(positive) if len(class_names) == 2 and positive in class_names else None


@dataclass
class ModelConfig(Part):
    """What defines the model: saved in its checkpoint, and fixed for a resumed run."""
    backbone: str = setting("resnet18", "pretrained backbone", choices=lambda: BACKBONE_NAMES)  # read when asked
    weights: str | None = setting(None, "a local copy of the backbone's weights, for machines without internet")
    image_size: int | None = setting(None, "input size in pixels (default: the backbone's native size)", low=32)
    pooling: str = setting("regions", "how the last feature map becomes features: max, avg (the seed's), gem "
                                  "(generalised mean, p=3), or regions (the max of each quarter of the map, of "
                                  "every tile: the head scores each region and an image scores its best, so a "
                                  "small sign is not averaged away); one backbone pass caches all four",
                           choices=POOLINGS)
    tiles: int = setting(3, "K > 1: features of the whole image and of a K×K grid of overlapping crops, combined "
                            "by max (small, distant signs); K×K+1 backbone passes per view, each cached; 1: the "
                            "whole image only (the seed's)", low=1, high=4)
    tile_pixels: int = setting(0, "P > 0: the crops are squares of P pixels of the photo (not a fraction of it; "
                                  "at most 2/3 of its shorter side), as many as cover it, at most --tiles × --tiles "
                                  "(larger squares where more would be needed), each resized to the input: a sign "
                                  "of s pixels is seen at s × input / P (280 with a 224 input: 0.8), however large "
                                  "the frame", low=0)
    head: str = setting("logistic", "the head's fit: logistic (multinomial logistic regression on standardised "
                                    "features, C chosen by grouped K-fold on the training split) or sgd (the seed's "
                                    "recipe: the optimisation settings below)", choices=HEADS)
    positive: str | None = setting(None, "the positive class of two-class data (default: the class called stop)")

    def positive_index(self, class_names: list[str]) -> int | None:
        return positive_index(class_names, self.positive)

    def head_arguments(self, num_features: int, class_names: list[str]) -> dict:
        """What model.pooling.make_head builds this model's head from besides its pooling: the checkpoint stores
        them beside these fields (checkpoint.model_arguments)."""
        return {"num_features": num_features, "num_classes": len(class_names),
                "positive_index": self.positive_index(class_names)}


@dataclass
class TrainConfig(Part):
    """The recipe that fits the head: how the data is split and augmented, and the optimisation."""
    class_weight: str = setting("none", "balanced: weigh each class by the inverse of its share of the training "
                                        "images; auto (logistic head): none or balanced, whichever has the lower "
                                        "class-balanced held-out log-loss in the K-fold that chooses C, so it is "
                                        "chosen again whenever photos are added", choices=(*CLASS_WEIGHTS, "auto"))
    # data
    val_fraction: float = setting(0.1, "share of each class held out for validation when the data gives no split",
                                  low=0, high=1, low_open=True, high_open=True)
    seed: int = setting(0, "drives the split, the shuffling and the augmentation draws")
    augment: bool = setting(True, "train-time horizontal flip and rotation (--no-augment: none)")
    rotation: float = setting(5.0, "largest rotation of an augmented view, degrees either way", low=0, high=180)
    views: int = setting(1, "augmented views cached per training image; each epoch samples one "
                            "(the README says why 1)", low=1)
    synthetic_negatives: int = setting(0, "N rendered street scenes of the negative kinds (other signs, red things; the "
                                          "demo's generator) added to the training split only, never to validation",
                                       low=0)
    # optimisation (the seed recipe)
    epochs: int = setting(10, "passes over the training set", low=1)
    batch_size: int = setting(32, "images per optimisation step", low=1)
    lr_base: float = setting(1e-6, "lowest learning rate of the cycle", low=0)
    lr_max: float = setting(1e-2, "highest learning rate of the cycle", low=0, low_open=True)
    momentum: float = setting(0.9, "SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = setting(0.0, "SGD weight decay", low=0)
    label_smoothing: float = setting(0.0, "CrossEntropyLoss label smoothing", low=0, high=1, high_open=True)
    scheduler: str = setting("triangular2", "learning-rate schedule: triangular2 (CyclicLR, the seed recipe), "
                                            "cosine or constant", choices=SCHEDULER_NAMES)
    cycle_epochs: int = setting(5, "CyclicLR is stepped once per epoch: the LR rises linearly from --lr-base to "
                                   "--lr-max over this many epochs, falls back over as many, and each later "
                                   "cycle's height halves", low=1)
    finetune: int = setting(0, "N > 0: once the head is fit, train it with at most the backbone's last N stages "
                               "(residual or MBConv blocks; EfficientNet-Lite's last stage is its head convolution) on "
                               "augmented views (random resized crop, colour jitter, flip, rotation; --no-augment: the "
                               "plain view), stopping early on the validation split, in epochs and in stages (the top "
                               "one, then one more while the validation loss falls), then fit the head again on the "
                               "tuned features; the frozen stages run once per view (README: Fine-tuning)", low=0)
    folds: int = setting(0, "K > 1: stratified K-fold cross-validation (report on out-of-fold predictions), "
                            "then the final model on all data", low=0)
    target_recall: float | None = setting(None, "two classes: the decision threshold is the largest whose "
                                                "out-of-fold recall of the positive class reaches this (default: "
                                                "the one that maximises out-of-fold balanced accuracy)",
                                          low=0, high=1, low_open=True)


@dataclass
class RunOptions(Part):
    """Where and how fast a run goes, not what it learns: a resumed run may change them (as Ultralytics'
    check_resume allows), e.g. continue on a GPU a run begun on a CPU."""
    cache: bool = setting(True, "train the head on cached backbone features (--no-cache: recompute the backbone "
                                "on augmented images every epoch, the seed's slow loop)")
    cache_dir: str | None = setting(None, "where backbone features are cached "
                                          "(default: $STOPSIGN_CACHE/features, else ~/.cache/stopsign/features)")
    num_workers: int = setting(2, "image decoding processes", flag="--workers", low=0)
    bf16: bool = setting(False, "bf16 autocast for the backbone pass (faster; may change some predictions)")
    device: str = setting("auto", DEVICE_HELP)  # checked by model/devices.py: cuda:N has no fixed choices
    out: str = setting("runs", "folder that holds run folders")
    name: str | None = setting(None, "run folder name (default: <backbone>-<time>; never overwrites)")
    learning_curve: bool = setting(False, "refit the head on shares of the training split under grouped folds: the "
                                          "score against images per class, extrapolated (an estimate), in the report")
    log: str | None = setting(None, "also log the settings, each epoch's metrics, the final figures and the "
                                    "report to a tracker: tensorboard, event files in RUN/tensorboard/ (`tensorboard "
                                    "--logdir RUN`; needs pip install 'stopsign[tensorboard]'), or mlflow, a run in "
                                    "RUN/mlruns/ or the store MLFLOW_TRACKING_URI names, with the report, best.pt "
                                    "and charts as artifacts (needs pip install 'stopsign[mlflow]')",
                              choices=("tensorboard", "mlflow"))


def setting_fields() -> list[dataclasses.Field]:
    """Every setting's field, of the three kinds, in the LISTED order."""
    fields = {f.name: f for part in (ModelConfig, TrainConfig, RunOptions) for f in dataclasses.fields(part)}
    return [fields[name] for name in LISTED]


@dataclass(frozen=True)
class Settings:
    """A run's settings: the model, the recipe and the run options. Flat (a name for each field of any of the
    three) on the command line and in config.json, the report and summary.json."""
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: TrainConfig = field(default_factory=TrainConfig)
    run: RunOptions = field(default_factory=RunOptions)

    def __iter__(self):
        """model, recipe, run = settings."""
        return iter((self.model, self.recipe, self.run))

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        """The settings among flat `values` (others, such as config.json's "data", are left out)."""
        return cls(ModelConfig.from_dict(values), TrainConfig.from_dict(values), RunOptions.from_dict(values))

    @classmethod
    def seed_recipe(cls, **overrides) -> "Settings":
        """The seed notebook's recipe exactly (average pooling, the whole image, the SGD head), then overrides."""
        return cls().replace(**recipe_settings("seed", overrides))

    def to_dict(self) -> dict:
        """Flat, in the LISTED order: what config.json, the checkpoint's "config" and the report record."""
        values = self.model.to_dict() | self.recipe.to_dict() | self.run.to_dict()
        return {name: values[name] for name in LISTED}

    def replace(self, **changes) -> "Settings":
        """These settings with flat `changes`, each made to the part it belongs to."""
        known(changes)
        return Settings(*(part.replace(**{k: v for k, v in changes.items() if k in names(type(part))})
                          for part in (self.model, self.recipe, self.run)))

    def conflicts(self, asked: dict) -> list[str]:
        """The settings in flat `asked` that differ from these, as "name: asked X, recorded Y" (for --resume, which
        continues with the recorded settings and must not silently ignore others); RunOptions may differ."""
        recorded = self.to_dict()
        known(asked)
        return [f"{name}: asked {value!r}, recorded {recorded[name]!r}" for name, value in asked.items()
                if name not in names(RunOptions) and recorded[name] != value]


def known(settings: dict) -> None:
    """A TypeError naming what in flat `settings` is no setting (as a dataclass names an unexpected argument)."""
    unknown = set(settings) - set(LISTED)
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")


def given_settings(model: ModelConfig | None, recipe: TrainConfig | None, run: RunOptions | None,
                   overrides: dict) -> dict:
    """What an API call (train, tune, find_suspects) was given, flat: the settings of the YAML file its `config=`
    override names (read_config), then every field of the parts it passed, then its other flat overrides.
    Settings().replace(**given) are a new run's settings; a resumed run checks them against its own."""
    overrides = dict(overrides)
    config = overrides.pop("config", None)
    parts = {name: value for part in (model, recipe, run) if part is not None for name, value in part.to_dict().items()}
    return (read_config(config) if config else {}) | parts | overrides


def recipe_settings(recipe: str, given: dict) -> dict:
    """The settings `--recipe NAME` stands for (RECIPES: "stopsign", the defaults; "seed", SEED_RECIPE), with
    those given explicitly winning: `--recipe seed --tiles 2` is the seed's recipe on a 2×2 grid."""
    if recipe not in RECIPES:
        raise StopsignError(f"there is no recipe {recipe!r}. Fix: name one of {', '.join(RECIPES)}")
    return (SEED_RECIPE if recipe == "seed" else {}) | given


def relevant_settings(settings: dict) -> dict:
    """Flat `settings` (all or some, e.g. a trial's parameters) less those the head they name never reads
    (SGD_SETTINGS, unless the head is sgd); a dict that names no head has the default one."""
    head = settings.get("head", ModelConfig.head)
    return {name: value for name, value in settings.items() if head == "sgd" or name not in SGD_SETTINGS}


def flag_name(field: dataclasses.Field) -> str:
    """A setting's flag on the command line: its own (metadata), else --field-name."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def command_flags(values: dict) -> list[str]:
    """The command line's flags that give flat `values`: one for each setting that differs from its default (a
    switch as --NAME or --no-NAME), in the LISTED order."""
    flags = []
    for field in setting_fields():
        value = values.get(field.name, field.default)
        if value == field.default or value is None:
            continue
        if isinstance(field.default, bool):
            flags.append(f"--no-{flag_name(field)[2:]}" if field.default else flag_name(field))
        else:
            flags += [flag_name(field), str(value)]
    return flags


def out_of_range(value: float, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> str | None:
    """What a number outside [low, high] (open ends where asked) must be, e.g. "it must be >= 1 and <= 4"; None
    for one within."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    upper = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    return f"it must be {' and '.join(filter(None, (lower, upper)))}"


KINDS = {"bool": ((bool,), "true or false"), "int": ((int,), "a whole number"), "float": ((int, float), "a number"),
         "str": ((str,), "text")}


def checked_setting(field: dataclasses.Field, value):
    """`value` of a setting as its flag would take it (type, choices, range), else a ValueError that says why."""
    kind, optional = field.type.split(" ")[0], "None" in field.type
    if value is None and optional:
        return None
    if kind == "float" and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML reads 1e-6 as text (YAML 1.1 wants 1.0e-6); a flag takes both
            value = float(value)
    types, expected = KINDS[kind]
    if (not isinstance(value, types) or isinstance(value, bool) != (kind == "bool")
            or kind == "float" and math.isnan(value)):
        raise ValueError(f"expected {expected}{' or null' if optional else ''}, got {value!r}")
    meta = field.metadata
    choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
    if choices and value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    if kind in ("int", "float") and (problem := out_of_range(value, meta["low"], meta["high"], meta["low_open"],
                                                             meta["high_open"])):
        raise ValueError(f"{value!r} is out of range: {problem}")
    return float(value) if kind == "float" else value


def unknown_setting(name) -> str:
    """A name that is no setting, quoted, with the one it may be a typo of."""
    close = difflib.get_close_matches(str(name), LISTED, n=1)
    return repr(name) + (f" (did you mean {close[0]}?)" if close else "")


def read_config(path: str | Path) -> dict:
    """The flat settings of a YAML file (`--config FILE`; every run's args.yaml is one): a `name: value` line per
    setting, each checked as its flag would be. A name that is no setting, or a value of the wrong type, choice or
    range, is a StopsignError naming the file, the key and the valid names or values."""
    import yaml  # only a run given a settings file reads YAML

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise StopsignError(f"cannot read the settings file {path}: {error.strerror or error}. Fix: give the path "
                            "of a YAML file, such as a run folder's args.yaml") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise StopsignError(f"{path} is not YAML: {where}{getattr(error, 'problem', None) or error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise StopsignError(f"{path} holds a {type(values).__name__}, not settings. Fix: write one `name: value` "
                            "line per setting, as a run folder's args.yaml does")
    unknown = [unknown_setting(name) for name in values if name not in LISTED]
    if unknown:
        what = "is no setting" if len(unknown) == 1 else "are no settings"
        raise StopsignError(f"{path}: {', '.join(unknown)} {what}. The settings are: {', '.join(LISTED)}")
    fields = {field.name: field for field in setting_fields()}
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = checked_setting(fields[name], value)
        except ValueError as error:
            raise StopsignError(f"{path}: {name}: {error}") from None
    return checked


def settings_yaml(settings: dict, command: str) -> str:
    """Flat settings as a YAML file that `stopsign COMMAND DATA --config FILE` (or `config=FILE` in the Python
    API) reads back: args.yaml, as Ultralytics and timm save a run's."""
    import yaml

    return (f"# the settings of this run: `stopsign {command} DATA --config args.yaml` runs them again "
            "(flags given win)\n" + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
