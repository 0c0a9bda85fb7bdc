"""tune(): a seeded Optuna search over the head's recipe, every trial scored by K-fold cross-validation.

The backbone's features of every image are computed once, for the largest number of augmented views in the
search space; a trial narrows them to its own views and trains K heads on them. The study lives in `study.db`
(SQLite) in the tune folder: `resume` adds trials to it, and several processes can add trials to it at once.

The objective is the mean fold accuracy minus 0.001 × the mean fold log-loss. The log-loss term (typically
0.1–1) is worth a fraction of one image of accuracy (1/200 = 0.005 on 200 photos), so it only orders trials
whose accuracy ties. Never a single validation split: on 200 photos a 20-image split moves 5 points per image.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from ..errors import DataError, Interrupted, StopsignError

try:
    import optuna
    import sqlalchemy  # optuna's own dependency
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
except ImportError as error:  # the optional `tune` extra
    raise StopsignError("stopsign tune needs optuna: pip install 'stopsign[tune]'") from error

from ..config import (CLASS_WEIGHTS, HEADS, POOLINGS, SEED_RECIPE, SGD_SETTINGS, ModelConfig, RunOptions, Settings,
                      TrainConfig, given_settings, names, settings_yaml)
from ..data.datasets import LabelledData, Sample, load_data
from ..files import atomic_write_text, now, read_json, relative, write_csv, write_json
from ..reporting.metrics import baseline, verdict
from ..reporting.tune_report import write_tune_report
from .crossval import held_out_predictions
from ..runs import create_run_dir, run_upload
from .records import versions
from .sources import CachedFeatures
from ..model.backbones import get_spec
from .plan import Plan, make_extractor, prepare, ranks, share
from .tracking import check_tracking
from .trainer import RunResult, train

log = logging.getLogger(__name__)

LOG_LOSS_WEIGHT = 1e-3
OBJECTIVE = "mean fold accuracy − 0.001 × mean fold log-loss (log-loss only breaks accuracy ties)"
MAX_VIEWS = 8  # augmented views extracted once per image; a trial trains on its first `views` of them

# Settings (ModelConfig and TrainConfig fields) and their ranges. Every range holds the seed recipe's value,
# except weight decay's 0, which a log scale cannot hold (1e-6 is as good as none).
SEARCH_SPACE = {
    "lr_max": FloatDistribution(1e-4, 1.0, log=True),
    "lr_base": FloatDistribution(1e-7, 1e-4, log=True),  # always below lr_max's range: the cycle rises
    "momentum": FloatDistribution(0.0, 0.99),
    "epochs": IntDistribution(5, 30),
    "batch_size": CategoricalDistribution([16, 32, 64, 128]),
    "weight_decay": FloatDistribution(1e-6, 1e-1, log=True),
    "label_smoothing": FloatDistribution(0.0, 0.2),
    "views": IntDistribution(1, MAX_VIEWS),
    "scheduler": CategoricalDistribution(["triangular2", "cosine", "constant"]),
    # free to search: every pooling comes from the one cached pass, and the heads train on the same features
    "pooling": CategoricalDistribution(list(POOLINGS)),
    "head": CategoricalDistribution(list(HEADS)),
    "class_weight": CategoricalDistribution(list(CLASS_WEIGHTS)),
}
# Searched only when asked (tune(search={...}), `--search-backbones`, `--search-tiles`), since each value costs
# backbone passes over every image: a trial that draws a backbone or tiling not seen yet extracts its features
# (then cached, like every other). image_size stays fixed for a study.
FEATURE_CHOICES = ("backbone", "tiles")


def search_space(search: dict[str, list] | None = None) -> dict:
    """SEARCH_SPACE, plus the feature choices a study searches (those given more than one value)."""
    extra = {name: CategoricalDistribution(list(values)) for name, values in (search or {}).items()
             if len(values) > 1}
    return SEARCH_SPACE | extra


@dataclass
class TuneResult:
    run_dir: Path
    best_params: dict  # flat settings of the final model's recipe: the best trial's, or the starting recipe's where
    # no trial scored above it (final_from); train(data, **best_params) rebuilds it
    best_value: float  # the objective (see OBJECTIVE)
    best_accuracy: float  # the best trial's mean fold accuracy
    final_run: RunResult | None  # the model trained on all data with best_params (None: final=False)
    folds: int = 5
    start_accuracy: float = float("nan")  # the starting recipe's mean fold accuracy on the same folds
    start_name: str = "defaults"  # what the starting recipe is (recipe_name)
    baseline: dict | None = None  # what always answering the majority class scores (metrics.baseline)
    verdict: dict | None = None  # whether the best trial beats that baseline (metrics.verdict); None: no trial
    final_from: str = "the best trial"  # whose recipe best_params is: the best trial's, or the starting recipe's


def suggest(trial: optuna.Trial, space: dict = SEARCH_SPACE) -> dict:
    """A trial's draw from `space` (search_space()'s), as flat settings: those the drawn head reads, so the SGD
    head's settings (SGD_SETTINGS) only for it. Trials of the logistic head then differ only where its fit does,
    and two that draw the same are one (see tune's objective)."""
    def draw(name: str, drawn) -> object:
        if isinstance(drawn, CategoricalDistribution):
            return trial.suggest_categorical(name, drawn.choices)
        number = trial.suggest_int if isinstance(drawn, IntDistribution) else trial.suggest_float
        return number(name, drawn.low, drawn.high, log=drawn.log)

    drawn = {name: draw(name, value) for name, value in space.items() if name not in SGD_SETTINGS}
    return drawn | {name: draw(name, value) for name, value in space.items()
                    if name in SGD_SETTINGS and drawn.get("head") == "sgd"}


def cross_validated_score(source: CachedFeatures, samples: list[Sample], num_features: int, class_names: list[str],
                          model: ModelConfig, recipe: TrainConfig, on_fold: Callable[[int, dict], None] | None = None,
                          groups: dict[str, int] | None = None, progress: bool = False) -> dict:
    """K-fold scores of a model and recipe (K = recipe.folds; the folds of train(folds=K) and cross_validate()).

    Each fold keeps its last epoch. `on_fold(index, scores so far)` runs after each fold and may raise
    optuna.TrialPruned. Only accuracy, balanced accuracy and log-loss, not crossval's full metrics, which would
    double a trial's time. progress: a bar over the folds.
    """
    accuracies, balanced, losses = [], [], []
    for index, fold in enumerate(held_out_predictions(source, samples, class_names, num_features, model, recipe,
                                                      groups, progress=progress)):
        accuracies.append(float((fold.y_pred == fold.y_true).mean()))
        balanced.append(float(balanced_accuracy_score(fold.y_true, fold.y_pred)))
        losses.append(fold.log_loss())
        scores = {"accuracy": float(np.mean(accuracies)), "balanced_accuracy": float(np.mean(balanced)),
                  "log_loss": float(np.mean(losses)),
                  "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                  "fold_accuracy": accuracies, "fold_log_loss": losses}
        if on_fold:
            on_fold(index, scores)
    return scores | {"value": scores["accuracy"] - LOG_LOSS_WEIGHT * scores["log_loss"]}


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for trial n come from (seed, n), not from what this process drew before: a
    resumed study draws what an uninterrupted one would, and processes sharing a study never repeat each
    other's draws (as they would with one seed each, or both begin at the same random draws)."""

    def __init__(self, seed: int):
        super().__init__(seed=seed, constant_liar=True)  # constant liar: parallel workers avoid running trials
        self.base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().before_trial(study, trial)
        # optuna has no public per-trial reseed; these are the generators of TPE and of its start-up sampler.
        self._rng.rng.seed([self.base_seed, trial.number])
        self._random_sampler._rng.rng.seed([self.base_seed, trial.number, 1])


def tune(data: str | Path | LabelledData, *, trials: int = 50, folds: int | None = None, timeout: float | None = None,
         model: ModelConfig | None = None, recipe: TrainConfig | None = None, run: RunOptions | None = None,
         resume: str | Path | None = None, progress: bool = True, final: bool = True,
         search: dict[str, list] | None = None, **overrides) -> TuneResult | None:
    """Search SEARCH_SPACE for `trials` more trials (or `timeout` seconds) and train the best recipe on all data.

    model, recipe, run and flat overrides, as train() takes them: the settings fixed for the study, whose recipe
    every trial is compared with (recipe_name); folds defaults to 5. search: feature choices searched too, e.g.
    {"backbone": ["efficientnet_lite0", "efficientnet_lite1"], "tiles": [1, 2]} (FEATURE_CHOICES). resume: a tune
    folder, whose own settings are used and whose study grows (other processes may add trials at the same time).
    final=False skips the final model (e.g. for extra worker processes). Under torchrun every rank computes its
    share of the features the study reads, then rank 0 tunes and returns the TuneResult; the others return None.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()  # optuna's messages go through logging, which the CLI configures
    optuna.logging.enable_propagation()
    data = data if isinstance(data, LabelledData) else load_data(data, progress=progress)
    studied = (replace(data, samples=data.splits["train"] + data.splits["val"], splits=None) if data.splits
               else data)  # never a test split
    given = given_settings(model, recipe, run, overrides)
    config, search = study_settings(studied, given, resume, folds, checked_search(search))
    check_tracking(config.run.log)  # the final run's --log: its package, before the study
    with ranks(config.run.device) as (shard, device):
        config, progress = config.replace(device=device), progress and shard[0] == 0
        plan = prepare(studied, config.replace(views=max(MAX_VIEWS, config.recipe.views), synthetic_negatives=0),
                       shard=shard, progress=progress)  # the most views a trial reads; no rendered ones: final only
        share(plan, shard, progress, search)  # under torchrun: this rank's share, into the shared store
    if shard[0] != 0:
        return None  # rank 0 tunes on what every rank computed
    score, skipped = scorer(plan, progress)  # the backbone loads (or says why not) before any folder is made
    run_dir = Path(resume) if resume else create_tune_folder(config, studied, plan.train, search)
    space = search_space(search)
    storage = sqlite_storage(run_dir / "study.db")
    try:
        study = open_study(storage, config.recipe.seed, space)
        start = {"name": recipe_name(config, space)}  # the recipe as given, on the same folds
        log.info("scoring the %s on the %d folds every trial is scored on", start["name"], config.recipe.folds)
        start |= score(config) | {"params": {name: config.to_dict()[name] for name in space}}
        trivial = baseline(np.array([s.label for s in plan.train if str(s.path) not in skipped]), data.class_names)
        bar = tqdm(total=trials, desc="trials", unit="trial", disable=not progress)

        def show(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            bar.update(1)
            best = completed_best(study)
            if best:
                bar.set_postfix(best_cv_accuracy=f"{best.user_attrs['scores']['accuracy']:.3f}", trial=best.number)

        try:
            study.optimize(objective(score, config, space), n_trials=trials, timeout=timeout, callbacks=[show])
        except KeyboardInterrupt:
            write_outputs(study, run_dir, start, trivial, None, space)
            raise Interrupted(f"stopped; finished trials are in {run_dir}. Continue with: "
                              f"stopsign tune {data.root} --resume {run_dir} --trials N") from None
        finally:
            bar.close()
        best = write_outputs(study, run_dir, start, trivial, None, space)
        final_run = None
        if best and final:
            final_run = train(data, **config.replace(**best["final_params"], out=str(run_dir), name="final").to_dict(),
                              progress=progress, distributed=False)  # under torchrun the other ranks are done
            best = write_outputs(study, run_dir, start, trivial, final_run.run_dir, space)
    finally:
        storage.engine.dispose()  # its last connection closed, SQLite folds study.db-wal into study.db, deletes -shm
    if best and not resume and (upload := run_upload(config.run.out, run_dir)):  # --out s3://...: at the end
        upload.finish()
    found = (best["final_params"], best["value"], best["accuracy"]) if best else ({}, float("nan"), float("nan"))
    return TuneResult(run_dir, *found, final_run, config.recipe.folds, start["accuracy"], start["name"], trivial,
                      best["verdict"] if best else None, best["final_from"] if best else "the best trial")


def objective(score: Callable[..., dict], config: Settings, space: dict) -> Callable[[optuna.Trial], float]:
    """The study's objective: a trial's draw from `space` scored by score() (scorer's), pruned after a fold where
    its running accuracy is below the median's; or, where an earlier trial drew the same settings, that trial's
    score, which the same heads on the same folds would give again."""
    def scored(trial: optuna.Trial) -> float:
        def on_fold(index: int, scores: dict) -> None:
            trial.report(scores["accuracy"], index)
            if trial.should_prune():
                trial.set_user_attr("scores", scores)  # one attribute: one commit
                raise optuna.TrialPruned()

        drawn = suggest(trial, space)
        done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if same := next((t for t in done if t.params == trial.params), None):
            trial.set_user_attr("same_as", same.number)
            trial.set_user_attr("scores", same.user_attrs["scores"])
            return same.value
        scores = score(config.replace(**drawn), on_fold)
        trial.set_user_attr("scores", scores)
        return scores["value"]

    return scored


def study_settings(data: LabelledData, given: dict, resume: str | Path | None, folds: int | None,
                   search: dict[str, list]) -> tuple[Settings, dict]:
    """The study's settings and its search of features: a resumed tune folder's own (refused for other data, whose
    folds would differ; another search or settings asked of it are an error: its trials would not compare; its run
    options may change), or a new study's, folds 5 by default. given: the flat settings asked for (given_settings())."""
    if not resume:
        config = Settings().replace(**given | {"folds": folds or given.get("folds") or 5})
        if config.recipe.folds < 2:
            raise StopsignError(f"tuning needs folds >= 2, got {config.recipe.folds}: it never scores on a single "
                                "split")
        return config, search
    run_dir = Path(resume)
    if not (run_dir / "study.db").is_file() or not (run_dir / "config.json").is_file():
        raise StopsignError(f"{run_dir} has no study.db and config.json: it is not a tune folder")
    record = read_json(run_dir / "config.json")
    if record["data"]["digest"] != samples_digest(data, data.samples):
        raise DataError(f"{data.root} holds other images or labels than the study in {run_dir} was started with "
                        f"({record['data']['images']} images from {record['data']['root']}); its folds would "
                        "differ. Tune these data in a new folder instead")
    config, recorded = Settings.from_dict(record), record["tune"].get("search", {})
    if search and search != recorded:
        raise StopsignError(f"cannot add trials to {run_dir} with another search of features ({search}) than its "
                            f"study's ({recorded or 'none'}). Fix: resume without it, or tune in a new folder")
    asked = given | ({"folds": folds} if folds is not None else {})
    conflicts = config.conflicts(asked)
    if conflicts:
        raise StopsignError(f"cannot add trials to {run_dir} with other settings than its study "
                            f"({'; '.join(conflicts)}): its trials would not compare. Fix: resume without "
                            "them, or tune in a new folder")
    return config.replace(**{name: value for name, value in given.items() if name in names(RunOptions)}), recorded


def scorer(plan: Plan, progress: bool) -> tuple[Callable[..., dict], dict[str, str]]:
    """score(trial_config, on_fold=None): cross_validated_score of a trial's recipe on its features, each
    (backbone, tiles, pooling) extracted (or read from the cache) once; and the images the study's own features
    skipped (path: reason), which no trial scores. plan.settings: the study's, with the most views."""
    extractors = {}  # per backbone
    samples, config = plan.train, plan.settings
    sources: dict[tuple, CachedFeatures] = {}  # per (backbone, tiles, pooling); poolings share the cached passes

    def features(trial: ModelConfig) -> CachedFeatures:
        key = (trial.backbone, trial.tiles, trial.pooling)
        if key not in sources:
            if trial.backbone not in extractors:
                extractors[trial.backbone] = make_extractor(config.model.replace(backbone=trial.backbone), config.run)
            new_passes = not any(k[:2] == key[:2] for k in sources)  # another pooling of passes cached already
            sources[key] = CachedFeatures(extractors[trial.backbone], samples, samples, config.model.replace(
                backbone=trial.backbone, tiles=trial.tiles, pooling=trial.pooling), config.recipe,
                progress=progress and new_passes)
            for path, reason in sources[key].skipped.items():
                log.warning("skipped %s: %s", path, reason)
        return sources[key]

    def score(trial: Settings, on_fold=None) -> dict:
        return cross_validated_score(features(trial.model).for_config(trial.model, trial.recipe), samples,
                                     extractors[trial.model.backbone].feature_size, plan.data.class_names,
                                     trial.model, trial.recipe, on_fold, plan.groups, progress)

    return score, features(config.model).skipped


def open_study(storage: optuna.storages.RDBStorage, seed: int, space: dict) -> optuna.Study:
    """The study "tune" in `storage`, made when new; refused when its trials drew a choice from other choices."""
    study = optuna.create_study(
        study_name="tune", direction="maximize", load_if_exists=True, sampler=TrialSeededTPESampler(seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1), storage=storage)
    for trial in study.get_trials(deepcopy=False):  # Optuna refuses a parameter whose choices have changed
        for name, drawn in trial.distributions.items():
            if name in space and isinstance(drawn, CategoricalDistribution) and drawn != space[name]:
                raise StopsignError(f"this study drew {name} from {list(drawn.choices)}, and this stopsign offers "
                                    f"{list(space[name].choices)}; a study cannot change its choices. Fix: start a "
                                    "new study (another --name), or resume it with the stopsign that began it")
    return study


def recipe_name(settings: Settings, space: dict) -> str:
    """What the recipe the study starts from (and is compared with) is: "seed recipe" (Settings.seed_recipe(),
    `--recipe seed`), "defaults" (Settings()), or "given settings" (either, changed), by its searched
    settings and the seed recipe's."""
    names, given = set(space) | set(SEED_RECIPE), settings.to_dict()
    for name, reference in (("defaults", Settings()), ("seed recipe", Settings.seed_recipe())):
        if all(given[field] == reference.to_dict()[field] for field in names):
            return name
    return "given settings"


def sqlite_storage(path: Path) -> optuna.storages.RDBStorage:
    """The study in SQLite, in WAL mode without a disk sync per commit (a trial commits some twenty times): a
    killed process loses nothing; a power cut may lose the last trials. The 60 s busy timeout lets processes that
    share the study wait for each other."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(path).resolve()}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})

    def on_connect(connection, _record) -> None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # the connection that created the tables has no pragmas: start afresh
    return storage


def checked_search(search: dict[str, list] | None) -> dict[str, list]:
    """The feature choices to search, each a list of valid values; none is an empty dict."""
    search = {name: list(values) for name, values in (search or {}).items() if values}
    unknown = set(search) - set(FEATURE_CHOICES)
    if unknown:
        raise StopsignError(f"tune searches the features' {' and '.join(FEATURE_CHOICES)}, not {', '.join(unknown)}")
    for value in search.get("backbone", []):
        get_spec(value)  # an unknown backbone names the registered ones
    bad = [t for t in search.get("tiles", []) if not (isinstance(t, int) and 1 <= t <= 4)]
    if bad:
        raise StopsignError(f"--search-tiles takes whole numbers from 1 to 4, got {bad}")
    return search


def create_tune_folder(config: Settings, data: LabelledData, samples: list[Sample], search: dict | None = None
                       ) -> Path:
    """A new folder with config.json (the settings fixed for the study, what fixes its folds, the search) and
    args.yaml (the settings alone, for --config)."""
    run_dir = create_run_dir(config.run.out, config.run.name, f"tune-{config.model.backbone}")
    write_json(run_dir / "config.json", config.to_dict() | {
        "data": {"root": str(data.root), "images": len(samples), "digest": samples_digest(data, samples)},
        "tune": {"objective": OBJECTIVE, "search_space": {k: repr(v) for k, v in search_space(search).items()},
                 "search": search or {},
                 "sampler": f"TPE seeded per trial from seed {config.recipe.seed}",
                 "pruner": "median of the running mean fold accuracy, from the second fold on"},
        "started": now(), "versions": versions()})
    atomic_write_text(run_dir / "args.yaml", settings_yaml(config.to_dict(), "tune"))
    return run_dir


def completed_best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def samples_digest(data: LabelledData, samples: list[Sample]) -> str:
    """What fixes the folds: every image (relative to the data folder) and its class name."""
    lines = sorted(f"{relative(s.path, data.root)}\t{data.class_names[s.label]}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def trial_rows(study: optuna.Study, folds: int, space: dict = SEARCH_SPACE) -> list[dict]:
    """One row per trial: its state, scores, parameters and fold scores (as far as it got)."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs.get("scores", {})
        row = {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
               "accuracy": attrs.get("accuracy"), "accuracy_std": attrs.get("accuracy_std"),
               "log_loss": attrs.get("log_loss"),
               "seconds": round(trial.duration.total_seconds(), 3) if trial.duration else None,
               "same_as": trial.user_attrs.get("same_as")}
        row |= {name: trial.params.get(name) for name in space}
        for key in ("accuracy", "log_loss"):
            values = attrs.get(f"fold_{key}", [])
            row |= {f"fold{k + 1}_{key}": values[k] if k < len(values) else None for k in range(folds)}
        rows.append(row)
    return rows


def write_outputs(study: optuna.Study, run_dir: Path, start: dict, trivial: dict, final_dir: Path | None,
                  space: dict = SEARCH_SPACE) -> dict | None:
    """trials.csv, best.json, the plots and report.html from every trial in the study so far; the best trial.

    start: the starting recipe's scores, name and parameters; trivial: what always answering the majority class
    scores (metrics.baseline), which the best trial's verdict (metrics.verdict) compares it with."""
    folds = len(start["fold_accuracy"])
    rows = trial_rows(study, folds, space)
    write_csv(run_dir / "trials.csv", rows, list(rows[0]) if rows else ["number", "state", "value"])
    trial = completed_best(study)
    if trial is None:
        return None
    states = [row["state"] for row in rows]
    scores = trial.user_attrs["scores"]
    figures = {key: scores.get(key) for key in ("accuracy", "balanced_accuracy", "accuracy_std", "log_loss",
                                                "fold_accuracy", "fold_log_loss")}  # older trials: no balanced
    best = {
        "trial": trial.number, "value": trial.value, "objective": OBJECTIVE, "folds": folds, **figures,
        "baseline": trivial, "verdict": verdict(figures | {"baseline": trivial}),
        "params": trial.params,
        # a search of few trials may find nothing better than where it started: the final model must not be worse
        **({"final_from": "the best trial", "final_params": trial.params} if trial.value >= start["value"] else
           {"final_from": f"the {start['name']}", "final_params": start["params"]}),
        "starting_recipe": start,
        "trials": {state: states.count(state) for state in sorted(set(states))}
        | {"repeats": sum(row["same_as"] is not None for row in rows)},  # of the complete: a score reused
        "final_run": str(final_dir) if final_dir else None,
    }
    write_json(run_dir / "best.json", best)
    write_tune_report(run_dir, rows, best, space, importances(study), title=f"stopsign tune {run_dir.name}")
    return best


def importances(study: optuna.Study) -> dict | str:
    """Parameter importances, or the reason there are none (they need two or more completed trials that differ)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "too few trials ... importances will be equal": none, then
            return optuna.importance.get_param_importances(study)
    except Exception as error:  # an optional plot: whatever the evaluator raises, the report goes on without it
        log.debug("no parameter importances: %s", error)
        return f"not computed: {error}"
