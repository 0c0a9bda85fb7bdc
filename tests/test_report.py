"""report: the files exist and are valid, report.html is one self-contained page, its numbers are compute_metrics'."""

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFont

from stopsign.reporting.charts import axis_names
from stopsign.data.checks import check_data
from stopsign.reporting.metrics import Predictions, compute_metrics
from stopsign.reporting.photos import plot_samples
from stopsign.reporting.report import write_report

NAMES = ["not_stop", "stop"]


def Sample(path, label):  # data.Sample's shape: .path and .label
    return SimpleNamespace(path=path, label=label)


class Page(HTMLParser):
    """Collects what a self-contained page must not reach outside itself for, and its text."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.tags, self.text = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = tmp_path / "images" / f"photo_{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def predictions(paths, p1) -> Predictions:
    y = np.array([0, 1] * (len(paths) // 2))
    p1 = np.asarray(p1, dtype=float)
    return Predictions([str(p) for p in paths], y, np.c_[1 - p1, p1], NAMES)


P1_WITH_MISTAKES = [0.1, 0.9, 0.2, 0.8, 0.7, 0.35, 0.3, 0.95, 0.05, 0.6, 0.45, 0.55]  # 2 wrong at 0.5, 3 at 0.4
HISTORY = [
    dict(epoch=e, lr=0.01 / e, train_loss=1 / e, train_acc=1 - 0.5 / e, val_loss=1.1 / e, val_acc=1 - 0.6 / e, seconds=0.5)
    for e in range(1, 6)
]


def test_write_report_writes_every_file_and_a_self_contained_page(images, tmp_path):
    pred = predictions(images, P1_WITH_MISTAKES)
    leaked = tmp_path / "images" / "leaked.jpg"
    shutil.copyfile(images[0], leaked)
    checks = check_data({"train": [Sample(images[0], 0)], "val": [Sample(leaked, 0)]}, NAMES)
    run_info = {
        "data": {"source": "photos/", "layout": "class folders"},
        "skipped": [{"path": "bad.jpg", "reason": "<script>alert(1)</script>"}],
        "settings": {"epochs": 5, "lr_max": 0.01},
    }
    cv = {
        "folds": 2,
        "per_fold": [{"accuracy": 0.8}, {"accuracy": 0.9}],
        "mean": {"accuracy": 0.85},
        "std": {"accuracy": 0.05},
        "oof_confusion": [[5, 1], [1, 5]],
    }
    out = tmp_path / "report"

    returned = write_report(out, pred, history=HISTORY, run_info=run_info, checks=checks, cv=cv, threshold=0.4)

    for name in ["curves", "confusion", "roc", "pr", "calibration"]:  # charts: PNG, sharp lines
        with Image.open(out / "plots" / f"{name}.png") as png:
            assert png.format == "PNG"
            png.verify()
    for name in ["samples", "errors"]:  # photos: JPEG
        with Image.open(out / "plots" / f"{name}.jpg") as jpeg:
            assert jpeg.format == "JPEG" and jpeg.width > 400
    page = parse(out / "report.html")
    assert sum(src.startswith("data:image/jpeg;base64,") for src in page.sources) >= 2
    assert page.sources and all(src.startswith("data:image/") or (out / src).is_file() for src in page.sources)
    assert all(link.startswith("#") for link in page.links)  # only in-page anchors
    assert not page.tags & {"script", "link", "iframe"}
    text = " ".join(page.text)
    metrics = compute_metrics(pred, threshold=0.4)
    lo, hi = metrics["accuracy_ci95"]
    assert f"{metrics['accuracy']:.3f} (95% CI {lo:.2f}-{hi:.2f}, n=12)" in text
    for heading in ["Run", "Data checks", "Curves", "Metrics", "Threshold", "Cross-validation", "Images"]:
        assert heading in text
    assert "<script>alert(1)</script>" in text  # shown as text, so it was escaped in the markup
    assert "crosses splits" in text

    written = json.loads((out / "metrics.json").read_text())
    assert written == returned
    assert {k: v for k, v in written.items() if k not in ("cv", "warnings")} == json.loads(json.dumps(metrics))
    assert written["warnings"] == []  # this model beats always answering the majority class
    assert written["cv"] == cv and written["threshold"] == 0.4

    with open(out / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "label", "predicted", "p_not_stop", "p_stop"]
    assert [row["predicted"] for row in rows] == [NAMES[k] for k in (pred.probs[:, 1] >= 0.4).astype(int)]
    assert [float(row["p_stop"]) for row in rows] == P1_WITH_MISTAKES
    assert [row["label"] for row in rows] == [NAMES[k] for k in pred.y_true]


def test_report_without_mistakes_says_so_instead_of_an_empty_plot(images, tmp_path):
    pred = predictions(images, [0.1, 0.9] * 6)
    out = tmp_path / "report"
    metrics = write_report(out, pred)
    assert metrics["accuracy"] == 1.0
    assert not (out / "plots" / "errors.jpg").exists()
    assert not (out / "plots" / "curves.png").exists()  # no history given
    page = parse(out / "report.html")
    assert "No image was misclassified." in " ".join(page.text)
    assert len(page.sources) == 5  # samples, confusion, roc, pr, calibration


def test_a_head_fit_in_one_step_shows_its_choice_of_c_not_a_lone_point(images, tmp_path):
    pred = predictions(images, [0.1, 0.9] * 6)
    row = {"epoch": 1, "lr": None, "train_loss": 0.1, "train_acc": 1.0, "val_loss": 0.2, "val_acc": 1.0, "C": 0.1,
           "C_scores": [[0.01, 0.4], [0.1, 0.2], [1.0, 0.3]]}
    out = tmp_path / "report"
    write_report(out, pred, history=[row])
    assert (out / "plots" / "c_choice.png").stat().st_size > 1000
    assert not (out / "plots" / "curves.png").exists()  # one epoch row: a single point and an empty LR plot
    write_report(tmp_path / "sgd", pred, history=[dict(row, epoch=e, lr=0.01, C_scores=None) for e in (1, 2)])
    assert (tmp_path / "sgd" / "plots" / "curves.png").exists()
    assert not (tmp_path / "sgd" / "plots" / "c_choice.png").exists()


def test_report_with_one_class_explains_the_missing_auc(images, tmp_path):
    pred = Predictions([str(p) for p in images[:4]], [1, 1, 1, 1], [[0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.1, 0.9]], NAMES)
    out = tmp_path / "report"
    write_report(out, pred)
    assert not (out / "plots" / "roc.png").exists()
    assert "only class index 1" in " ".join(parse(out / "report.html").text)


def test_error_grid_shows_mistakes_even_for_unreadable_files(images, tmp_path):
    paths = images[:11] + [tmp_path / "missing.jpg"]
    pred = predictions(paths, P1_WITH_MISTAKES)
    path = plot_samples(pred, tmp_path / "errors.jpg", wrong_only=True)
    with Image.open(path) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.width > 100


def test_thumbnails_are_stored_by_content_and_a_second_report_decodes_nothing(images, tmp_path, monkeypatch):
    import stopsign.reporting.photos as photos

    decoded = []
    real_read_image = photos.read_image
    monkeypatch.setattr(photos, "read_image", lambda path, **kw: decoded.append(Path(path).name) or real_read_image(path, **kw))
    store = tmp_path / "thumbnails"
    first = photos.Thumbnails(store=store)
    assert first.get(images[0], 48).size == (48, 36)
    assert len(list(store.glob("*.jpg"))) == 1 and decoded == ["photo_0.jpg"]

    renamed = tmp_path / "renamed.jpg"
    shutil.copyfile(images[0], renamed)
    again = photos.Thumbnails(store=store).get(renamed, 48)
    assert decoded == ["photo_0.jpg"]  # same bytes under another name: read from the store
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(first.get(images[0], 48), dtype=int)).mean() < 4

    Image.new("RGB", (64, 48), "red").save(renamed)  # edited: misses, decoded, stored beside the old entry
    assert photos.Thumbnails(store=store).get(renamed, 48).getpixel((5, 5))[0] > 240
    assert decoded == ["photo_0.jpg", "renamed.jpg"] and len(list(store.glob("*.jpg"))) == 2

    for entry in store.glob("*.jpg"):
        entry.write_bytes(b"damaged")
    assert photos.Thumbnails(store=store).get(images[0], 48).size == (48, 36)  # decoded again, rewritten
    assert decoded[-1] == "photo_0.jpg"
    stored = next(p for p in store.glob("*.jpg") if p.stat().st_size > 100)
    with Image.open(stored) as entry:
        assert entry.format == "JPEG"
    data = stored.read_bytes()  # what a crash can leave of an unsynced write: the right length, a zero tail
    stored.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    count = len(decoded)
    photos.Thumbnails(store=store).get(images[0], 48)
    assert len(decoded) == count + 1 and stored.read_bytes() == data

    not_a_folder = tmp_path / "store-is-a-file"  # an unusable store costs speed, never the thumbnail
    not_a_folder.write_text("")
    assert photos.Thumbnails(store=not_a_folder).get(images[1], 48).size == (48, 36)

    monkeypatch.setenv("STOPSIGN_CACHE", str(tmp_path / "cache"))
    write_report(tmp_path / "one", predictions(images, P1_WITH_MISTAKES))
    count = len(decoded)
    write_report(tmp_path / "two", predictions(images, P1_WITH_MISTAKES))
    assert len(decoded) == count  # the whole second report: every photo from the store
    assert (tmp_path / "one" / "plots" / "samples.jpg").read_bytes() == (tmp_path / "two" / "plots" / "samples.jpg").read_bytes()


def test_one_mistake_gets_its_whole_heading(images, tmp_path):
    pred = predictions(images, [0.1, 0.9] * 5 + [0.1, 0.2])  # only the last image is wrong
    with Image.open(plot_samples(pred, tmp_path / "errors.jpg", wrong_only=True)) as grid:
        heading_width = ImageFont.load_default(size=16).getlength("1 misclassified, most confident first")
        assert grid.width >= heading_width + 16 > 192 + 16  # wider than its one photo


def test_long_class_names_are_shortened_in_the_middle_and_stay_distinct():
    shown = axis_names(["stop sign at a distance, seen from the left", "stop sign at a distance, seen from the right",
                        "x"])
    assert shown == ["stop sign at …from the left", "stop sign at …rom the right", "x"]
    colliding = axis_names(["stop sign seen from the left at a distance", "stop sign seen from the right at a distance"])
    assert colliding == ["0: stop sign see…at a distance", "1: stop sign see…at a distance"]


class Tables(HTMLParser):
    """Every <table> of a page as rows of (tag, text) cells; a nested table's text stays with its own table."""

    def __init__(self):
        super().__init__()
        self.tables, self.open = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.open.append([])
            self.tables.append(self.open[-1])
        elif tag == "tr" and self.open:
            self.open[-1].append([])
        elif tag in ("td", "th") and self.open:
            self.open[-1][-1].append([tag, ""])

    def handle_endtag(self, tag):
        if tag == "table" and self.open:
            self.open.pop()

    def handle_data(self, data):
        if self.open and self.open[-1] and self.open[-1][-1]:
            self.open[-1][-1][-1][1] += data


