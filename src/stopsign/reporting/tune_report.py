"""The tune folder's plots and report.html: trial rows in, files out.

Drawn from the rows of trials.csv on report.py's figures (matplotlib's object API, no pyplot) rather than with
optuna.visualization.matplotlib, which draws through pyplot's global state; the page is html's. Files
are written atomically (report.py's writes): processes that share a study rewrite them as they finish.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

import numpy as np
from optuna.distributions import CategoricalDistribution

from .charts import integer_ticks, log_ticks, new_figure, save_figure
from ..files import atomic_write_text
from .html import _mapping_table, _table, render_page
from .report import file_data_uri

TOP_TRIALS = 10  # rows of the best-trials table


def plot_history(rows: list[dict], seed_accuracy: float, path) -> Path:
    """Every trial's mean fold accuracy against its number, the best so far, and the seed recipe's."""
    figure = new_figure(8, 4)
    axis = figure.subplots()
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["fold1_accuracy"] is not None]
    axis.scatter([r["number"] for r in done], [r["accuracy"] for r in done], s=14, label="complete")
    axis.scatter([r["number"] for r in pruned], [running_accuracy(r) for r in pruned], s=14, marker="x",
                 color="tab:gray", label="pruned (mean of its folds so far)")
    best, steps = None, []
    for row in done:
        if best is None or row["value"] > best["value"]:
            best = row
        steps.append((row["number"], best["accuracy"]))
    if steps:
        axis.step(*zip(*steps), where="post", color="tab:green", label="best so far")
    axis.axhline(seed_accuracy, linestyle="--", color="tab:red", linewidth=1, label="seed recipe")
    axis.set_xlabel("trial")
    integer_ticks(axis.xaxis)  # no trial 2.5
    axis.set_ylabel("mean fold accuracy")
    axis.set_title("optimisation history")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    return save_figure(figure, path)


def plot_importances(importances: dict, path) -> Path:
    figure = new_figure(6, 0.35 * len(importances) + 1.2)
    axis = figure.subplots()
    names = list(importances)[::-1]  # the most important on top
    axis.barh(names, [importances[name] for name in names], color="tab:blue")
    axis.set_xlabel("importance (share of the objective's variation)")
    axis.set_title("parameter importances")
    return save_figure(figure, path)


def plot_slice(rows: list[dict], name: str, space, path) -> Path:
    """The mean fold accuracy of every completed trial against one parameter, coloured by trial number."""
    done = [r for r in rows if r["state"] == "complete"]
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
    axis.set_xlabel(name)
    axis.set_ylabel("mean fold accuracy")
    axis.grid(alpha=0.3)
    return save_figure(figure, path)


def running_accuracy(row: dict) -> float:
    folds = [v for k, v in row.items() if k.startswith("fold") and k.endswith("_accuracy") and v is not None]
    return float(np.mean(folds)) if folds else math.nan


def write_tune_report(run_dir, rows: list[dict], best: dict, search_space: dict, importances: dict | str, *,
                      title: str) -> Path:
    """plots/history.png, plots/importances.png (when computable), plots/slice_<parameter>.png, report.html."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    seed = best["seed_recipe"]
    images = {"history": plot_history(rows, seed["accuracy"], plots / "history.png")}
    if isinstance(importances, dict) and importances:
        images["importances"] = plot_importances(importances, plots / "importances.png")
    for name, space in search_space.items():
        images[f"slice_{name}"] = plot_slice(rows, name, space, plots / f"slice_{name}.png")
    uris = {name: file_data_uri(path) for name, path in images.items()}

    def plot(name: str, alt: str) -> str:
        return f'<img class="plot" src="{uris[name]}" alt="{escape(alt)}">' if name in uris else ""

    folds = best["folds"]
    summary = (f"<p>Objective: {escape(best['objective'])}. Each trial is scored on the same {folds} folds; "
               f"each fold's model keeps its last epoch.</p>"
               + _table(["", "mean fold accuracy", "std", "log-loss"] + [f"fold {k + 1}" for k in range(folds)],
                        [["best (trial %d)" % best["trial"], best["accuracy"], best["accuracy_std"], best["log_loss"],
                          *best["fold_accuracy"]],
                         ["seed recipe", seed["accuracy"], seed["accuracy_std"], seed["log_loss"],
                          *seed["fold_accuracy"]]], ["best", ""], short=True)
               + _table(["parameter", "best", "seed recipe"],
                        [[name, best["params"].get(name), seed["params"].get(name)] for name in search_space],
                        short=True)
               + (f"<p>The final model, trained on all images with these settings: "
                  f"<code>{escape(str(best['final_run']))}</code> (its report.html holds the out-of-fold metrics)."
                  "</p>" if best.get("final_run") else ""))
    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: -r["value"])[:TOP_TRIALS]
    columns = ["number", "accuracy", "accuracy_std", "log_loss", "seconds"] + list(search_space)
    trials = (_mapping_table(best["trials"])
              + f"<h3>The {len(done)} best trials</h3>"  # 14 columns: a box that scrolls sideways, 3 digits a number
              + _table(columns, [[r[c] for c in columns] for r in done], short=True))
    importance = plot("importances", "parameter importances") or f"<p>{escape(str(importances))}</p>"
    slices = "".join(plot(f"slice_{name}", f"accuracy against {name}") for name in search_space)
    sections = [("best", "Best settings", summary), ("trials", "Trials", trials),
                ("history", "History", plot("history", "optimisation history")),
                ("importances", "Importances", importance), ("slices", "Slices", slices)]
    headline = (f"Best {folds}-fold CV accuracy {best['accuracy']:.3f} ± {best['accuracy_std']:.3f} "
                f"(trial {best['trial']}); seed recipe {seed['accuracy']:.3f}")
    return atomic_write_text(run_dir / "report.html", render_page(title, headline, sections))
