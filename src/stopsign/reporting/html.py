"""The HTML of report.html: one self-contained page (inline CSS, images as data URIs) from plain dicts.

Every piece of text is escaped here; callers pass raw strings and numbers.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from ..config import relevant_settings
from .metrics import accuracy_interval, headline

SMALL_N = 100  # below this many images the report says in words how little the point estimate means
LONG_TABLE = 25  # operating-point tables longer than this fold into a <details> element
HEADLINE_CLASSES = 6  # the headline names every class's recall up to this many classes, else the lowest three
NOT_DEFINED = "n/a"  # a precision of a class never predicted, a recall of a class with no image: 0/0

Section = tuple[str, str, str]  # (anchor, heading, inner HTML)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eaf6ea; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.scroll { overflow-x: auto; max-width: 100%; margin: 0.6em 0; } .scroll > table { margin: 0; }
.warnings li, p.warnings, p.warning { color: #8a4b00; } p.error { color: #b00020; font-weight: bold; } .note { color: #555; } .headline { font-size: 1.2em; }
.group { border: 1px solid #ddd; padding: 0.4em; margin: 0.5em 0; display: flex; flex-wrap: wrap; gap: 0.6em; }
.group.cross { border: 2px solid #c0392b; background: #fdf0ee; }
.group figure { margin: 0; width: 110px; font-size: 0.75em; overflow-wrap: anywhere; }
.group .tag { width: 100%; font-weight: 600; } .cross .tag { color: #c0392b; }
"""


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


def _number(value, short: bool = False) -> str:
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
    return escape(str(value))


class Shown(str):
    """Text that stands in a numeric column (n/a): right-aligned like the numbers around it."""


def _cell(value, short: bool = False) -> str:
    if isinstance(value, dict):
        return f"<td>{mapping_table(value, short)}</td>"
    if isinstance(value, list):
        return f"<td>{_list(value, short)}</td>"
    numeric = isinstance(value, (int, float, Shown)) and not isinstance(value, bool)
    text = _number(value, short)
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def _scrolling(table: str) -> str:
    """A table in a box of its own that scrolls sideways when the table is wider than the page."""
    return f'<div class="scroll">{table}</div>'


def html_table(header: list[str], rows: list[list], row_classes: list[str] | None = None, *, short: bool = False,
           row_headers: bool = False) -> str:
    """short: floats in 3 significant digits. row_headers: each row's first cell is its heading (<th>)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = [_cell(v, short) for v in row]
        if row_headers and row:
            cells[0] = f'<th scope="row">{escape(str(row[0]))}</th>'
        body.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    return _scrolling(f"<table><tr>{head}</tr>{''.join(body)}</table>")


def mapping_table(mapping: dict, short: bool = False) -> str:
    """Any dict as a two-column table; nested dicts become sub-tables, lists of dicts become tables."""
    rows = "".join(f"<tr><th>{escape(str(key))}</th>{_cell(value, short)}</tr>" for key, value in mapping.items())
    return _scrolling(f"<table>{rows}</table>")


def _list(values: list, short: bool = False) -> str:
    if not values:
        return "none"
    if all(isinstance(v, dict) for v in values):
        columns = list(dict.fromkeys(key for v in values for key in v))
        return html_table(columns, [[v.get(c) for c in columns] for v in values], short=short)
    return escape(", ".join(str(v) for v in values))


def _confusion_table(class_names: list[str], matrix: list[list[int]]) -> str:
    """Rows: the true class, columns: the predicted one, each named."""
    return html_table(["truth \\ predicted"] + class_names, [[name] + list(row) for name, row in zip(class_names, matrix)],
                  row_headers=True)


def _plot(images: dict[str, str], name: str, alt: str) -> str:
    return f'<img class="plot" src="{images[name]}" alt="{escape(alt)}">' if name in images else ""


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def recall_sentence(metrics: dict) -> str:
    """Each class's recall (the lowest three when there are many classes); classes with no image left out."""
    recalls = [(name, m["recall"]) for name, m in metrics["per_class"].items() if m["support"]]
    what = "recall"
    if len(recalls) > HEADLINE_CLASSES:
        recalls, what = sorted(recalls, key=lambda item: item[1])[:3], "lowest recall"
    return f"{what}: " + ", ".join(f"{name} {recall:.2f}" for name, recall in recalls)


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


