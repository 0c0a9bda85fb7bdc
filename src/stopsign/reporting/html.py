"""The HTML of the reports: self-contained pages (inline CSS, images as data URIs) from plain dicts.

The markup lives in templates/ (Jinja2, autoescaped: callers pass raw strings and numbers); this module formats
the numbers and computes the rows the templates cannot simply copy from the metrics.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import jinja2

from ..config import relevant_settings
from .metrics import accuracy_interval, headline

SMALL_N = 100  # below this many images the report says in words how little the point estimate means
LONG_TABLE = 25  # operating-point tables longer than this fold into a <details> element
HEADLINE_CLASSES = 6  # the headline names every class's recall up to this many classes, else the lowest three
NOT_DEFINED = "n/a"  # a precision of a class never predicted, a recall of a class with no image: 0/0


def short_number(value: float) -> str:
    """A float in 3 significant digits and no padding: 0.812, 12.3, 1235 (whole from 1,000 to 10,000), and in
    powers of ten outside 0.001 to 10,000: 1e-4, 2.5e-6, 1.23e5."""
    if not math.isfinite(value):
        return str(value)
    rounded = abs(float(f"{value:.3g}"))  # where it lands decides the form: 999.96 is 1000, 9999.7 is 1e4
    if not rounded:
        return "0"
    if 1000 <= rounded < 10_000:
        return f"{value:.0f}"
    if not 1e-3 <= rounded < 10_000:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def number(value, short: bool = False) -> str:
    """short: floats in 3 significant digits (tables of many columns); else 3 decimals (scores in 0..1)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if short:
            return short_number(value)
        if value and (abs(value) < 1e-3 or abs(value) >= 1e4):  # a learning rate of 1e-6 is not 0.000
            return f"{value:.4g}"
        return f"{value:.3f}"
    return str(value)


class Shown(str):
    """Text that stands in a numeric column (n/a): right-aligned like the numbers around it."""


def operating_rows(points: list[dict]) -> list[list]:
    """The threshold table's rows (thresholds falling), each threshold rounded down to the fewest decimals, from 3,
    that keep it above the next row's: a confident head's 0.999961 and 0.999932 read 0.99996 and 0.99993, not 1.000
    twice, and a threshold copied from the table (--threshold) predicts what its row does."""
    def floor(value: float, decimals: int) -> Decimal:
        return Decimal(str(float(value))).quantize(Decimal(10) ** -decimals, ROUND_FLOOR)

    rows = []
    for point, below in zip(points, [point["threshold"] for point in points[1:]] + [None]):
        decimals = next((d for d in range(3, 13) if below is None or floor(point["threshold"], d) > below), 12)
        rows.append([Shown(str(floor(point["threshold"], decimals))), point["precision"], point["recall"],
                     point["fpr"]])
    return rows


def records(values: list[dict]) -> tuple[list, list[list]]:
    """A list of dicts as a table: every key that occurs as a column, one row each."""
    columns = list(dict.fromkeys(key for value in values for key in value))
    return columns, [[value.get(column) for column in columns] for value in values]


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def recall_sentence(metrics: dict) -> str:
    """Each class's recall (the lowest three when there are many classes); classes with no image left out."""
    recalls = [(name, m["recall"]) for name, m in metrics["per_class"].items() if m["support"]]
    what = "recall"
    if len(recalls) > HEADLINE_CLASSES:
        recalls, what = sorted(recalls, key=lambda item: item[1])[:3], "lowest recall"
    return f"{what}: " + ", ".join(f"{name} {recall:.2f}" for name, recall in recalls)


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("stopsign.reporting"), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
TEMPLATES.filters.update(number=number, records=records, capitalised=capitalised, recall_sentence=recall_sentence,
                         accuracy_interval=accuracy_interval, headline=headline, filename=lambda path: Path(path).name,
                         labelled=lambda matrix, names: [[name, *row] for name, row in zip(names, matrix)])
TEMPLATES.tests.update(list=lambda value: isinstance(value, list),
                       records=lambda values: all(isinstance(value, dict) for value in values),
                       numeric=lambda value: isinstance(value, (int, float, Shown)) and not isinstance(value, bool))
TEMPLATES.globals.update(small_n=SMALL_N, long_table=LONG_TABLE, not_defined=NOT_DEFINED)


def per_class_rows(metrics: dict) -> list[list]:
    """class, precision, recall, F1, support; a ratio over nothing (0/0) is n/a, not 0."""
    predicted = [sum(column) for column in zip(*metrics["confusion"])]  # column sums: how often each was predicted
    rows = []
    for k, (name, m) in enumerate(metrics["per_class"].items()):
        never_predicted, no_support = predicted[k] == 0, m["support"] == 0
        rows.append([name, Shown(NOT_DEFINED) if never_predicted else m["precision"],
                     Shown(NOT_DEFINED) if no_support else m["recall"],
                     Shown(NOT_DEFINED) if never_predicted and no_support else m["f1"],  # 2TP / (2TP + FP + FN) = 0/0
                     m["support"]])
    return rows


def render_report(title: str, metrics: dict, *, images: dict[str, str], run_info: dict | None = None,
                  checks: dict | None = None, thumbnails: dict[str, str] | None = None, cv: dict | None = None) -> str:
    """The whole page (templates/report.html.j2). `images` maps a plot name (samples, errors, curves, ...) to its
    data URI; of the run's settings, it shows those its head reads (no epochs or learning rate for a logistic head)."""
    cv, checks = cv or {}, checks or {}
    folds, counts = cv.get("per_fold", []), checks.get("class_counts") or {}
    classes = list(next(iter(counts.values()), {}))
    points, rule = metrics.get("thresholds") or [], metrics.get("threshold")
    # the threshold table's marked rows: the best F1's, and the decision rule's (the lowest score at or above it)
    marked = {"best": (metrics.get("best_f1_threshold") or {}).get("threshold"),
              "rule": min((p["threshold"] for p in points if p["threshold"] >= rule), default=None) if rule is not None
              else None}
    operating = operating_rows(points)
    if run_info and isinstance(run_info.get("settings"), dict):
        run_info = run_info | {"settings": relevant_settings(run_info["settings"])}
    per_class = per_class_rows(metrics)
    return TEMPLATES.get_template("report.html.j2").render(
        title=title, m=metrics, images=images, run_info=run_info, checks=checks, thumbnails=thumbnails or {}, cv=cv,
        per_class=per_class, undefined=any(isinstance(value, Shown) for row in per_class for value in row),
        wrong=metrics["n"] - sum(row[k] for k, row in enumerate(metrics["confusion"])),
        calibration=[[f"{b['lo']:.1f}–{b['hi']:.1f}", b["count"], b["confidence"], b["accuracy"]]
                     for b in metrics["calibration"]["bins"] if b["count"]],
        operating_points=operating, best_threshold=next(
            (row[0] for row, p in zip(operating, points) if p["threshold"] == marked["best"]), None),
        marks=[" ".join(name for name, t in marked.items() if p["threshold"] == t) for p in points],
        cv_header=["metric", "mean", "std"] + [f"fold {i + 1}" for i in range(len(folds))],
        cv_rows=[[key, value, cv.get("std", {}).get(key)] + [fold.get(key) for fold in folds]
                 for key, value in cv.get("mean", {}).items() if isinstance(value, (int, float))],
        counts=(["split", *classes], [[split] + [c[name] for name in classes] for split, c in counts.items()]))