def tables(path: Path) -> list[list[list[list[str]]]]:
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tables


def table_headed(all_tables, first: str):
    return next(t for t in all_tables if t and t[0] and t[0][0][1] == first)


def test_the_headline_and_metrics_come_before_run_info_checks_and_images(images, tmp_path):
    pred = predictions(images, P1_WITH_MISTAKES)
    leaked = tmp_path / "images" / "leaked.jpg"
    shutil.copyfile(images[0], leaked)
    checks = check_data({"train": [Sample(images[0], 0)], "val": [Sample(leaked, 0)]}, NAMES)
    out = tmp_path / "report"
    metrics = write_report(out, pred, history=HISTORY, run_info={"settings": {"epochs": 5}}, checks=checks)
    page = (out / "report.html").read_text(encoding="utf-8")
    heading = {name: page.index(f"<h2>{name}</h2>") for name in ["Metrics", "Run", "Data checks", "Curves", "Images"]}
    assert heading["Metrics"] < min(heading["Run"], heading["Data checks"], heading["Curves"], heading["Images"])
    nav = page[page.index("<nav>"):page.index("</nav>")]
    assert nav.index("#metrics") < min(nav.index("#run"), nav.index("#checks"), nav.index("#images"))
    lead = page[page.index("</h1>"):page.index("<nav>")]  # the line under the title: accuracy, n, recall per class
    lo, hi = metrics["accuracy_ci95"]
    assert lead.startswith(f"</h1><p>Accuracy {metrics['accuracy']:.3f} (95% CI {lo:.2f}-{hi:.2f}, n=12); "
                           f"always {metrics['baseline']['majority_class']}: {metrics['baseline']['accuracy']:.3f}")
    for name in NAMES:
        assert f"{name} {metrics['per_class'][name]['recall']:.2f}" in lead
    metrics_html = page[heading["Metrics"]:page.index("</section>", heading["Metrics"])]
    assert 'href="#checks"' in metrics_html  # moved down, the checks' warnings are still pointed to up front
    per_class = page.index("<th>precision</th>", heading["Metrics"])
    assert per_class < page.index("<h3>Confusion", heading["Metrics"])  # per-class table first in the section


