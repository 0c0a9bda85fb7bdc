"""train(): plan (data → groups → split, training/plan.py) → run folder → checks → features → (cross-validation)
→ fit() → report.

Each step is a function below or in plan.py, in the order train() calls them. config.json is written once the data proved
usable, data.json once the features are known (so it lists the files that could not be decoded), metrics.csv
and last.pt after every epoch: a run killed at any point resumes from its last finished epoch.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, RunOptions, Settings, TrainConfig, given_settings, names, settings_yaml
from ..checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from ..data.checks import check_data
from ..data.datasets import LabelledData, Sample, load_data
from ..errors import Interrupted, StopsignError
from ..files import atomic_write_text, now, read_json, write_csv, write_json
from ..model.features import FeatureExtractor, FeatureSet
from ..model.signature import compare_with_training, make_signature
from ..reporting.metrics import Predictions
from ..reporting.card import write_card
from ..reporting.report import write_report
from .crossval import cross_validate
from .finetune import finetune
from .fitting import AUTO_NEEDS_LOGISTIC, fit, learned_nothing, rising_epochs, stop_after_epoch
from .heads import head_threads
from .plan import Plan, extract, make_extractor, prepare, ranks, share
from ..storage import check_writable, exists, is_url, join
from ..runs import create_run_dir, local_run, remove_partial_files, run_upload
from .records import METRIC_COLUMNS, data_record, resume_state, summary, versions
from .sources import CachedFeatures, LiveImages
from .curve import learning_curve
from .threshold import out_of_fold_threshold
from .tracking import check_tracking, tracking

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_acc: float | None
    history: list[dict]
    metrics: dict = field(default_factory=dict)
    url: str | None = None  # where the run was uploaded, when --out was a URL


def train(data: str | Path | LabelledData | None = None, *, val: str | Path | None = None,
          model: ModelConfig | None = None, recipe: TrainConfig | None = None, run: RunOptions | None = None,
          resume: str | Path | None = None, progress: bool = True, distributed: bool | None = None,
          **overrides) -> RunResult | None:
    """Train a linear head on a frozen backbone and write a run folder. model, recipe, run: the settings (defaults
    where left out), then flat `overrides` of any of their fields (`train(data, epochs=5)`); `config="args.yaml"`
    among them: a YAML file's settings, under all the others. resume: an interrupted run's folder, whose own
    settings, split and (data None) data are used; settings given that differ from its own are an error, run options
    excepted. data, resume and run.out may be URLs (fetched; the run uploaded as it grows: storage.py). Under
    torchrun (distributed=None: when launched by it) every rank computes its share of the features, then rank 0
    trains and returns the RunResult; the others return None (plan.py)."""
    phases, clock, started = {}, time.perf_counter(), now()
    settings, run_dir, resume, resume_url = resolve_run(given_settings(model, recipe, run, overrides), resume)
    check_recipe(settings, val)
    recorded = read_json(run_dir / "data.json") if resume and (run_dir / "data.json").is_file() else None
    with ranks(settings.run.device, distributed) as (shard, device):
        settings, progress = settings.replace(device=device), progress and shard[0] == 0
        data, location = resolve_data(data, settings.model, run_dir, resume, progress)
        plan = prepare(data, settings, val=val, recorded=recorded, shard=shard, progress=progress)
        share(plan, shard, progress)  # under torchrun: this rank's share of the features, into the shared store
    if shard[0] != 0:
        return None  # rank 0 trains on what every rank computed
    model, recipe, run = settings.model, settings.recipe, settings.run
    run_dir = run_dir or create_run_dir(run.out, run.name, model.backbone)  # data proved usable: no empty folder
    sync = upload.sync if (upload := run_upload(run.out, run_dir, resume_url)) else lambda: None
    with discarded_unless_trained(run_dir, keep=bool(resume)), tracking(settings, run_dir) as tracker:
        checks = check_drawn(plan)
        extractor = make_extractor(model, run)
        record = run_record(settings, location or str(data.root), extractor)
        if not resume:
            write_settings(run_dir, record, settings)
        phases["load and check data"] = time.perf_counter() - clock

        hint = f"Continue with: stopsign train {location or data.root} --resume {upload.url if upload else run_dir}"
        with timed(phases, "features"):
            source, features = make_source(extractor, plan, progress, hint)
            skipped = data.skipped | source.skipped  # files the listing could not use, then those not decoded
            kept = without_skipped(skipped, train=plan.training, val=plan.val)
            log.info("%s", describe_data(plan, kept, val, unreadable=source.skipped))  # once the counts are true
            if recorded is None:
                write_json(run_dir / "data.json", data_record(data.root, data.layout, data.class_names, kept, skipped,
                                                              record, plan.groups, plan.folds, plan.synthetic))
        if recipe.finetune:
            with timed(phases, "fine-tune"):  # the backbone's last stages, then the tuned backbone's features
                extractor, source, features = tune_backbone(run_dir, extractor, source, plan, progress, hint)

        signature, val_marks = describe_training(features, plan.groups)
        cv = None
        if recipe.folds > 1:
            with timed(phases, "cross-validation"):
                cv = cross_validate(source, plan.train, data.class_names, extractor.feature_size, model, recipe,
                                    plan.groups, plan.synthetic, progress=progress)

        with timed(phases, "train head"):
            result = fit_and_save(run_dir, source, extractor, data.class_names, plan.training, plan.val, settings,
                                  record, state=resume_state(run_dir) if resume else None, progress=progress, cv=cv,
                                  resume_hint=hint, trained_on=signature, groups=plan.groups,
                                  synthetic=plan.synthetic, after_save=sync, tracker=tracker)
            sync()  # best.pt
        if stuck := learned_nothing(result, plan.training, model, recipe):
            log.error("%s", stuck)

        clock, completed = time.perf_counter(), now()
        predictions = cv.pop("oof") if cv else validation_predictions(result, data.class_names, val_marks)
        info = run_info(data, kept, skipped, settings, extractor, plan.synthetic, cv=cv,
                        times={"started": started, "completed": completed, "phases": phases})
        metrics = write_report(run_dir, predictions, history=result.history, run_info=info, checks=checks, cv=cv,
                               test=score_test(plan, features, result.head, signature),
                               threshold=reported_threshold(result, cv), title=f"stopsign run {run_dir.name}",
                               warnings=[stuck] if stuck else [], learning_curve=result.learning_curve)
        share_trained = len(kept["train"]) / (len(kept["train"]) + (0 if val is not None else len(kept["val"])))
        write_summary(run_dir, summary(record, result.history, result.best, started, completed,
                                       share_trained=share_trained, cv_accuracy=cv["mean"]["accuracy"] if cv else None,
                                       metrics=metrics, threshold=result.threshold), tracker)
        if upload:
            upload.finish()  # the report, then summary.json
        phases["report"] = time.perf_counter() - clock
        log.debug("phases: %s", {k: round(v, 2) for k, v in phases.items()})
        return RunResult(run_dir, result.best["epoch"], result.best["val_acc"], result.history, metrics,
                         upload.url if upload else None)


def resolve_run(given: dict, resume: str | Path | None) -> tuple[Settings, Path | None, str | Path | None, str | None]:
    """The settings, the run folder when resuming, the run to resume (the local copy of one at a URL) and its URL.
    Where a URL will be written to, its credentials and bucket are checked first, before anything is fetched."""
    resume_url = str(resume) if resume and is_url(str(resume)) else None
    if resume_url:
        check_writable(resume_url)  # credentials and bucket, before the data is fetched or anything trained
    resume = local_run(resume_url) if resume_url else resume
    settings, run_dir = resolve_settings(given, resume, url=resume_url)
    if is_url(settings.run.out) and not resume:
        check_writable(settings.run.out)
    check_tracking(settings.run.log)  # the package --log needs, before anything is fetched
    return settings, run_dir, resume, resume_url


def check_recipe(settings: Settings, val: str | Path | None) -> None:
    """A warning when training is shorter than one learning-rate cycle; an error for --val or --finetune with
    --folds, for --class-weight auto without the logistic head, and for --tile-pixels without tiles."""
    recipe = settings.recipe
    cycled = settings.model.head == "sgd" and recipe.scheduler == "triangular2"
    if cycled and rising_epochs(recipe) < recipe.cycle_epochs:
        log.warning("%d epochs are fewer than one learning-rate cycle (%d up, %d down): the cycle rises over %d "
                    "epoch(s) instead, so the rate reaches --lr-max", recipe.epochs, recipe.cycle_epochs,
                    recipe.cycle_epochs, rising_epochs(recipe))
    if recipe.class_weight == "auto" and settings.model.head != "logistic":
        raise StopsignError(AUTO_NEEDS_LOGISTIC)
    if settings.model.tile_pixels and settings.model.tiles <= 1:
        raise StopsignError("--tile-pixels sizes the crops of --tiles K, at most K×K of them, and --tiles is 1 (the "
                            "whole image only). Fix: add --tiles 4 (up to 16 crops), or drop --tile-pixels")
    if recipe.finetune and recipe.folds > 1:
        raise StopsignError("--finetune stops early on the validation split, and --folds trains on every image with "
                            "none held out. Fix: drop --folds (a validation split is drawn), or drop --finetune")
    if val is not None and recipe.folds > 1:
        raise StopsignError("--val and --folds do not combine: cross-validation scores every image of DATA out of "
                            "fold, and a separate validation set would be merged into it. Fix: use one of them")


def resolve_data(data: str | Path | LabelledData | None, model: ModelConfig, run_dir: Path | None,
                 resume: str | Path | None, progress: bool) -> tuple[LabelledData, str | None]:
    """The labelled data (DATA, else the resumed run's own), checked against --positive, and the URL config.json
    records for it (None when it is not one)."""
    if data is None:
        if not resume:
            raise StopsignError("no data to train on: give DATA (or --resume RUN_DIR to continue a run)")
        data = read_json(run_dir / "config.json").get("data")  # what `--resume RUN` trains on without DATA
        if not data:
            raise StopsignError(f"{run_dir} does not record its data folder (a run of stopsign 0.1): give DATA too")
    location = str(data) if is_url(str(data)) else None  # what config.json records: the URL, not its mirror
    data = data if isinstance(data, LabelledData) else load_data(data, progress=progress)
    # an error, not a silent fallback: the regions head and the synthetic negatives would do without a positive
    if model.positive is not None and model.positive_index(data.class_names) is None:
        raise StopsignError(f"--positive {model.positive}: the positive class must be one of two classes; these "
                            f"data have {data.class_names}. Fix: name one of them, or drop --positive")
    return data, location


def check_drawn(plan: Plan) -> dict:
    """The data checks of what was drawn (each fold with --folds, else train and validation), warnings logged."""
    folds = plan.settings.recipe.folds
    drawn = ({f"fold {k}": [s for s in plan.train if plan.folds[str(s.path)] == k]
              for k in range(1, folds + 1)} if plan.folds else {"train": plan.train, "val": plan.val})
    checks = check_data(drawn, plan.data.class_names)  # the crossing count is of what was drawn, folds included
    for warning in checks.get("warnings", []):
        log.warning("%s", warning)
    return checks


def run_record(settings: Settings, data_location: str, extractor: FeatureExtractor) -> dict:
    """What config.json records: the settings (flat), the data's location, the backbone's weights and
    preprocessing, and the versions of the libraries."""
    return settings.to_dict() | {"data": data_location, "backbone_weights_sha256": extractor.weights_sha256,
                               "preprocessing": extractor.preprocessing, "versions": versions()}


def write_settings(run_dir: Path, record: dict, settings: Settings) -> None:
    """config.json (run_record's) and args.yaml: the settings alone, which `--config` and `config=` read back."""
    write_json(run_dir / "config.json", record)
    atomic_write_text(run_dir / "args.yaml", settings_yaml(settings.to_dict(), "train"))


def write_summary(run_dir: Path, run_summary: dict, tracker=None) -> None:
    """The model card (README.md), --log's final figures and charts (`tracker`'s), then summary.json: last, so that
    a reader who finds it knows the run is whole."""
    write_card(run_dir, run_summary)
    if tracker:
        tracker.log_run(run_summary, run_dir)
    write_json(run_dir / "summary.json", run_summary)


def without_skipped(skipped: dict[str, str], **samples: list[Sample]) -> dict[str, list[Sample]]:
    """Each named list of samples without the files in `skipped` (those that could not be listed or decoded)."""
    return {name: [s for s in part if str(s.path) not in skipped] for name, part in samples.items()}


def reported_threshold(result, cv: dict | None) -> float | None:
    """The threshold the report scores the validation and test images at: the one the model will predict with;
    but cross-validation's out-of-fold predictions at 0.5, since the threshold was chosen on them."""
    return result.threshold["value"] if result.threshold and not cv else None


def validation_predictions(result, class_names: list[str], val_marks: dict) -> Predictions:
    """The kept head's predictions of the validation images it could read, each marked if a training image's copy
    and if unlike the training images (describe_training's marks)."""
    marks = [val_marks.get(str(s.path), (None, None)) for s in result.val_samples]
    return Predictions([str(s.path) for s in result.val_samples], [s.label for s in result.val_samples],
                       result.val_probs, class_names, copies=[copy for copy, _ in marks],
                       unfamiliar=[unfamiliar for _, unfamiliar in marks])


def run_info(data: LabelledData, kept: dict[str, list[Sample]], skipped: dict[str, str], settings: Settings,
             extractor: FeatureExtractor, synthetic: list[Sample], *, cv: dict | None, times: dict) -> dict:
    """The report's account of the run: data, skipped files, backbone, settings, times (started, completed and
    the seconds of each phase)."""
    return {
        "data": {"source": str(data.root), "layout": data.layout, "classes": list(data.class_names),
                 "train": data.class_counts(kept["train"]), "validation": data.class_counts(kept["val"])},
        "skipped files": [{"file": p, "reason": r} for p, r in sorted(skipped.items())] or "none",
        "backbone": {"name": settings.model.backbone, "weights sha256": extractor.weights_sha256,
                     "features": "cached" if settings.run.cache else "recomputed every epoch",
                     **({"fine-tuned": describe_tuned(extractor.tuned)} if extractor.tuned else {})},
        "synthetic negatives": (f"{len(synthetic)} rendered scenes with other signs and red things, in the "
                                "training split only" if synthetic else "none"),
        "evaluated on": f"out-of-fold predictions of {settings.recipe.folds}-fold cross-validation" if cv
                        else "the validation split",
        "settings": settings.to_dict(), "started": times["started"], "completed": times["completed"],
        "seconds per phase": {k: round(v, 3) for k, v in times["phases"].items()},
    }


LAYOUT_NAMES = {"cvstudio": "CV Studio export", "folders": "class folders", "splits": "split folders",
                "csv": "CSV"}


def describe_data(plan: Plan, kept: dict[str, list[Sample]], val: str | Path | None,
                  unreadable: dict[str, str] | None = None) -> str:
    """The line a training command shows once the features are known: layout, classes and counts of the readable
    images, how validation is drawn, and how many images were skipped as unreadable.

    kept: the readable images trained and validated on (rendered ones are left out here); unreadable: the paths
    that could not be decoded, of any set."""
    data, recipe, groups, unreadable = plan.data, plan.settings.recipe, plan.groups, unreadable or {}
    rendered = {s.path for s in plan.synthetic}
    train_samples, val_samples = [s for s in kept["train"] if s.path not in rendered], kept["val"]
    readable = [s for s in data.samples if str(s.path) not in unreadable]
    counts = " / ".join(f"{name} {count}" for name, count in data.class_counts(readable).items())
    grouping = f", grouped by {len(set(groups.values()))} duplicate groups" if groups else ""
    if recipe.folds > 1:
        how = f"{recipe.folds}-fold cross-validation over {len(train_samples)} images{grouping}, then all of them"
    elif val is not None:
        how = f"validation: {len(val_samples)} images of {val}"
    elif data.splits:
        how = f"the layout's split {len(train_samples)}/{len(val_samples)}"
    else:
        how = f"split {len(train_samples)}/{len(val_samples)}{grouping}"
    skipped = f"; {len(unreadable)} unreadable image{'s' * (len(unreadable) != 1)} skipped" if unreadable else ""
    return f"{LAYOUT_NAMES.get(data.layout, data.layout)}: {len(readable)} images, {counts}; {how}{skipped}"


def score_test(plan: Plan, features: dict[str, FeatureSet], head, signature: dict) -> Predictions | None:
    """The layout's test/ split, scored once with the kept model: the unbiased figure (None without one)."""
    if not plan.test:
        return None
    scored, plain = features["test"], features["test plain"]  # as the head sees them; the signature's kind
    label_of = {s.path: s.label for s in plan.test}
    with torch.no_grad():
        probs = head(torch.from_numpy(scored.features[:, 0])).softmax(1).numpy()
    found = compare_with_training(signature, plain.digests, plain.features[:, 0])
    return Predictions([str(p) for p in scored.paths], [label_of[p] for p in scored.paths], probs,
                       plan.data.class_names, copies=found.copies, unfamiliar=found.unfamiliar)


@contextmanager
def timed(phases: dict[str, float], name: str):
    """The block's wall seconds, as phases[name] (the report's seconds per phase)."""
    clock = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - clock


@contextmanager
def discarded_unless_trained(run_dir: Path, *, keep: bool):
    """A new run folder that fails before its first epoch is written is removed: an error leaves nothing behind.
    Ctrl-C keeps it (its features are cached and --resume continues it), and so does a resumed run."""
    try:
        yield
    except Exception as error:
        if not keep and not isinstance(error, Interrupted) and not (run_dir / "metrics.csv").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resolve_settings(given: dict, resume: str | Path | None, *, url: str | None = None
                     ) -> tuple[Settings, Path | None]:
    """The settings of this run (`given`: flat, as given_settings() says), and the run folder when resuming: its
    own config.json wins, and only run options may differ from it. A finished run is refused; one at a URL
    (resume is then its local copy) has finished once the bucket holds its summary.json."""
    if not resume:
        return Settings().replace(**given), None
    run_dir = Path(resume)
    if not run_dir.is_dir():
        what = ("it is a file, not a run folder" if run_dir.exists()
                else "the folder does not exist, so it is not a run folder")
        raise StopsignError(f"cannot resume {url or run_dir}: {what}. Fix: give the folder `stopsign train` named "
                            "(under --out, runs/ by default), or start a new run without --resume")
    # summary.json is written (and uploaded) last: a run that has it is whole. One whose last upload failed has
    # it only in its local copy, and resuming is what finishes that upload.
    if exists(join(url, "summary.json")) if url else (run_dir / "summary.json").is_file():
        raise StopsignError(f"cannot resume {url or run_dir}: that run finished (it has summary.json), and resuming "
                            "would refit it and overwrite its report. Fix: start a new run without --resume, or "
                            f"score it on other data with `stopsign evaluate {url or run_dir} DATA`")
    if not (run_dir / "config.json").is_file():  # written before training: a run that began has it
        raise StopsignError(f"cannot resume {run_dir}: it has no config.json, so it is not a run folder or "
                            "was stopped before training began. Fix: start a new run without --resume")
    recorded = Settings.from_dict(read_json(run_dir / "config.json"))
    conflicts = recorded.conflicts(given)
    if conflicts:
        raise StopsignError(f"cannot resume {run_dir} with other settings than it recorded ({'; '.join(conflicts)}). "
                            "Fix: resume without them, or start a new run with them")
    remove_partial_files(run_dir)
    return recorded.replace(**{name: value for name, value in given.items() if name in names(RunOptions)}), run_dir


def make_source(extractor: FeatureExtractor, plan: Plan, progress: bool, resume_hint: str
                ) -> tuple[CachedFeatures | LiveImages, dict[str, FeatureSet]]:
    """Where fit() gets its batches: cached features (each view computed once) or, with cache=False, live images;
    and the features of every request of the plan (with cache=False, of those the live path does not read)."""
    model, recipe, run = plan.settings.model, plan.settings.recipe, plan.settings.run
    live = None if run.cache else LiveImages(extractor, plan.training + plan.val, model, recipe, run)
    try:
        features = extract(plan.requests(), extractor, skipped=live.skipped if live else None, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped while computing features; those computed are cached. {resume_hint}") from None
    return live or CachedFeatures(extractor, plan.training, plan.held_out, model, recipe, features=features), features


def tune_backbone(run_dir: Path, extractor: FeatureExtractor, source, plan: Plan, progress: bool, resume_hint: str
                  ) -> tuple[FeatureExtractor, CachedFeatures | LiveImages, dict[str, FeatureSet]]:
    """--finetune: a head fit on the frozen features, then the backbone's last stages trained with it
    (training/finetune.py); returns the tuned backbone's extractor, source and features of every request of the
    plan, which the head is fit on again. A resumed run keeps the stages its last.pt holds."""
    model, recipe = plan.settings.model, plan.settings.recipe
    last = run_dir / "last.pt"
    tuned = load_checkpoint(last).get("tuned") if last.is_file() else None
    if tuned is None:
        names = plan.data.class_names
        first = fit(source, extractor.feature_size, len(names), plan.training, plan.val, model, recipe,
                    groups=plan.groups, positive=model.positive_index(names))
        try:
            weighted = recipe.replace(class_weight=first.best.get("class_weight", recipe.class_weight))  # auto's
            tuned = finetune(extractor, first.head, plan.training, plan.val, model, weighted, progress=progress)
        except KeyboardInterrupt:
            raise Interrupted(f"stopped while fine-tuning; the frozen features are cached. {resume_hint}") from None
    tuned_extractor = make_extractor(model, plan.settings.run, tuned=tuned)
    return (tuned_extractor, *make_source(tuned_extractor, plan, progress, resume_hint))


def describe_tuned(tuned: dict) -> str:
    """The report's line on the fine-tuning: what was trained, for how long, and its cost."""
    best = tuned["history"][tuned["best_epoch"] - 1]
    tried = ", ".join(f"{t['stages']}: {t['val_loss']:.4f}" for t in tuned["tried"])
    return (f"the last {tuned['stages']} stage(s) (best validation loss for {tried}), {len(tuned['history'])} "
            f"epoch(s), kept epoch {tuned['best_epoch']} "
            f"(validation loss {best['val_loss']:.4f}, accuracy {best['val_acc']:.3f}); {tuned['passes']} passes of "
            f"the frozen stages, {tuned['seconds']} s; state sha256 {tuned['sha256'][:16]}")


def describe_training(features: dict[str, FeatureSet], groups: dict[str, int]
                      ) -> tuple[dict, dict[str, tuple[str | None, bool | None]]]:
    """The signature of the training images (plain views: one more backbone pass each on a cold cache, since
    training itself needs only augmented views), its unfamiliar cut-off calibrated with their duplicate `groups`,
    and for each validation image whether it is a copy of one and whether it is unlike them."""
    trained, held = features["trained"], features["validated"]
    signature = make_signature(trained.digests, trained.features[:, 0], [groups.get(str(p)) for p in trained.paths])
    found = compare_with_training(signature, held.digests, held.features[:, 0])
    unfamiliar = found.unfamiliar or [None] * len(held.paths)
    return signature, {str(path): marks for path, marks in zip(held.paths, zip(found.copies, unfamiliar))}


def fit_and_save(run_dir: Path, source, extractor: FeatureExtractor, class_names: list[str],
                 train_samples: list[Sample], val_samples: list[Sample], settings: Settings, record: dict, *,
                 state: dict | None, progress: bool, resume_hint: str, trained_on: dict,
                 groups: dict[str, int] | None = None, synthetic: list[Sample] = (), cv: dict | None = None,
                 after_save=lambda: None, tracker=None):
    """fit(), writing metrics.csv and last.pt after every epoch (its row to `tracker` too, --log's) and best.pt at
    the end; the first Ctrl-C stops after the current epoch's files are written. The checkpoints hold the flat
    settings (`record`) and the model's own arguments, its head's included."""
    model, recipe = settings.model, settings.recipe
    backbone = {"name": extractor.name, "weights_sha256": extractor.weights_sha256,
                "feature_size": extractor.feature_size, "preprocessing": extractor.preprocessing}
    arguments = model.to_dict() | model.head_arguments(extractor.feature_size, class_names)

    def save_epoch(row: dict, epoch_state: dict) -> None:
        write_csv(run_dir / "metrics.csv", epoch_state["history"], METRIC_COLUMNS)
        validated = "" if row["val_acc"] is None else f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
        rate = "" if row["lr"] is None else f"  lr {row['lr']:.2g}"  # a logistic head has no learning rate
        total = 1 if model.head == "logistic" else recipe.epochs  # a logistic head is fit in one step
        log.info("epoch %d/%d%s  train loss %.4f acc %.3f%s", row["epoch"], total, rate, row["train_loss"],
                 row["train_acc"], validated)
        save_checkpoint(run_dir / "last.pt", make_checkpoint(epoch_state["head"], backbone, class_names, record, row,
                                                             model=arguments, resume=epoch_state,
                                                             trained_on=trained_on, tuned=extractor.tuned))
        if tracker:
            tracker.log_epoch(row)
        after_save()  # with --out URL: this epoch's files to the bucket
        if stop.is_set():
            raise Interrupted(f"stopped after epoch {row['epoch']} of {recipe.epochs}; its files are written. "
                              f"{resume_hint}")

    rendered = set(synthetic)
    real = [s for s in train_samples if s not in rendered]

    def threshold(fitted: dict) -> dict | None:
        return out_of_fold_threshold(source, real, class_names, extractor.feature_size, model, recipe, fitted,
                                     groups=groups, extra_train=synthetic, oof=cv["oof"] if cv else None,
                                     progress=progress)

    # A logistic head's threshold needs only its chosen C and class weight: its fold fits run beside the final fit
    beside = []
    logistic = model.head == "logistic" and isinstance(source, CachedFeatures)
    with stop_after_epoch() as stop, ThreadPoolExecutor(1) as pool, \
            head_threads(source) if logistic else nullcontext():
        result = fit(source, extractor.feature_size, len(class_names), train_samples, val_samples, model, recipe,
                     state=state, on_epoch=save_epoch, progress=progress, groups=groups,
                     keep="last" if recipe.folds > 1 else "best", positive=arguments["positive_index"],
                     on_chosen=lambda fitted: beside.append(pool.submit(threshold, fitted)))
        result.threshold = beside[0].result() if beside else threshold(result.best)
    if recipe.class_weight == "auto":
        log.info("class weight: %s, chosen out of fold with C = %g", result.best["class_weight"], result.best["C"])
    if result.threshold:
        log.info("decision threshold: p(%s) >= %.3f (%s: %.3f, against %.3f at 0.5)", class_names[1],
                 result.threshold["value"], result.threshold["rule"], result.threshold["oof_balanced_accuracy"],
                 result.threshold["oof_at_0.5_balanced_accuracy"])
    if settings.run.learning_curve:
        result.learning_curve = learning_curve(source, real, class_names, extractor.feature_size, model, recipe,
                                               result.best, groups=groups, progress=progress)
        if result.learning_curve:
            log.info("learning curve: %s (plots/learning_curve.png: an estimate)", result.learning_curve["reading"])
    save_checkpoint(run_dir / "best.pt", make_checkpoint(result.head.state_dict(), backbone, class_names, record,
                                                         result.best, model=arguments, trained_on=trained_on,
                                                         threshold=result.threshold, tuned=extractor.tuned))
    return result