def _trust_notes(metrics: dict) -> str:
    """What the headline figure is worth: copies of training images among the evaluated ones (and the figure on
    the new ones), the best-epoch choice on a small validation set, and the test split scored once."""
    notes = []
    copies = metrics.get("training_copies")
    if copies and copies["exact"] + copies["near"]:
        text = (f"{copies['exact'] + copies['near']} of these {metrics['n']} images are training images of this "
                f"model ({copies['exact']} exact copies, {copies['near']} near copies by feature similarity): "
                "accuracy on them measures memory.")
        new = copies["new_images"]
        if new:
            text += (f" On the {new['n']} new images: accuracy {accuracy_interval(new)}; "
                     + ", ".join(f"recall {name} {r:.2f}" for name, r in new["recall"].items() if r is not None)
                     + ". That is the figure to quote.")
        notes.append(f'<p class="warning">{escape(text)}</p>')
    elif copies:
        notes.append(f'<p class="note">None of these images is a training image of this model or a near copy of '
                     "one.</p>")
    selection = (metrics.get("selection") or {}).get("warning")
    if selection:
        notes.append(f'<p class="warning">{escape(selection[0].upper() + selection[1:])}.</p>')
    if metrics.get("test"):
        test = metrics["test"]
        notes.append(f'<p class="headline">Test split, scored once with the kept model: accuracy '
                     f"{escape(accuracy_interval(test))}; {escape(recall_sentence(test))}. The unbiased figure.</p>")
    return "".join(notes)


def _small_n_note(metrics: dict) -> str:
    n = metrics["n"]
    if n >= SMALL_N:
        return ""
    lo, hi = metrics["accuracy_ci95"]
    return (
        f'<p class="note">Only {n} images: each one moves accuracy by {100 / n:.1f} points, and the data are '
        f"consistent with any accuracy from {lo:.2f} to {hi:.2f}. Read the interval, not the point estimate; "
        "differences between runs smaller than it are noise.</p>"
    )


def _run_section(run_info: dict | None) -> Section | None:
    """The run's record; of its settings, those its head reads (no epochs or learning rate for a logistic head)."""
    if not run_info:
        return None
    if isinstance(run_info.get("settings"), dict):
        run_info = run_info | {"settings": relevant_settings(run_info["settings"])}
    return ("run", "Run", mapping_table(run_info))


def _group_html(group: dict, thumbnails: dict[str, str], what: str) -> str:
    tag = what + (f" (perceptual hashes differ in {group['max_distance']} of 64 bits)" if "max_distance" in group else "")
    if group["cross_split"]:
        tag += " — crosses splits: held-out copies were seen in training"
    if group.get("labels_disagree"):
        tag += " — labels disagree"
    figures = []
    for file in group["files"]:
        picture = f'<img src="{thumbnails[file["path"]]}" alt="">' if file["path"] in thumbnails else ""
        caption = f"{escape(Path(file['path']).name)}<br>{escape(file['split'])} · {escape(file['label'])}"
        figures.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    css = "group cross" if group["cross_split"] else "group"
    return f'<div class="{css}"><div class="tag">{escape(tag)}</div>{"".join(figures)}</div>'


