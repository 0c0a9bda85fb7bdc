"""The tune folder's plots and report.html: trial rows in, files out.

Drawn from the rows of trials.csv on charts.py's figures (matplotlib's object API) rather than with
optuna.visualization.matplotlib, which draws through pyplot's global state; the page is
templates/tune_report.html.j2's. Files are written atomically: processes that share a study rewrite them as they
finish.

A setting the trial's head never reads (the SGD head's epochs and learning rates, for a logistic head:
config.relevant_settings) is left out of its tables and slices, and a plot with fewer than two trials is not drawn.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

from optuna.distributions import CategoricalDistribution

from .charts import integer_ticks, log_ticks, new_figure, save_figure
from ..config import relevant_settings
from ..files import atomic_write_text
from .html import TEMPLATES
from .photos import file_data_uri

TOP_TRIALS = 10  # rows of the best-trials table
MIN_POINTS = 2  # trials a plot needs to show anything a table does not
NOT_USED = "not used"  # a setting the recipe's head never reads


def uses(row: dict, name: str) -> bool:
    """Whether the trial of this row (or these parameters) read setting `name`: its head does."""
    return name in relevant_settings({key: row[key] for key in (name, "head") if key in row})


def plot_history(rows: list[dict], start_accuracy: float, path, start_name: str = "starting recipe",
                 baseline: dict | None = None) -> Path:
    """Every trial's mean fold accuracy against its number, the best so far, the starting recipe's, and
    (baseline: metrics.baseline) always answering the majority class."""
    figure = new_figure(8, 4)
    axis = figure.subplots()
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["accuracy"] is not None]
    axis.scatter([r["number"] for r in done], [r["accuracy"] for r in done], s=14, label="complete")
    axis.scatter([r["number"] for r in pruned], [r["accuracy"] for r in pruned], s=14, marker="x",
                 color="tab:gray", label="pruned (mean of its folds so far)")
    if done:
        leaders = accumulate(done, lambda leader, row: row if row["value"] > leader["value"] else leader)
        axis.step([r["number"] for r in done], [r["accuracy"] for r in leaders], where="post", color="tab:green",
                  label="best so far")
    axis.axhline(start_accuracy, linestyle="--", color="tab:red", linewidth=1, label=start_name)
    if baseline:
        axis.axhline(baseline["accuracy"], linestyle=":", color="tab:gray", linewidth=1,
                     label=f"always {baseline['majority_class']}")
    axis.set(xlabel="trial", ylabel="mean fold accuracy", title="optimisation history")
    integer_ticks(axis.xaxis)  # no trial 2.5
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)


def plot_importances(importances: dict, path) -> Path:
    figure = new_figure(6, 0.35 * len(importances) + 1.2)
    axis = figure.subplots()
    names = list(importances)[::-1]  # the most important on top
    axis.barh(names, [importances[name] for name in names], color="tab:blue")
    axis.set(xlabel="importance (share of the objective's variation)", title="parameter importances")
    return save_figure(figure, path)


def slice_rows(rows: list[dict], name: str) -> list[dict]:
    """The completed trials whose head read parameter `name`: those a slice of it shows."""
    return [r for r in rows if r["state"] == "complete" and uses(r, name)]


def plot_slice(rows: list[dict], name: str, space, path) -> Path:
    """The mean fold accuracy of every completed trial that read `name` against it, coloured by trial number."""
    done = slice_rows(rows, name)
    figure = new_figure(4.2, 3.4)
    axis = figure.subplots()
    if isinstance(space, CategoricalDistribution):
        choices = list(space.choices)
        x = [choices.index(r[name]) for r in done]
        axis.set_xticks(range(len(choices)), [str(c) for c in choices])
    else:
        x = [r[name] for r in done]
        if space.log:  # the whole search range, a little wider: where the good trials lie within it
            axis.set_xscale("log")
            margin = (space.high / space.low) ** 0.04
            axis.set_xlim(space.low / margin, space.high * margin)
            log_ticks(axis.xaxis, space.low / margin, space.high * margin)
    points = axis.scatter(x, [r["accuracy"] for r in done], c=[r["number"] for r in done], cmap="viridis", s=14)
    colour_bar = figure.colorbar(points, ax=axis, label="trial")
    integer_ticks(colour_bar.ax.yaxis)
    axis.set(xlabel=name, ylabel="mean fold accuracy")
    axis.grid(alpha=0.3)
    return save_figure(figure, path)


def write_tune_report(run_dir, rows: list[dict], best: dict, search_space: dict, importances: dict | str, *,
                      title: str) -> Path:
    """plots/history.png, plots/importances.png (when computable), plots/slice_<parameter>.png, report.html.

    The history needs two trials, a parameter's slice two completed trials that read it."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    start, trivial = best["starting_recipe"], best["baseline"]
    images = {}
    if len(rows) >= MIN_POINTS:
        images["history"] = plot_history(rows, start["accuracy"], plots / "history.png", start["name"], trivial)
    if isinstance(importances, dict) and importances:
        images["importances"] = plot_importances(importances, plots / "importances.png")
    for name, space in search_space.items():
        if len(slice_rows(rows, name)) >= MIN_POINTS:
            images[f"slice_{name}"] = plot_slice(rows, name, space, plots / f"slice_{name}.png")
    uris = {name: file_data_uri(path) for name, path in images.items()}
    done = sorted((r for r in rows if r["state"] == "complete" and r.get("same_as") is None),
                  key=lambda r: -r["value"])[:TOP_TRIALS]  # each setting once: a repeat reused its first score
    shown = [name for name in search_space if any(uses(r, name) for r in done)]
    columns = ["number", "accuracy", "accuracy_std", "log_loss", "seconds"]
    trials = [[r[c] for c in columns] + [r[c] if uses(r, c) else None for c in shown] for r in done]
    scores, settings = best_settings(best, search_space)
    page = TEMPLATES.get_template("tune_report.html.j2").render(
        title=title, best=best, scores=scores, settings=settings, columns=columns + shown, trials=trials,
        unread=any(not uses(r, c) for r in done for c in shown), images=uris, importances=importances,
        slices=[name for name in search_space if f"slice_{name}" in uris])
    return atomic_write_text(run_dir / "report.html", page)


