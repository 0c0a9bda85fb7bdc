"""The model card: README.md in every run folder, with the run's own counts, figures beside their baselines,
threshold, limits and a command that trains it again."""

import json
import shlex

import pytest
from conftest import train_tiny

from stopsign.arguments import TRAIN_FIELDS, build_parser
from stopsign.cli import asked_settings
from stopsign.config import LISTED, Settings


@pytest.fixture
def data(tmp_path, make_images):
    """Imbalanced (28 to 8, 7 to 2 in validation): balanced accuracy leads."""
    return make_images(tmp_path / "data", {"stop": 8, "not_stop": 28}, layout="cvstudio")


def read(run_dir, name):
    return json.loads((run_dir / name).read_text())


def test_a_run_folder_has_a_card_with_its_counts_baseline_and_threshold(tmp_path, data, tiny_backbone):
    run_dir = train_tiny(tmp_path, data).run_dir
    card = (run_dir / "README.md").read_text()
    counts, metrics, summary = read(run_dir, "data.json")["counts"], read(run_dir, "metrics.json"), \
        read(run_dir, "summary.json")
    assert card.startswith("---\nlibrary_name: stopsign\n")
    for name in ("stop", "not_stop"):
        train, val = counts["train"][name], counts["val"][name]
        assert f"| {name} | {train} | {val} | {train + val} |" in card
    assert "36 labelled images" in card

    baseline = metrics["baseline"]
    assert metrics["verdict"]["lead"] == "balanced_accuracy"  # 7:2 in validation
    figures = [line for line in card.splitlines() if line.startswith(("| accuracy |", "| balanced accuracy |"))]
    assert figures[0].startswith(f"| balanced accuracy | {metrics['balanced_accuracy']:.3f} |")
    low, high = metrics["accuracy_ci95"]
    assert figures[1] == (f"| accuracy | {metrics['accuracy']:.3f} | {low:.2f}–{high:.2f} | "
                          f"{baseline['accuracy']:.3f} | always not_stop |")
    assert f"against the prior's {baseline['log_loss']:.4f}" in card

    threshold = summary["threshold"]["value"]
    assert f"p(stop) ≥ **{threshold:.3f}**" in card
    assert "3.5:1 between the largest and the smallest class" in card
    assert "**Small signs.** The whole photo is shrunk to 32×32 pixels and averaged" in card  # the seed's pooling


def test_the_card_s_command_trains_with_the_run_s_settings(tmp_path, data, tiny_backbone):
    run_dir = train_tiny(tmp_path, data, epochs=2, augment=False, lr_max=0.05).run_dir
    card = (run_dir / "README.md").read_text()
    command = card.split("## How to reproduce\n\n```\n")[1].split("\n```")[0]
    words = shlex.split(command)
    assert words[:3] == ["stopsign", "train", str(data)]
    args = build_parser().parse_args(words[1:])
    recorded = read(run_dir, "config.json")
    assert Settings().replace(**asked_settings(args, TRAIN_FIELDS)).to_dict() == {name: recorded[name]
                                                                                 for name in LISTED}
