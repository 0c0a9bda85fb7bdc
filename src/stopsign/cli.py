"""The command line's commands: each subcommand makes one call into the public API and prints what it returns; main
parses (arguments.py says what the command line offers), sets up logging and turns errors into exit codes. The only
module that prints."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .arguments import REVIEW_FIELDS, TRAIN_FIELDS, TUNE_FIELDS, build_parser, given
from .config import read_config, recipe_settings
from .errors import Interrupted, StopsignError


def say(lines) -> None:
    """Print what an API function worded, a line each, each as soon as it comes."""
    for line in lines:
        print(line, flush=True)


def print_result(result) -> None:
    """The last lines of a training command: the accuracy to trust, its warnings, and where the report is."""
    from .reporting.metrics import training_lines

    say(training_lines(result.metrics, len(result.history), result.best_epoch))
    print(f"report {result.url + '/report.html' if result.url else result.run_dir / 'report.html'}")


def asked_settings(args, fields: tuple[str, ...]) -> dict:
    """The settings a train or tune command asks for: --recipe's, then --config FILE's, then the flags given. With
    --resume, no recipe: the run's own settings, and any asked must agree with them (train() and tune() say which
    do not)."""
    asked = (read_config(args.config) if args.config else {}) | given(args, fields)
    return asked if args.resume else recipe_settings(args.recipe, asked)


def run_train(args) -> None:
    from .training.trainer import train

    result = train(args.data, val=args.val, resume=args.resume, progress=not args.quiet,
                   **asked_settings(args, TRAIN_FIELDS))
    if result is not None:  # None: a torchrun rank other than 0, whose share of the features is written
        print_result(result)


def run_tune(args) -> None:
    from .reporting.tune_report import summary_lines
    from .training.tune import tune

    # a recipe is where a new study starts, and what it is compared with
    settings = asked_settings(args, TUNE_FIELDS)
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
                               device=args.device, weights=args.weights, cache=args.cache, explain=args.explain)
    if rows is None:  # a torchrun rank other than 0: rank 0 prints every rank's rows
        return 0
    read = Counter()  # rows with a label (True) and without (False), counted as they stream past
    rows = (read.update([row.label is not None]) or row for row in rows)
    threshold = classifier.threshold if args.threshold is None else args.threshold
    say(prediction_lines(rows, classifier.class_names, args.format, threshold, explain=bool(args.explain)))
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

    path, report = export(args.checkpoint, format=args.format, out=args.out, int8=args.int8)
    int8 = report.get("int8")
    print(f"exported {report['path']} ({report['format']}{' int8' if int8 else ''}, {report['bytes'] / 1e6:.1f} MB)")
    print(f"{'its float graph ' if int8 else ''}checked against PyTorch on {report['image_source']}, batch sizes "
          f"{' and '.join(map(str, report['batch_sizes']))}: max |difference| of probabilities "
          f"{report['max_abs_diff']:.2g} (limit {report['tolerance']:g}), same predicted classes"
          + (f"; of region and cell scores {report['region_scores_max_abs_diff']:.2g} and "
             f"{report['cell_scores_max_abs_diff']:.2g} (limit 0.001)" if "region_scores_max_abs_diff" in report
             else ""))
    if int8:
        accuracy = ("no labelled validation images" if int8["int8_accuracy"] is None else
                    f"{int8['pytorch_accuracy']:.3f} -> {int8['int8_accuracy']:.3f} "
                    f"({int8['int8_accuracy'] - int8['pytorch_accuracy']:+.3f})")
        print(f"int8 ({int8['method']}) against PyTorch on {int8['image_source']}: |difference| of probabilities "
              f"max {int8['max_abs_diff']:.3g}, mean {int8['mean_abs_diff']:.3g}; accuracy {accuracy}")


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


# what each subcommand of arguments.SUBCOMMANDS runs: main() calls RUNS[args.command](args)
RUNS = {"train": run_train, "predict": run_predict, "evaluate": run_evaluate, "info": run_info, "demo": run_demo,
        "cache": run_cache, "export": run_export, "serve": run_serve, "tune": run_tune, "review": run_review}


class _Messages(logging.Handler):
    """stopsign's own INFO messages (the data line, a row per epoch) as plain lines on stderr, unless -q: the
    sys.stderr of each moment, so whoever replaced it since (a test runner) gets them; above any progress bar, which
    a message from another thread (the threshold's folds run beside the final fit) would otherwise cut."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO and record.name.startswith("stopsign"):
            try:
                tqdm.write(self.format(record), file=sys.stderr)
                sys.stderr.flush()
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
        return RUNS[args.command](args) or 0
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