def test_precision_of_a_class_never_predicted_and_recall_of_one_without_support_are_na(images, tmp_path):
    names = ["a", "b", "c", "d", "e"]
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 3, 1, 1, 0, 1]  # c is never predicted; d has no image but is predicted once; e neither
    probs = np.full((6, 5), 0.075)
    probs[np.arange(6), y_pred] = 0.7
    pred = Predictions([str(p) for p in images[:6]], y_true, probs, names)
    out = tmp_path / "report"
    metrics = write_report(out, pred)
    assert metrics["per_class"]["c"]["precision"] == 0.0  # metrics.json keeps numbers; only the page says n/a
    rows = {row[0][1]: [text for _, text in row[1:]] for row in table_headed(tables(out / "report.html"), "class")[1:]}
    assert rows["a"] == ["0.500", "0.500", "0.500", "2"]
    assert rows["c"] == ["n/a", "0.000", "0.000", "2"]  # F1 is defined: 2 images, none found
    assert rows["d"] == ["0.000", "n/a", "0.000", "0"]
    assert rows["e"] == ["n/a", "n/a", "n/a", "0"]  # 2TP / (2TP + FP + FN) = 0/0


def test_the_confusion_table_names_the_classes_on_its_rows_and_columns(images, tmp_path):
    names = ["not stop", "stop <sign>"]
    pred = predictions(images, P1_WITH_MISTAKES)
    pred.class_names = names
    out = tmp_path / "report"
    metrics = write_report(out, pred, cv={"folds": 2, "per_fold": [{"accuracy": 0.8}, {"accuracy": 0.9}],
                                          "mean": {"accuracy": 0.85}, "std": {"accuracy": 0.05},
                                          "oof_confusion": [[5, 1], [2, 4]]})
    confusions = [t for t in tables(out / "report.html") if t and t[0] and t[0][0][1] == "truth \\ predicted"]
    assert len(confusions) == 2  # the report's and the out-of-fold one
    for table, matrix in zip(confusions, [metrics["confusion"], [[5, 1], [2, 4]]]):
        assert table[0] == [["th", "truth \\ predicted"]] + [["th", name] for name in names]
        assert [row[0] for row in table[1:]] == [["th", name] for name in names]  # row headers, not data cells
        assert [[int(text) for _, text in row[1:]] for row in table[1:]] == matrix


