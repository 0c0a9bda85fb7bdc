"""The HTML of report.html: one self-contained page (inline CSS, images as data URIs) from plain dicts.

Every piece of text is escaped here; callers pass raw strings and numbers.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

SMALL_N = 100  # below this many images the report says in words how little the point estimate means
LONG_TABLE = 25  # operating-point tables longer than this fold into a <details> element

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
.warnings li { color: #8a4b00; } .note { color: #555; } .headline { font-size: 1.2em; }
.group { border: 1px solid #ddd; padding: 0.4em; margin: 0.5em 0; display: flex; flex-wrap: wrap; gap: 0.6em; }
.group.cross { border: 2px solid #c0392b; background: #fdf0ee; }
.group figure { margin: 0; width: 110px; font-size: 0.75em; overflow-wrap: anywhere; }
.group .tag { width: 100%; font-weight: 600; } .cross .tag { color: #c0392b; }
"""


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value and (abs(value) < 1e-3 or abs(value) >= 1e4):  # a learning rate of 1e-6 is not 0.000
            return f"{value:.4g}"
        return f"{value:.3f}"
    return escape(str(value))


def _cell(value) -> str:
    if isinstance(value, dict):
        return f"<td>{_mapping_table(value)}</td>"
    if isinstance(value, list):
        return f"<td>{_list(value)}</td>"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_number(value)}</td>' if numeric else f"<td>{_number(value)}</td>"


def _table(header: list[str], rows: list[list], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{css}>" + "".join(_cell(v) for v in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _mapping_table(mapping: dict) -> str:
    """Any dict as a two-column table; nested dicts become sub-tables, lists of dicts become tables."""
    rows = "".join(f"<tr><th>{escape(str(key))}</th>{_cell(value)}</tr>" for key, value in mapping.items())
    return f"<table>{rows}</table>"


def _list(values: list) -> str:
    if not values:
        return "none"
    if all(isinstance(v, dict) for v in values):
        columns = list(dict.fromkeys(key for v in values for key in v))
        return _table(columns, [[v.get(c) for c in columns] for v in values])
    return escape(", ".join(str(v) for v in values))


def _plot(images: dict[str, str], name: str, alt: str) -> str:
    return f'<img class="plot" src="{images[name]}" alt="{escape(alt)}">' if name in images else ""


def accuracy_sentence(metrics: dict) -> str:
    lo, hi = metrics["accuracy_ci95"]
    return f"{metrics['accuracy']:.2f} (95% CI {lo:.2f}–{hi:.2f}, n={metrics['n']})"


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
    if not run_info:
        return None
    return ("run", "Run", _mapping_table(run_info))


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
        parts.append(_table(["split"] + names, [[split] + [c[name] for name in names] for split, c in counts.items()]))
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
    return ("curves", "Curves", _plot(images, "curves", "loss, accuracy and learning rate per epoch"))


def _metrics_section(metrics: dict, images: dict[str, str]) -> Section:
    names = metrics["class_names"]
    rule = "argmax of the class probabilities"
    if metrics["threshold"] is not None:
        rule = f"{names[1]} when p({names[1]}) ≥ {metrics['threshold']:.3f}"
    parts = [
        f'<p class="headline">Accuracy {escape(accuracy_sentence(metrics))}</p>',
        _small_n_note(metrics),
        f"<p>Decision rule: {escape(rule)}. Macro F1 {_number(metrics['macro_f1'])}; "
        f"log loss {_number(metrics['log_loss'])}.</p>",
        _table(
            ["class", "precision", "recall", "F1", "support"],
            [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in metrics["per_class"].items()],
        ),
        "<h3>Confusion (rows: truth, columns: prediction)</h3>",
        _table(["truth \\ predicted"] + names, [[name] + row for name, row in zip(names, metrics["confusion"])]),
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
        parts.append(_table(["class", "ROC AUC (one-vs-rest)"], [[k, v] for k, v in metrics["roc_auc_per_class"].items()]))
    parts += [_plot(images, "roc", "ROC curve"), _plot(images, "pr", "precision-recall curve")]
    calibration = metrics["calibration"]
    filled = [b for b in calibration["bins"] if b["count"]]
    parts += [
        "<h3>Calibration</h3>",
        f"<p>Expected calibration error (10 bins on the top-class probability): {_number(calibration['ece'])}. "
        "0 means the stated confidence matches the hit rate.</p>",
        _table(
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
    body = _table(["threshold", "precision", "recall", "false-positive rate"], rows, marks)
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
        _table(["metric", "mean", "std"] + [f"fold {i + 1}" for i in range(len(folds))], rows),
    ]
    if cv.get("oof_confusion"):
        parts += [
            "<h3>Out-of-fold confusion (rows: truth)</h3>",
            _table(["truth \\ predicted"] + class_names, [[n] + r for n, r in zip(class_names, cv["oof_confusion"])]),
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
    """The whole page. `images` maps a plot name (samples, errors, curves, ...) to its data URI."""
    sections = [
        _run_section(run_info),
        _checks_section(checks, thumbnails or {}),
        _curves_section(images),
        _metrics_section(metrics, images),
        _threshold_section(metrics),
        _cv_section(cv, metrics["class_names"]),
        _images_section(metrics, images),
    ]
    return render_page(title, f"Accuracy {accuracy_sentence(metrics)}", sections)


def render_page(title: str, headline: str, sections: list[Section | None]) -> str:
    """A page: the title, a one-line headline, links to the sections, then the sections (None ones left out)."""
    sections = [s for s in sections if s]
    links = " ".join(f'<a href="#{anchor}">{escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(
        f'<section id="{anchor}"><h2>{escape(heading)}</h2>{html}</section>' for anchor, heading, html in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p>{escape(headline)}</p><nav>{links}</nav>"
        f"{body}</body></html>\n"
    )