def _checks_section(checks: dict | None, thumbnails: dict[str, str]) -> Section | None:
    if not checks:
        return None
    parts = []
    if checks.get("warnings"):
        parts.append('<ul class="warnings">' + "".join(f"<li>{escape(w)}</li>" for w in checks["warnings"]) + "</ul>")
    else:
        parts.append("<p>No problems found.</p>")
    counts = checks.get("class_counts", {})
    if counts:
        names = list(next(iter(counts.values())))
        parts.append(html_table(["split"] + names, [[split] + [c[name] for name in names] for split, c in counts.items()]))
    ratio = checks.get("imbalance", {}).get("ratio")
    if ratio is not None:
        parts.append(f"<p>Largest to smallest class: {ratio:.2f} to 1.</p>")
    parts.append(f"<p>Duplicate groups crossing splits: <b>{checks.get('cross_split', 0)}</b>.</p>")
    for key, what in (("exact_duplicates", "identical files"), ("near_duplicates", "look-alike images")):
        groups = checks.get(key, [])
        parts.append(f"<h3>{escape(what.capitalize())}: {len(groups)} groups</h3>")
        parts.extend(_group_html(group, thumbnails, what) for group in groups)
    return ("checks", "Data checks", "".join(parts))


def _curves_section(images: dict[str, str]) -> Section | None:
    if "curves" not in images:
        return None
    return ("curves", "Curves", _plot(images, "curves", "loss, accuracy and learning rate per epoch, or the "
                                                        "held-out log-loss of each C of a head fit in one step"))


def _checks_pointer(checks: dict | None) -> str:
    """The data checks come late in the page: a line up front when they found a problem."""
    warnings = (checks or {}).get("warnings") or []
    if not warnings:
        return ""
    problems = "a problem" if len(warnings) == 1 else f"{len(warnings)} problems"
    return (f'<p class="warnings">The data checks found {problems}: read <a href="#checks">Data checks</a> '
            "before trusting these numbers.</p>")


def _metrics_section(metrics: dict, images: dict[str, str], checks: dict | None = None) -> Section:
    names = metrics["class_names"]
    rule = "argmax of the class probabilities"
    if metrics["threshold"] is not None:
        rule = f"{names[1]} when p({names[1]}) ≥ {metrics['threshold']:.3f}"
    per_class = _per_class_rows(metrics)
    parts = [
        f'<p class="headline">{escape(capitalised(headline(metrics)))}</p>',
        _trust_notes(metrics),
        _checks_pointer(checks),
        _small_n_note(metrics),
        f"<p>Decision rule: {escape(rule)}. Macro F1 {_number(metrics['macro_f1'])}; "
        f"log loss {_number(metrics['log_loss'])}.</p>",
        html_table(["class", "precision", "recall", "F1", "support"], per_class, row_headers=True),
        f'<p class="note">{NOT_DEFINED}: precision of a class never predicted, recall of a class with no image.</p>'
        if any(isinstance(value, Shown) for row in per_class for value in row) else "",
        "<h3>Confusion (rows: truth, columns: prediction)</h3>",
        _confusion_table(names, metrics["confusion"]),
        _plot(images, "confusion", "confusion matrix"),
        "<h3>ROC and precision-recall</h3>",
    ]
    if metrics["roc_auc"] is None:
        parts.append(f"<p>ROC AUC {escape(metrics.get('roc_auc_reason', 'undefined'))}.</p>")
    else:
        parts.append(f"<p>ROC AUC {_number(metrics['roc_auc'])}" + (" (macro, one-vs-rest)" if len(names) > 2 else ""))
        if "pr_auc" in metrics:
            parts.append(f"; average precision (PR AUC) {_number(metrics['pr_auc'])}")
        parts.append(".</p>")
    if "roc_auc_per_class" in metrics:
        parts.append(html_table(["class", "ROC AUC (one-vs-rest)"], [[k, v] for k, v in metrics["roc_auc_per_class"].items()]))
    parts += [_plot(images, "roc", "ROC curve"), _plot(images, "pr", "precision-recall curve")]
    calibration = metrics["calibration"]
    filled = [b for b in calibration["bins"] if b["count"]]
    parts += [
        "<h3>Calibration</h3>",
        f"<p>Expected calibration error (10 bins on the top-class probability): {_number(calibration['ece'])}. "
        "0 means the stated confidence matches the hit rate.</p>",
        html_table(
            ["bin", "images", "mean confidence", "accuracy"],
            [[f"{b['lo']:.1f}–{b['hi']:.1f}", b["count"], b["confidence"], b["accuracy"]] for b in filled],
        ),
        _plot(images, "calibration", "reliability diagram"),
    ]
    return ("metrics", "Metrics", "".join(parts))