def test_the_report_says_which_images_the_model_was_trained_on_and_scores_the_others(tmp_path):
    from stopsign.reporting.metrics import Predictions
    from stopsign.reporting.report import write_report

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    pred = Predictions([f"/x/{i}.png" for i in range(6)], [0, 0, 1, 1, 1, 0], probs, ["not_stop", "stop"],
                       copies=["exact", "near", None, None, None, None])
    metrics = write_report(tmp_path, pred, history=[{"epoch": e, "lr": 0.01, "train_loss": 1.0, "train_acc": 0.5,
                                                       "val_loss": 1.0, "val_acc": 0.5, "seconds": 0.1}
                                                      for e in (1, 2, 3)])
    copies = metrics["training_copies"]
    assert (copies["exact"], copies["near"], copies["new"]) == (1, 1, 4)
    assert copies["new_images"]["accuracy"] == 0.75 and copies["new_images"]["recall"] == {"not_stop": 1.0, "stop": 2 / 3}
    page = (tmp_path / "report.html").read_text()
    assert "2 of these 6 images are training images of this model (1 exact copies, 1 near copies" in page
    assert "On the 4 new images: accuracy 0.750 (95% CI" in page
    assert "The best of 3 epochs on the same 6 validation images: this figure is optimistic" in page
    assert json.loads((tmp_path / "metrics.json").read_text())["training_copies"]["new"] == 4


