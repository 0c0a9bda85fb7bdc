"""The learning curve (`train --learning-curve`, training/curve.py): how many more photos the model needs."""

import json

import numpy as np
import pytest
from markupsafe import escape

from stopsign.data.datasets import Sample
from stopsign.training import curve


def test_the_power_law_recovers_a_known_curve():
    sizes = np.array([10.0, 20, 40, 80, 160])
    law = curve.power_law(sizes, 0.5 * sizes ** -0.7 + 0.05)
    assert law == pytest.approx({"a": 0.5, "b": 0.7, "c": 0.05}, abs=1e-3)


def test_shares_are_nested_keep_duplicate_groups_whole_and_both_classes():
    samples = [Sample(f"{label}{i}.jpg", label) for label in (0, 1) for i in range(30)]
    groups = {"00.jpg": 7, "01.jpg": 7, "02.jpg": 7, "15.jpg": 8, "115.jpg": 8}  # one group per class at least
    shares = curve.nested_shares(samples, groups, seed=3)
    assert [len(s) >= 4 for s in shares] and len(shares) == len(curve.SHARES)
    for smaller, larger in zip(shares, shares[1:]):
        assert set(map(str, smaller)) <= set(map(str, larger)) and len(smaller) < len(larger)
    for share in shares:
        labels = np.bincount([s.label for s in share], minlength=2)
        assert labels.min() >= 2 and abs(labels[0] - labels[1]) <= 3  # each class subsampled alike
        paths = {s.path for s in share}
        assert len(paths & {"00.jpg", "01.jpg", "02.jpg"}) in (0, 3)  # a duplicate group is never split
    assert len(shares[-1]) == len(samples)


def test_the_reading_says_whether_more_photos_should_help():
    flat = [{"images_per_class": 10, "score": 0.90}, {"images_per_class": 50, "score": 0.91}]
    rising = [{"images_per_class": 10, "score": 0.70}, {"images_per_class": 50, "score": 0.85}]
    assert "flat" in curve.reading(flat, []) and "0.910 with 50" in curve.reading(flat, [])
    assert "still rising" in curve.reading(rising, [{"images_per_class": 100, "score": 0.9}])
    assert "estimate: 0.900 with 100" in curve.reading(rising, [{"images_per_class": 100, "score": 0.9}])


def test_a_run_with_a_learning_curve_reports_it(tmp_path, make_images, tiny_backbone):
    from stopsign import train

    data = make_images(tmp_path / "data", {"stop": 14, "not_stop": 14}, layout="folders", size=(40, 40))
    result = train(data, backbone=tiny_backbone, head="logistic", pooling="regions", tiles=2, num_workers=0,
                   out=str(tmp_path / "runs"), progress=False, learning_curve=True)
    found = json.loads((result.run_dir / "metrics.json").read_text())["learning_curve"]
    sizes = [p["images_per_class"] for p in found["points"]]
    assert len(sizes) == len(curve.SHARES) and sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert all(0 <= p["low"] <= p["score"] <= p["high"] <= 1 for p in found["points"])
    assert (result.run_dir / "plots" / "learning_curve.png").stat().st_size > 1000
    page = (result.run_dir / "report.html").read_text()
    assert "Learning curve (an estimate)" in page and str(escape(found["reading"])) in page
    plain = train(data, backbone=tiny_backbone, head="logistic", num_workers=0, out=str(tmp_path / "runs"),
                  progress=False)
    assert "learning_curve" not in json.loads((plain.run_dir / "metrics.json").read_text())  # opt-in: it costs fits


def test_the_cli_flag_prints_the_curve(tmp_path, make_images, tiny_backbone, capsys):
    from stopsign.cli import main

    data = make_images(tmp_path / "data", {"stop": 12, "not_stop": 12}, layout="folders", size=(40, 40))
    assert main(["train", str(data), "--backbone", "tiny", "--workers", "0", "--out", str(tmp_path / "runs"),
                 "--learning-curve"]) == 0
    assert "learning curve: balanced accuracy" in capsys.readouterr().err