def _threshold_section(metrics: dict) -> Section | None:
    table, best = metrics.get("thresholds"), metrics.get("best_f1_threshold")
    if not table:
        return None
    positive = metrics["class_names"][1]
    rows = [[r["threshold"], r["precision"], r["recall"], r["fpr"]] for r in table]
    marks = ["best" if r["threshold"] == best["threshold"] else "" for r in table]
    body = html_table(["threshold", "precision", "recall", "false-positive rate"], rows, marks)
    if len(table) > LONG_TABLE:
        body = f"<details><summary>All {len(table)} operating points</summary>{body}</details>"
    text = (
        f"<p>Predict <b>{escape(positive)}</b> when p({escape(positive)}) ≥ threshold. Best F1 "
        f"{_number(best['f1'])} at threshold {_number(best['threshold'])} (precision {_number(best['precision'])}, "
        f"recall {_number(best['recall'])}). It was picked on these same {metrics['n']} images, so its F1 is "
        "optimistic; confirm it on other images before relying on it.</p>"
    )
    return ("threshold", "Threshold", text + body)


def _cv_section(cv: dict | None, class_names: list[str]) -> Section | None:
    if not cv:
        return None
    keys = [k for k, v in cv.get("mean", {}).items() if isinstance(v, (int, float))]
    folds = cv.get("per_fold", [])
    rows = [[k, cv["mean"][k], cv.get("std", {}).get(k)] + [fold.get(k) for fold in folds] for k in keys]
    parts = [
        f"<p>{cv.get('folds', len(folds))}-fold cross-validation: every image is scored once by a model that did not "
        "train on it.</p>",
        html_table(["metric", "mean", "std"] + [f"fold {i + 1}" for i in range(len(folds))], rows),
    ]
    if cv.get("oof_confusion"):
        parts += [
            "<h3>Out-of-fold confusion (rows: truth)</h3>",
            _confusion_table(class_names, cv["oof_confusion"]),
        ]
    return ("cv", "Cross-validation", "".join(parts))


def _images_section(metrics: dict, images: dict[str, str]) -> Section:
    wrong = metrics["n"] - sum(row[k] for k, row in enumerate(metrics["confusion"]))
    parts = ["<h3>Sample predictions (predicted p=confidence / truth; mistakes in red)</h3>", _plot(images, "samples", "sample predictions")]
    parts.append(f"<h3>Mistakes: {wrong} of {metrics['n']}</h3>")
    if "errors" in images:
        parts += ["<p>Most confident mistakes first.</p>", _plot(images, "errors", "misclassified images")]
    else:
        parts.append("<p>No image was misclassified.</p>")
    return ("images", "Images", "".join(parts))


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
    sections = [
        _metrics_section(metrics, images, checks),
        _threshold_section(metrics),
        _cv_section(cv, metrics["class_names"]),
        _curves_section(images),
        _images_section(metrics, images),
        _checks_section(checks, thumbnails or {}),
        _run_section(run_info),
    ]
    return render_page(title, f"{capitalised(headline(metrics))}; {recall_sentence(metrics)}", sections,
                       alerts=metrics.get("warnings", []))


def render_page(title: str, headline: str, sections: list[Section | None], alerts: list[str] = ()) -> str:
    """A page: the title, what is wrong (alerts, in red), a one-line headline, links to the sections, then the
    sections (None ones left out)."""
    sections = [s for s in sections if s]
    links = " ".join(f'<a href="#{anchor}">{escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(
        f'<section id="{anchor}"><h2>{escape(heading)}</h2>{html}</section>' for anchor, heading, html in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        + "".join(f'<p class="error">{escape(capitalised(alert))}</p>' for alert in alerts)
        + f"<p>{escape(headline)}</p><nav>{links}</nav>"
        f"{body}</body></html>\n"
    )