def test_the_run_settings_list_only_what_the_head_reads(images):
    from stopsign.config import SGD_SETTINGS, Settings
    from stopsign.reporting.html import render_report

    metrics = compute_metrics(predictions(images, P1_WITH_MISTAKES))

    def run_section(config: Settings) -> str:
        page = render_report("t", metrics, images={}, run_info={"settings": config.to_dict()})
        return page[page.index('<section id="run">'):]

    logistic, sgd = run_section(Settings()), run_section(Settings.seed_recipe())
    for name in SGD_SETTINGS:  # epochs, learning rates, momentum ...: the logistic head reads none of them
        assert f"<th>{name}</th>" not in logistic and f"<th>{name}</th>" in sgd, name
    for name in ("head", "pooling", "class_weight", "views", "seed"):
        assert f"<th>{name}</th>" in logistic, name


def test_the_threshold_table_marks_the_decision_rule_beside_the_best_f1_row(images):
    from stopsign.reporting.html import render_report

    def threshold_rows(threshold):
        metrics = compute_metrics(predictions(images, P1_WITH_MISTAKES), threshold=threshold)
        page = render_report("t", metrics, images={})
        section = page[page.index('<section id="threshold">'):page.index("</section>", page.index('id="threshold"'))]
        rows = {}
        for row in section.split("<tr")[2:]:  # after the header row
            marks = row.split('class="')[1].split('"')[0].split() if row.startswith(' class="') else []
            cells = [float(cell.split("<")[0]) for cell in row.split('<td class="num">')[1:]]
            rows[cells[0]] = (marks, cells[1:3])
        return metrics, section, rows

    metrics, section, rows = threshold_rows(0.4)
    # p(stop) >= 0.4 predicts what the lowest score at or above it (0.45) predicts: that row is the rule's, and its
    # precision and recall are the Metrics section's
    assert [t for t, (marks, _) in rows.items() if "rule" in marks] == [0.45]
    stop = metrics["per_class"]["stop"]
    assert rows[0.45][1] == [round(stop["precision"], 3), round(stop["recall"], 3)]
    assert [t for t, (marks, _) in rows.items() if "best" in marks] == [round(metrics["best_f1_threshold"]["threshold"], 3)]
    assert "The decision rule (" in section and "uses 0.400" in section

    _, section, rows = threshold_rows(None)  # a model without a threshold: argmax, no rule row in the table
    assert not any("rule" in marks for marks, _ in rows.values()) and "The decision rule" not in section


def test_thresholds_of_a_confident_head_are_shown_apart_and_each_as_shown_predicts_its_row(images):
    from stopsign.reporting.html import render_report

    # two stop photos at 0.999961 and 0.999932: at 3 decimals both read 1.000, though each is its own row
    p1 = np.array([0.1, 0.999961, 0.2, 0.999932, 0.3, 0.8, 0.05, 0.6, 0.4, 0.7, 0.15, 0.9])
    metrics = compute_metrics(predictions(images, p1), threshold=0.5)
    page = render_report("t", metrics, images={})
    section = page[page.index('<section id="threshold">'):page.index("</section>", page.index('id="threshold"'))]
    shown = [row.split('<td class="num">')[1].split("<")[0] for row in section.split("<tr")[2:]]
    points = [p["threshold"] for p in metrics["thresholds"]]
    assert len(set(shown)) == len(shown) == len(points)
    assert shown[:3] == ["0.99996", "0.999", "0.900"]  # rounded down, to the fewest decimals above the next row
    for text, threshold in zip(shown, points):  # copied into --threshold, each predicts what its row does
        assert np.array_equal(p1 >= float(text), p1 >= threshold), text
    best = metrics["best_f1_threshold"]["threshold"]
    assert f"at threshold {shown[points.index(best)]} (" in section