def best_settings(best: dict, search_space: dict) -> tuple[tuple[list, list], tuple[list, list]]:
    """(header, rows) of two tables: the best trial's scores against the starting recipe's and the majority
    class's; the settings either recipe's head reads, "not used" where one does not."""
    start, trivial, folds = best["starting_recipe"], best["baseline"], best["folds"]
    figures = ("accuracy", "balanced_accuracy", "accuracy_std", "log_loss")  # balanced: none in older studies
    header = ["", "mean fold accuracy", "balanced accuracy", "std", "log-loss"]
    scores = (header + [f"fold {k + 1}" for k in range(folds)],
              [[name, *(row.get(key) for key in figures), *row.get("fold_accuracy", [None] * folds)]
               for name, row in ((f"best (trial {best['trial']})", best), (start["name"], start),
                                 (f"always {trivial['majority_class']} (no model)", trivial))])
    params = [best["params"], start["params"]]
    settings = (["parameter", "best", start["name"]],
                [[name, *(p.get(name) if uses(p, name) else NOT_USED for p in params)]
                 for name in search_space if any(uses(p, name) for p in params)])
    return scores, settings


def summary_lines(result) -> list[str]:
    """What `stopsign tune` says at the end of a training.tune.TuneResult: the final model, a warning when the best
    trial does not beat always answering the majority class, and the best accuracy beside the starting recipe's."""
    if not result.best_params:
        return [f"no completed trial yet; the study is in {result.run_dir}"]
    lines = []
    if result.final_from != "the best trial":
        lines.append(f"warning: no trial scored above the {result.start_name} ({result.best_accuracy:.3f} against "
                     f"{result.start_accuracy:.3f}): the final model uses {result.final_from}; more --trials may "
                     "find better")
    if result.final_run:
        # "the best trial's settings", "the seed recipe's settings"; "the defaults", "the given settings"
        whose = result.final_from if result.final_from.endswith("s") else f"{result.final_from}'s settings"
        lines.append(f"final model ({whose}, all data): {result.final_run.run_dir / 'best.pt'}")
    if result.verdict["message"]:
        lines.append(f"warning: {result.verdict['message']}")
    return lines + [f"best {result.folds}-fold cross-validated accuracy {result.best_accuracy:.3f} "
                    f"({result.start_name} {result.start_accuracy:.3f}; always {result.baseline['majority_class']} "
                    f"{result.baseline['accuracy']:.3f}); output folder {result.run_dir}"]
