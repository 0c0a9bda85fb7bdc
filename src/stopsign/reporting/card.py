"""The model card: README.md in every run folder, as Hugging Face and AutoTrain write one. It says what the model
was trained on, what it scores beside what a model that ignores the photo scores, the decision threshold in force,
what it is for and where it will fail, and how to train it again; every figure is one the run recorded
(config.json, data.json, metrics.json and the summary), in templates/card.md.j2.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..config import command_flags
from ..files import atomic_write_text, read_json
from .html import TEMPLATES, per_class_rows
from .metrics import IMBALANCED, training_lines

# Markdown, not HTML: the report's templates and filters, without HTML escaping
CARDS = TEMPLATES.overlay(autoescape=False)


def write_card(run_dir: str | Path, summary: dict) -> Path:
    """README.md in a finished run folder, from its config.json, data.json and metrics.json and its summary
    (training/records.summary, written after the card)."""
    run_dir = Path(run_dir)
    config, data, metrics = (read_json(run_dir / name) for name in ("config.json", "data.json", "metrics.json"))
    return atomic_write_text(run_dir / "README.md", model_card(run_dir.name, config, data, metrics, summary))


def model_card(name: str, config: dict, data: dict, metrics: dict, summary: dict) -> str:
    """The card's Markdown. config, data, metrics: the run's config.json, data.json and metrics.json."""
    class_names, rows = data["class_names"], data["split"]
    header, counts = class_counts(data, class_names)
    separate = config["folds"] < 2 and any(Path(row["file"]).is_absolute() for row in rows if row["split"] == "val")
    data_flag = ["--val", "VAL"] if separate else []  # config.json does not record a separate set's folder
    return CARDS.get_template("card.md.j2").render(
        name=name, config=config, data=data, m=metrics, summary=summary, class_names=class_names,
        header=header, counts=counts, total=sum(row[-1] for row in counts), separate=separate, imbalanced=IMBALANCED,
        groups=len({row["group"] for row in rows if "group" in row}),
        synthetic=sum(bool(row.get("synthetic")) for row in rows),
        lines=training_lines(metrics, len(summary["accuracy"]["accuracy"]), summary["best_epoch"]),
        figures=figures(metrics), per_class=per_class_rows(metrics), threshold=summary.get("threshold"),
        command=shlex.join(["stopsign", "train", config["data"], *data_flag, *command_flags(config)]))


def class_counts(data: dict, class_names: list[str]) -> tuple[list[str], list[list]]:
    """The images of each class in each split that has some, and in all (a header and its rows), as data.json
    counts them."""
    splits = {split: counts for split, counts in data["counts"].items()
              if isinstance(counts, dict) and any(counts.values())}  # "skipped" is a number
    header = ["class", *splits, "all"]
    return header, [[name, *(counts.get(name, 0) for counts in splits.values()),
                     sum(counts.get(name, 0) for counts in splits.values())] for name in class_names]


def figures(metrics: dict) -> list[list]:
    """Each figure beside what a model that ignores the photo scores on the same images: the one that leads first
    (balanced accuracy above IMBALANCED:1)."""
    base, low_high = metrics["baseline"], "{:.2f}–{:.2f}".format(*metrics["accuracy_ci95"])
    rows = {"accuracy": ["accuracy", metrics["accuracy"], low_high, base["accuracy"],
                         f"always {base['majority_class']}"],
            "balanced_accuracy": ["balanced accuracy", metrics["balanced_accuracy"], "", base["balanced_accuracy"],
                                  "one class for every photo"],
            "log_loss": ["log-loss (lower is better)", metrics["log_loss"], "", base["log_loss"],
                         "the class shares for every photo"]}
    lead = metrics["verdict"]["lead"]
    return [rows[lead]] + [row for key, row in rows.items() if key != lead and row[1] is not None]
