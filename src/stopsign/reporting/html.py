"""The HTML of report.html: one self-contained page (inline CSS, images as data URIs) from plain dicts.

The markup lives in templates/ (Jinja2, autoescaped: callers pass raw strings and numbers); this module computes
what the templates show (rows, counts, which notes apply) and formats the numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import jinja2
from markupsafe import Markup

from ..config import relevant_settings
from .metrics import accuracy_interval, headline

SMALL_N = 100  # below this many images the report says in words how little the point estimate means
LONG_TABLE = 25  # operating-point tables longer than this fold into a <details> element
HEADLINE_CLASSES = 6  # the headline names every class's recall up to this many classes, else the lowest three
NOT_DEFINED = "n/a"  # a precision of a class never predicted, a recall of a class with no image: 0/0

Section = tuple[str, str, Markup]  # (anchor, heading, rendered body)


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
                         accuracy_interval=accuracy_interval, filename=lambda path: Path(path).name)
TEMPLATES.tests.update(list=lambda value: isinstance(value, list),
                       records=lambda values: all(isinstance(value, dict) for value in values),
                       numeric=lambda value: isinstance(value, (int, float, Shown)) and not isinstance(value, bool))
TEMPLATES.globals.update(small_n=SMALL_N, long_table=LONG_TABLE, not_defined=NOT_DEFINED)


def macros(template: str):
    """A template's macros, to call from Python: each returns its markup."""
    return TEMPLATES.get_template(template).module


def _per_class_rows(metrics: dict) -> list[list]:
    """class, precision, recall, F1, support; a ratio over nothing (0/0) is n/a, not 0."""
    predicted = [sum(column) for column in zip(*metrics["confusion"])]  # column sums: how often each was predicted
    rows = []
    for k, (name, m) in enumerate(metrics["per_class"].items()):
        never_predicted, no_support = predicted[k] == 0, m["support"] == 0
        rows.append([
            name,
            Shown(NOT_DEFINED) if never_predicted else m["precision"],
            Shown(NOT_DEFINED) if no_support else m["recall"],
            Shown(NOT_DEFINED) if never_predicted and no_support else m["f1"],  # 2TP / (2TP + FP + FN) = 0/0
            m["support"],
        ])
    return rows


def _confusion_rows(class_names: list[str], matrix: list[list[int]]) -> list[list]:
    return [[name, *row] for name, row in zip(class_names, matrix)]


def _metrics_section(metrics: dict, images: dict[str, str], checks: dict | None = None) -> Section:
    per_class = _per_class_rows(metrics)
    calibration = [[f"{b['lo']:.1f}–{b['hi']:.1f}", b["count"], b["confidence"], b["accuracy"]]
                   for b in metrics["calibration"]["bins"] if b["count"]]
    body = macros("report.html.j2").metrics(
        metrics, capitalised(headline(metrics)), per_class,
        undefined=any(isinstance(value, Shown) for row in per_class for value in row),
        problems=len((checks or {}).get("warnings") or []),  # the data checks come late: pointed to up front
        confusion=_confusion_rows(metrics["class_names"], metrics["confusion"]), calibration=calibration,
        images=images)
    return ("metrics", "Metrics", body)


def _threshold_section(metrics: dict) -> Section | None:
    table, best = metrics.get("thresholds"), metrics.get("best_f1_threshold")
    if not table:
        return None
    rows = [[r["threshold"], r["precision"], r["recall"], r["fpr"]] for r in table]
    marks = ["best" if r["threshold"] == best["threshold"] else "" for r in table]
    return ("threshold", "Threshold", macros("report.html.j2").threshold(metrics, rows, marks))


def _cv_section(cv: dict | None, class_names: list[str]) -> Section | None:
    if not cv:
        return None
    keys = [k for k, v in cv.get("mean", {}).items() if isinstance(v, (int, float))]
    folds = cv.get("per_fold", [])
    header = ["metric", "mean", "std"] + [f"fold {i + 1}" for i in range(len(folds))]
    rows = [[k, cv["mean"][k], cv.get("std", {}).get(k)] + [fold.get(k) for fold in folds] for k in keys]
    confusion = _confusion_rows(class_names, cv["oof_confusion"]) if cv.get("oof_confusion") else None
    body = macros("report.html.j2").cv(cv.get("folds", len(folds)), header, rows, class_names, confusion)
    return ("cv", "Cross-validation", body)


def _checks_section(checks: dict | None, thumbnails: dict[str, str]) -> Section | None:
    if not checks:
        return None
    counts = checks.get("class_counts", {})
    if counts:
        names = list(next(iter(counts.values())))
        counts = (["split", *names], [[split] + [c[name] for name in names] for split, c in counts.items()])
    return ("checks", "Data checks", macros("report.html.j2").checks(checks, counts, thumbnails))


def _run_section(run_info: dict | None) -> Section | None:
    """The run's record; of its settings, those its head reads (no epochs or learning rate for a logistic head)."""
    if not run_info:
        return None
    if isinstance(run_info.get("settings"), dict):
        run_info = run_info | {"settings": relevant_settings(run_info["settings"])}
    return ("run", "Run", macros("tables.html.j2").mapping_table(run_info))


def render_report(
    title: str,
    metrics: dict,
    *,
    images: dict[str, str],
    run_info: dict | None = None,
    checks: dict | None = None,
    thumbnails: dict[str, str] | None = None,
    cv: dict | None = None,
) -> str:
    """The whole page. `images` maps a plot name (samples, errors, curves, ...) to its data URI.

    The results first (the headline under the title: accuracy, its interval, n, each class's recall; then the
    metrics), how the run went after them, and the long parts (photos, duplicate groups, settings) last.
    """
    report = macros("report.html.j2")
    wrong = metrics["n"] - sum(row[k] for k, row in enumerate(metrics["confusion"]))
    sections = [
        _metrics_section(metrics, images, checks),
        _threshold_section(metrics),
        _cv_section(cv, metrics["class_names"]),
        ("curves", "Curves", report.curves(images)) if "curves" in images else None,
        ("images", "Images", report.images(metrics, wrong, images)),
        _checks_section(checks, thumbnails or {}),
        _run_section(run_info),
    ]
    return render_page(title, f"{capitalised(headline(metrics))}; {recall_sentence(metrics)}", sections,
                       alerts=metrics.get("warnings", []))


def render_page(title: str, headline: str, sections: list[Section | None], alerts: list[str] = ()) -> str:
    """A page: the title, what is wrong (alerts, in red), a one-line headline, links to the sections, then the
    sections (None ones left out)."""
    sections = [s for s in sections if s]
    return TEMPLATES.get_template("page.html.j2").render(title=title, headline=headline, sections=sections,
                                                         alerts=alerts)
