"""charts: every plot_* function writes a real, non-blank PNG; axis_names and scored_classes pick the right names and classes."""

import numpy as np
import pytest
from PIL import Image

from stopsign.reporting.charts import (
    LONGEST_NAME,
    axis_names,
    plot_calibration,
    plot_confusion,
    plot_curves,
    plot_pr,
    plot_roc,
    scored_classes,
)
from stopsign.reporting.metrics import Predictions, compute_metrics

NAMES = ["not_stop", "stop"]
HISTORY = [
    dict(epoch=e, lr=0.01 / e, train_loss=1 / e, train_acc=1 - 0.5 / e, val_loss=1.2 / e, val_acc=1 - 0.6 / e, seconds=0.4)
    for e in range(1, 5)
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STOPSIGN_CACHE", str(tmp_path / "cache"))


def two_class_predictions() -> Predictions:
    y = np.array([0, 1] * 6)
    p1 = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.35, 0.3, 0.95, 0.05, 0.6, 0.45, 0.55])
    return Predictions([f"photo_{i}.jpg" for i in range(12)], y, np.c_[1 - p1, p1], NAMES)


def assert_real_png(path, returned):
    """A PNG PIL opens, larger than 100 x 100 pixels, holding more than one colour."""
    assert returned == path and path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.width > 100 and png.height > 100
        pixels = np.asarray(png.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 10  # lines, text and fills, not a blank canvas
    assert (pixels.min(axis=2) < 128).mean() > 0.002  # something dark was drawn (axes, ticks, labels)
    return pixels


def test_plot_curves_writes_a_wide_png(tmp_path):
    path = tmp_path / "plots" / "curves.png"
    pixels = assert_real_png(path, plot_curves(HISTORY, path))
    assert pixels.shape[1] > 2 * pixels.shape[0]  # three panels side by side


def test_plot_curves_copes_with_missing_validation(tmp_path):
    history = [row | {"val_loss": None, "val_acc": None} for row in HISTORY]
    path = tmp_path / "curves.png"
    assert_real_png(path, plot_curves(history, path))


def test_plot_confusion_writes_a_png(tmp_path):
    path = tmp_path / "confusion.png"
    pixels = assert_real_png(path, plot_confusion(two_class_predictions(), path))
    blue = (pixels[..., 2].astype(int) - pixels[..., 0] > 60).mean()
    assert blue > 0.02  # the "Blues" colour map fills the cells


def test_plot_confusion_with_long_names(tmp_path):
    pred = two_class_predictions()
    pred.class_names = ["a very long class name for the stop sign photos", "another very long class name here"]
    path = tmp_path / "confusion.png"
    assert_real_png(path, plot_confusion(pred, path))


def test_plot_roc_and_pr_write_pngs(tmp_path):
    pred = two_class_predictions()
    for name, plot in (("roc", plot_roc), ("pr", plot_pr)):
        path = tmp_path / f"{name}.png"
        assert_real_png(path, plot(pred, path))


def test_plot_roc_and_pr_with_three_classes(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=15)
    pred = Predictions([f"p{i}" for i in range(15)], [0, 1, 2] * 5, probs, ["a", "b", "c"])
    for name, plot in (("roc", plot_roc), ("pr", plot_pr)):
        path = tmp_path / f"{name}.png"
        assert_real_png(path, plot(pred, path))


def test_plot_calibration_writes_a_png(tmp_path):
    metrics = compute_metrics(two_class_predictions())
    path = tmp_path / "calibration.png"
    pixels = assert_real_png(path, plot_calibration(metrics, path))
    assert pixels.shape[0] > pixels.shape[1]  # taller than wide: reliability above, counts below


def test_axis_names_keep_short_names_and_shorten_long_ones_distinctly():
    assert axis_names(NAMES) == NAMES
    long = ["stop sign far away on the road, seen from the left", "stop sign far away on the road, seen from the right"]
    shown = axis_names(long + ["x"])
    assert len(shown) == 3 and len(set(shown)) == 3
    assert all(len(name) <= LONGEST_NAME for name in shown)
    assert all(name.startswith("stop sign far") and "…" in name for name in shown[:2])  # start and end kept
    assert shown[0].endswith("om the left") and shown[1].endswith("m the right")
    assert shown[2] == "x"  # short names are left alone, not numbered


def test_axis_names_number_names_that_collide_after_shortening():
    long = ["x" * 20 + " left " + "y" * 20, "x" * 20 + " right " + "y" * 20]  # same start, same end
    shown = axis_names(long)
    assert len(set(shown)) == 2
    assert shown[0].startswith("0: ") and shown[1].startswith("1: ")
    assert shown[0][3:] == shown[1][3:]  # the shortened names alone are equal: only the index tells them apart


def test_scored_classes_two_classes():
    assert scored_classes(two_class_predictions()) == [1]  # only the positive class gets a curve
    only_negatives = Predictions(["a", "b"], [0, 0], [[0.8, 0.2], [0.4, 0.6]], NAMES)
    only_positives = Predictions(["a", "b"], [1, 1], [[0.8, 0.2], [0.4, 0.6]], NAMES)
    assert scored_classes(only_negatives) == []
    assert scored_classes(only_positives) == []


def test_scored_classes_skip_a_class_absent_from_y_true():
    probs = np.full((6, 3), 1 / 3)
    absent_middle = Predictions([f"p{i}" for i in range(6)], [0, 2, 0, 2, 0, 2], probs, ["a", "b", "c"])
    assert list(scored_classes(absent_middle)) == [0, 2]
    every = Predictions([f"p{i}" for i in range(6)], [0, 1, 2, 0, 1, 2], probs, ["a", "b", "c"])
    assert list(scored_classes(every)) == [0, 1, 2]
    one = Predictions([f"p{i}" for i in range(6)], [1] * 6, probs, ["a", "b", "c"])
    assert list(scored_classes(one)) == []  # class 1 has no negatives, the others no positives


def test_roc_and_pr_mark_the_decision_rule_where_its_predictions_sit(tmp_path, monkeypatch):
    from stopsign.reporting import charts

    figures = []
    monkeypatch.setattr(charts, "save_figure", lambda figure, path: figures.append(figure) or path)
    pred = two_class_predictions().with_threshold(0.4)  # stop when p >= 0.4: 5 of 6 stop photos, 2 of 6 others
    plot_roc(pred, tmp_path / "roc.png")
    plot_pr(pred, tmp_path / "pr.png")
    for figure, expected in zip(figures, [(2 / 6, 5 / 6), (5 / 6, 5 / 7)]):  # (fpr, recall), (recall, precision)
        axis = figure.axes[0]
        [marker] = [line for line in axis.lines if line.get_marker() == "o"]
        assert marker.get_label() == "decision rule (p ≥ 0.400)"
        assert np.allclose(np.ravel(marker.get_data()), expected)
        assert "decision rule (p ≥ 0.400)" in [text.get_text() for text in axis.get_legend().get_texts()]
