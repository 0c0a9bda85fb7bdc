"""train(): data → split → features → fit() → run folder; `--resume` continues an interrupted run.

Every file of the run folder is written atomically. config.json and data.json are written before training,
metrics.csv and last.pt after every epoch, so a run killed at any point can be resumed from its last epoch.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


from .checks import check_data
from .config import TrainConfig
from .crossval import cross_validate
from .data import LabelledData, Sample, load_data, split_samples
from .errors import DataError, StopsignError
from .features import FeatureExtractor, default_cache_dir
from .fitting import CachedFeatures, LiveImages, fit, stop_after_epoch
from .metrics import Predictions
from .report import write_report
from .runs import (METRIC_COLUMNS, create_run_dir, data_record, make_checkpoint, now, read_json, relative,
                   remove_partial_files, resume_state, save_checkpoint, summary, versions, write_csv, write_json)

log = logging.getLogger(__name__)


class Interrupted(StopsignError):
    """Ctrl-C during training: the finished epochs' files are written; the message says how to resume."""


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best_val_acc: float | None
    history: list[dict]
    metrics: dict = field(default_factory=dict)


@contextmanager
def settled_heap():
    """Keep the garbage collector off the objects that existed before the call, until it returns (a decorator).

    torch and the other imports leave about a million long-lived objects; one full collection scans them
    all, and took 0.19 s of a warm run. Frozen, they are skipped (and stay shared copy-on-write with the
    processes that fork: decode workers, the chart process); unfrozen afterwards, so anything among them that
    becomes garbage later is still collected. A caller that froze the heap itself keeps its own arrangement.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@settled_heap()
def train(data: str | Path | LabelledData, *, val: str | Path | None = None, config: TrainConfig | None = None,
          resume: str | Path | None = None, progress: bool = True, **overrides) -> RunResult:
    """Train a linear head on a frozen backbone and write a run folder. Overrides are TrainConfig fields.

    resume: a run folder of an interrupted run; its own config.json and data.json split are used.
    """
    phases, clock, started = {}, time.perf_counter(), now()
    if resume:
        run_dir = Path(resume)
        for name in ("config.json", "data.json"):  # written before training: a run that began has both
            if not (run_dir / name).is_file():
                raise StopsignError(f"cannot resume {run_dir}: it has no {name}, so it is not a run folder or "
                                    "was stopped before training began. Fix: start a new run without --resume")
        remove_partial_files(run_dir)
        config = TrainConfig.from_dict(read_json(run_dir / "config.json"))
    else:
        config = (config or TrainConfig()).replace(**overrides)
    data = data if isinstance(data, LabelledData) else load_data(data)
    if resume:
        train_samples, val_samples = recorded_split(data, read_json(run_dir / "data.json"))
    elif val is not None:
        train_samples, val_samples = data.samples, load_data(val, class_names=data.class_names).samples
    elif data.splits:
        train_samples, val_samples = data.splits["train"], data.splits["val"]
    elif config.folds > 1:
        train_samples, val_samples = data.samples, []  # the final model sees everything; folds score it
    else:
        train_samples, val_samples = split_samples(data.samples, config.val_fraction, config.seed,
                                                   class_names=data.class_names)
    if not resume:  # after the data proved usable, so a typo leaves no empty run folder behind
        run_dir = create_run_dir(config.out, config.name, config.backbone)
    checks = check_data({"train": train_samples, "val": val_samples}, data.class_names)
    for warning in checks.get("warnings", []):
        log.warning("%s", warning)

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    extractor = FeatureExtractor(config.backbone, config.weights, cache_dir=cache_dir if config.cache else None,
                                 num_workers=config.num_workers, batch_size=config.batch_size, bf16=config.bf16)
    backbone = {"name": extractor.name, "weights_sha256": extractor.weights_sha256,
                "feature_size": extractor.feature_size, "preprocessing": extractor.preprocessing}
    record = config.to_dict() | {"backbone_weights_sha256": extractor.weights_sha256,
                                 "preprocessing": extractor.preprocessing, "versions": versions()}
    if not resume:
        write_json(run_dir / "config.json", record)
        write_json(run_dir / "data.json", data_record(data.root, data.layout, data.class_names,
                                                      {"train": train_samples, "val": val_samples}, {}, record))
    phases["load and check data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if config.cache:
        every = train_samples + val_samples if config.folds > 1 else train_samples
        try:
            source = CachedFeatures(extractor, every, every if config.folds > 1 else val_samples, config, progress)
        except KeyboardInterrupt:
            raise Interrupted(f"stopped while computing features; those computed are cached. "
                              f"Continue with: stopsign train {data.root} --resume {run_dir}") from None
        phases["features"] = time.perf_counter() - clock
    else:
        source = LiveImages(extractor, config)

    cv = None
    if config.folds > 1:
        clock = time.perf_counter()
        everything = train_samples + val_samples
        cv = cross_validate(source, everything, data.class_names, extractor.feature_size, config, progress=progress)
        train_samples, val_samples = everything, []
        phases["cross-validation"] = time.perf_counter() - clock

    def save_epoch(row: dict, state: dict) -> None:
        write_csv(run_dir / "metrics.csv", state["history"], METRIC_COLUMNS)
        save_checkpoint(run_dir / "last.pt", make_checkpoint(state["head"], backbone, data.class_names, record,
                                                             row, resume=state))
        if stop.is_set():
            raise Interrupted(f"stopped after epoch {row['epoch']} of {config.epochs}; its files are written. "
                              f"Continue with: stopsign train {data.root} --resume {run_dir}")

    clock = time.perf_counter()
    with stop_after_epoch() as stop:
        result = fit(source, extractor.feature_size, len(data.class_names), train_samples, val_samples, config,
                     state=resume_state(run_dir) if resume else None, on_epoch=save_epoch, progress=progress,
                     keep="last" if config.folds > 1 else "best")
    save_checkpoint(run_dir / "best.pt", make_checkpoint(result.head.state_dict(), backbone, data.class_names,
                                                         record, result.best))
    phases["train head"] = time.perf_counter() - clock

    clock = time.perf_counter()
    skipped = data.skipped | source.skipped  # files the listing could not use, then those that did not decode
    kept = {name: [s for s in samples if str(s.path) not in skipped]
            for name, samples in (("train", train_samples), ("val", val_samples))}
    write_json(run_dir / "data.json", data_record(data.root, data.layout, data.class_names, kept, skipped, record))
    completed = now()
    write_json(run_dir / "summary.json", summary(record, result.history, result.best, started, completed))
    if cv is not None:
        predictions = cv.pop("oof")
    else:
        predictions = Predictions([str(s.path) for s in result.val_samples], [s.label for s in result.val_samples],
                                  result.val_probs, data.class_names)
    run_info = {
        "data": {"source": str(data.root), "layout": data.layout, "classes": list(data.class_names),
                 "train": data.class_counts(kept["train"]), "validation": data.class_counts(kept["val"])},
        "skipped files": [{"file": p, "reason": r} for p, r in sorted(skipped.items())] or "none",
        "backbone": {"name": config.backbone, "weights sha256": extractor.weights_sha256,
                     "features": "cached" if config.cache else "recomputed every epoch"},
        "evaluated on": f"out-of-fold predictions of {config.folds}-fold cross-validation" if cv
                        else "the validation split",
        "settings": config.to_dict(), "started": started, "completed": completed,
        "seconds per phase": {k: round(v, 3) for k, v in phases.items()},
    }
    metrics = write_report(run_dir, predictions, history=result.history, run_info=run_info, checks=checks, cv=cv,
                           title=f"stopsign run {run_dir.name}")
    phases["report"] = time.perf_counter() - clock
    log.info("phases: %s", {k: round(v, 2) for k, v in phases.items()})
    return RunResult(run_dir, result.best["epoch"], result.best["val_acc"], result.history, metrics)


def recorded_split(data: LabelledData, record: dict) -> tuple[list[Sample], list[Sample]]:
    """The train/val split a run recorded in data.json, matched against the data as it is now."""
    by_file = {relative(sample.path, data.root): sample for sample in data.samples}
    missing = [row["file"] for row in record["split"] if row["file"] not in by_file]
    if missing:
        raise DataError(f"cannot resume: {len(missing)} files of the recorded split are no longer in {data.root}, "
                        f"e.g. {', '.join(missing[:5])}")
    splits = {"train": [], "val": []}
    for row in record["split"]:
        splits[row["split"]].append(by_file[row["file"]])
    return splits["train"], splits["val"]
