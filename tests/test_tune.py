"""tune(): seeded and resumable studies, objectives that see only their folds, shared studies, the output folder."""

import csv
import importlib
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import stopsign.training.tune as tune_module
from stopsign.config import Settings
from stopsign.config import SGD_SETTINGS, relevant_settings
from stopsign.model.backbones import BACKBONES
from stopsign.cli import main
from stopsign.data.datasets import kfold_samples, load_data
from stopsign.errors import DataError, StopsignError
from stopsign.model.features import FeatureExtractor
from stopsign.training import crossval
from stopsign.training.sources import CachedFeatures
from stopsign.training.tune import SEARCH_SPACE, recipe_name, tune

TESTS = Path(__file__).resolve().parent
SETTINGS = dict(folds=3, backbone="tiny", num_workers=0, progress=False, final=False)


@pytest.fixture
def data(tmp_path, make_images):
    return make_images(tmp_path / "data", {"stop": 9, "not_stop": 9}, layout="cvstudio")


def read_trials(run_dir: Path) -> list[dict]:
    with open(run_dir / "trials.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_same_seed_same_trials_other_seed_other_trials(tmp_path, data, tiny_backbone):
    first = tune(data, trials=3, out=str(tmp_path / "runs"), **SETTINGS)
    second = tune(data, trials=3, out=str(tmp_path / "runs"), **SETTINGS)
    other = tune(data, trials=3, out=str(tmp_path / "runs"), seed=1, **SETTINGS)
    assert first.run_dir != second.run_dir
    assert read_trials(first.run_dir) == read_trials(second.run_dir)
    assert len(read_trials(first.run_dir)) == 3
    params = lambda result: [{k: row[k] for k in SEARCH_SPACE} for row in read_trials(result.run_dir)]
    assert params(first) != params(other)
    assert first.best_params == second.best_params and first.best_value == second.best_value


def test_resume_adds_trials_and_draws_what_an_uninterrupted_study_would(tmp_path, data, tiny_backbone):
    whole = tune(data, trials=4, out=str(tmp_path / "runs"), **SETTINGS)
    started = tune(data, trials=2, out=str(tmp_path / "runs"), **SETTINGS)
    before = read_trials(started.run_dir)
    resumed = tune(data, trials=2, resume=started.run_dir, progress=False, final=False)
    assert resumed.run_dir == started.run_dir
    after = read_trials(started.run_dir)
    assert len(before) == 2 and len(after) == 4 and after[:2] == before
    assert after == read_trials(whole.run_dir)


def test_resume_refuses_other_data(tmp_path, data, make_images, tiny_backbone):
    started = tune(data, trials=1, out=str(tmp_path / "runs"), **SETTINGS)
    other = make_images(tmp_path / "other", {"stop": 9, "not_stop": 10}, layout="cvstudio")
    with pytest.raises(DataError, match="other images or labels"):
        tune(other, trials=1, resume=started.run_dir, progress=False, final=False)


def test_objective_sees_only_its_folds(tmp_path, data, tiny_backbone, monkeypatch):
    calls = []
    crossval = importlib.import_module("stopsign.training.crossval")  # the one K-fold loop, which tune calls
    real_fit = crossval.fit

    def spy(source, num_features, num_classes, train_samples, val_samples, model, recipe, **kwargs):
        calls.append((set(train_samples), set(val_samples), kwargs.get("keep")))
        return real_fit(source, num_features, num_classes, train_samples, val_samples, model, recipe, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    trials, folds = 3, 3
    tune(data, trials=trials, out=str(tmp_path / "runs"), **SETTINGS)
    samples = load_data(data).samples
    fold_vals = [set(val) for _, val in kfold_samples(samples, folds, seed=0)]
    assert len(calls) == folds * (trials + 1)  # every trial and the seed recipe: K fits each, nothing else
    for index, (train, val, keep) in enumerate(calls):
        assert keep == "last"  # no epoch chosen on the held-out fold
        assert not train & val
        assert val == fold_vals[index % folds]  # a fold's validation set, never another split
        assert train | val == set(samples)


def test_narrowed_features_are_those_of_fewer_views(tmp_path, data, tiny_backbone):
    samples = load_data(data).samples
    extractor = FeatureExtractor("tiny", cache_dir=tmp_path / "cache", num_workers=0)
    model, recipe, _ = Settings().replace(backbone="tiny", views=2, batch_size=5)
    many = CachedFeatures(extractor, samples, samples, model, recipe.replace(views=6))
    narrowed, fresh = many.for_config(model, recipe), CachedFeatures(extractor, samples, samples, model, recipe)
    assert narrowed.train_features.shape[1] == 2 and narrowed.batch_size == 5
    np.testing.assert_array_equal(narrowed.train_features, fresh.train_features)
    rng = lambda: np.random.default_rng(3)
    for (a, y), (b, z) in zip(narrowed.train_batches(samples, 0, rng()), fresh.train_batches(samples, 0, rng())):
        assert a.equal(b) and y.equal(z)
    with pytest.raises(ValueError, match="views"):
        many.for_config(model, recipe.replace(views=7))
    with pytest.raises(ValueError, match="seed"):
        many.for_config(model, recipe.replace(seed=1))


LAUNCHER = '''import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import register_tiny
from stopsign.cli import main

register_tiny(Path({weights!r}))
sys.exit(main(sys.argv[1:]))
'''


def test_two_processes_share_one_study(tmp_path, data, tiny_backbone):
    study = tune(data, trials=0, out=str(tmp_path / "runs"), name="shared", **SETTINGS)
    assert read_trials(study.run_dir) == []
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(TESTS), weights=str(BACKBONES["tiny"].weights_file(None))))
    command = [sys.executable, str(launcher), "-q", "tune", str(data), "--resume", str(study.run_dir),
               "--trials", "3", "--no-final"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ)) for _ in range(2)]
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        assert "cross-validated accuracy" in out.splitlines()[-1]
    trials = read_trials(study.run_dir)
    assert sorted(int(t["number"]) for t in trials) == list(range(6))
    assert {t["state"] for t in trials} <= {"complete", "pruned"}
    draws = {tuple(t[k] for k in SEARCH_SPACE) for t in trials}
    assert len(draws) == 6  # the processes did not repeat each other's draws
    loaded = optuna.load_study(study_name="tune", storage=f"sqlite:///{study.run_dir / 'study.db'}")
    assert len(loaded.trials) == 6


def test_cli_writes_the_tune_folder_and_final_model(tmp_path, data, tiny_backbone, capsys):
    code = main(["-q", "tune", str(data), "--trials", "3", "--folds", "3", "--backbone", "tiny", "--workers", "0",
                 "--out", str(tmp_path / "runs"), "--name", "study"])
    assert code == 0
    run_dir = tmp_path / "runs" / "study"
    printed = capsys.readouterr()
    last = printed.out.strip().splitlines()[-1]
    assert "3-fold cross-validated accuracy" in last and str(run_dir) in last
    assert "(defaults " in last and "; always not_stop 0.500)" in last  # what it was compared with, by name
    assert "trials:" not in printed.err and "folds:" not in printed.err  # -q: no bars

    with open(run_dir / "trials.csv") as handle:
        columns = next(csv.reader(handle))
    assert columns[:7] == ["number", "state", "value", "accuracy", "accuracy_std", "log_loss", "seconds"]
    assert set(SEARCH_SPACE) <= set(columns)
    assert {"fold1_accuracy", "fold3_accuracy", "fold3_log_loss"} <= set(columns)

    best = json.loads((run_dir / "best.json").read_text())
    assert {"trial", "value", "objective", "folds", "accuracy", "balanced_accuracy", "accuracy_std", "log_loss",
            "fold_accuracy", "params", "starting_recipe", "baseline", "verdict", "trials", "final_run"} <= set(best)
    # the settings its head reads: the SGD head's only for it
    assert set(best["params"]) == set(relevant_settings(dict.fromkeys(SEARCH_SPACE) | {"head": best["params"]["head"]}))
    assert best["folds"] == 3 and best["trials"]["complete"] >= 1
    assert best["value"] == pytest.approx(best["accuracy"] - 1e-3 * best["log_loss"])
    # the recipe compared with is named by the settings it records: the defaults' logistic head, not the seed's
    start = best["starting_recipe"]
    assert start["name"] == "defaults" and "seed_recipe" not in best
    assert (start["params"]["head"], start["params"]["pooling"]) == ("logistic", "regions")
    assert best["baseline"] == {"majority_class": "not_stop", "accuracy": 0.5, "balanced_accuracy": 0.5,
                                "log_loss": pytest.approx(np.log(2)), "imbalance": 1.0}
    assert best["verdict"]["beats_baseline"] == (best["verdict"]["message"] is None)

    trials = read_trials(run_dir)
    read_by_two = [name for name in SEARCH_SPACE  # a slice of a setting no two completed trials read shows nothing
                   if sum(t["state"] == "complete" and (t["head"] == "sgd" or name not in SGD_SETTINGS)
                          for t in trials) >= 2]
    drawn = {p.name for p in (run_dir / "plots").iterdir()}
    assert {"history.png"} | {f"slice_{name}.png" for name in read_by_two} == drawn - {"importances.png"}
    page = (run_dir / "report.html").read_text()
    assert "Best settings" in page and "seed recipe" not in page
    assert "<td>defaults</td>" in page and "always not_stop" in page
    assert page.count("data:image/png") == len(drawn)

    final = Path(best["final_run"])
    assert final == run_dir / "final" and (final / "best.pt").is_file()
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["cv"]["mean"]["accuracy"] == pytest.approx(best["accuracy"])  # the same folds, the same recipe
    config = json.loads((final / "config.json").read_text())
    assert {k: config[k] for k in best["params"]} == best["params"]
    sgd = best["params"]["head"] == "sgd"  # the final run's summary and settings: only what its head reads
    parameters = json.loads((final / "summary.json").read_text())["parameters"]
    assert ("learningRate" in parameters) == sgd and ("C" in parameters) == (not sgd)
    assert ("<th>lr_max</th>" in (final / "report.html").read_text()) == sgd


def made_up_trials(count: int) -> tuple[list[dict], dict]:
    """trials.csv rows and best.json of a study of `count` complete trials, numbers with many digits."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    rng = np.random.default_rng(0)
    rows = []
    for number in range(count):
        params = {}
        for name, space in SEARCH_SPACE.items():
            if isinstance(space, CategoricalDistribution):
                params[name] = space.choices[number % len(space.choices)]
            elif isinstance(space, IntDistribution):
                params[name] = space.low + number
            elif space.log:
                params[name] = float(np.exp(rng.uniform(np.log(space.low), np.log(space.high))))
            else:
                params[name] = float(rng.uniform(space.low, space.high))
        accuracy = 0.8123456789 + 0.0123456789 * number
        folds = [accuracy - 0.0123456, accuracy, accuracy + 0.0123456]
        rows.append({"number": number, "state": "complete", "value": accuracy - 4.56789e-4, "accuracy": accuracy,
                     "accuracy_std": 0.0100799, "log_loss": 0.456789123, "seconds": 123.456789, **params}
                    | {f"fold{k + 1}_accuracy": v for k, v in enumerate(folds)}
                    | {f"fold{k + 1}_log_loss": 0.456789123 for k in range(3)})
    top = rows[-1]
    start = {"name": "defaults", "accuracy": 0.7654321, "balanced_accuracy": 0.76, "accuracy_std": 0.0234567,
             "log_loss": 0.5678912, "fold_accuracy": [0.75, 0.76, 0.78],
             "params": {name: top[name] for name in SEARCH_SPACE}}
    best = {"trial": top["number"], "value": top["value"], "objective": "accuracy - 1e-3 log-loss", "folds": 3,
            "accuracy": top["accuracy"], "balanced_accuracy": top["accuracy"], "accuracy_std": top["accuracy_std"],
            "log_loss": top["log_loss"], "fold_accuracy": [top[f"fold{k + 1}_accuracy"] for k in range(3)],
            "fold_log_loss": [0.45] * 3, "params": {name: top[name] for name in SEARCH_SPACE},
            "baseline": {"majority_class": "stop", "accuracy": 0.6, "balanced_accuracy": 0.5, "log_loss": 0.673,
                         "imbalance": 1.5},
            "verdict": {"lead": "accuracy", "beats_baseline": True, "message": None}, "starting_recipe": start,
            "trials": {"complete": count}, "final_run": None}
    return rows, best


def significant_digits(text: str) -> int:
    return len(text.lstrip("-").split("e")[0].replace(".", "").lstrip("0"))


def without_plots(monkeypatch) -> list[str]:
    """The page, not the plots (tested below): 11 figures cost seconds. The names of the plots it would draw."""
    import stopsign.reporting.tune_report as tune_report

    drawn = []

    def no_plot(*args):
        path = Path(next(a for a in args if isinstance(a, Path)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG")
        drawn.append(path.stem)
        return path

    for name in ("plot_history", "plot_importances", "plot_slice"):
        monkeypatch.setattr(tune_report, name, no_plot)
    return drawn


def test_the_trial_table_scrolls_in_its_own_box_and_its_numbers_are_short(tmp_path, monkeypatch):
    import stopsign.reporting.tune_report as tune_report

    without_plots(monkeypatch)
    rows, best = made_up_trials(3)
    page = tune_report.write_tune_report(tmp_path, rows, best, SEARCH_SPACE, {"lr_max": 0.6, "epochs": 0.4},
                                         title="t").read_text()
    wrapper = re.search(r'<h3>The 3 best trials</h3><div class="([\w-]+)"><table>(.*?)</table></div>', page)
    assert wrapper, "the trial table is not wrapped in a box of its own"
    style = page[page.index("<style>"):page.index("</style>")]
    assert re.search(r"\." + wrapper[1] + r"\s*\{[^}]*overflow-x:\s*auto", style)  # it scrolls, the page does not
    cells = re.findall(r'<td class="num">([^<]*)</td>', wrapper[2])
    numeric = [name for name in SEARCH_SPACE if not isinstance(rows[0][name], str)]  # the scheduler is a word
    read = sum(row["head"] == "sgd" or name not in SGD_SETTINGS for row in rows for name in numeric)
    assert len(cells) == 3 * 5 + read  # trial 1's logistic head reads no SGD setting: "—"
    floats = [cell for cell in cells if "." in cell or "e" in cell]
    assert floats and max(significant_digits(cell) for cell in floats) <= 4, floats
    assert "123" in cells and "0.812" in cells  # seconds, accuracy: 3 significant digits


def capture_figures(monkeypatch) -> list:
    """The figures tune_report draws, still written to their PNG files."""
    import stopsign.reporting.tune_report as tune_report

    figures, save = [], tune_report.save_figure
    monkeypatch.setattr(tune_report, "save_figure", lambda figure, path: figures.append(figure) or save(figure, path))
    return figures


def visible_ticks(axis, which: str = "major") -> tuple[list[float], list[str]]:
    """The tick positions inside the axis' view and their labels, as drawn."""
    lo, hi = sorted(axis.get_view_interval())
    locations = axis.get_majorticklocs() if which == "major" else axis.get_minorticklocs()
    shown = [float(v) for v in locations if lo - 1e-12 * abs(lo) <= v <= hi + 1e-12 * abs(hi)]
    formatter = axis.get_major_formatter() if which == "major" else axis.get_minor_formatter()
    return shown, [label for label in formatter.format_ticks(shown)]


def test_trial_numbers_get_integer_ticks_on_the_history_and_the_colour_bars(tmp_path, monkeypatch):
    from stopsign.reporting.tune_report import plot_history, plot_slice

    figures = capture_figures(monkeypatch)
    rows, _ = made_up_trials(3)
    assert (plot_history(rows, 0.7, tmp_path / "history.png")).read_bytes()[:4] == b"\x89PNG"
    plot_slice(rows, "momentum", SEARCH_SPACE["momentum"], tmp_path / "slice.png")
    history, slice_ = figures
    trial_axes = [history.axes[0].xaxis, slice_.axes[1].yaxis]  # the history's x axis, the slice's colour bar
    for axis in trial_axes:
        ticks, _ = visible_ticks(axis)
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks


@pytest.mark.parametrize("name, space", [("lr_base", SEARCH_SPACE["lr_base"]),
                                         ("narrow", optuna.distributions.FloatDistribution(0.01, 0.05, log=True))])
def test_log_parameters_get_few_short_ticks(tmp_path, monkeypatch, name, space):
    from stopsign.reporting.tune_report import plot_slice

    figures = capture_figures(monkeypatch)
    rows, _ = made_up_trials(3)
    rows = [row | {name: space.low * (space.high / space.low) ** (0.2 + 0.3 * k)} for k, row in enumerate(rows)]
    plot_slice(rows, name, space, tmp_path / "slice.png")
    axis = figures[0].axes[0].xaxis
    ticks, labels = visible_ticks(axis)
    assert 2 <= len(ticks) <= 5, labels
    assert all(re.fullmatch(r"\d(e-\d+)?|0\.0\d", label) for label in labels), labels  # 1e-6, 0.02: no 10^{-6}
    assert not any(visible_ticks(axis, "minor")[1]), "minor ticks are labelled"


def test_resume_refuses_other_folds_or_backbone(tmp_path, data, tiny_backbone):
    started = tune(data, trials=1, out=str(tmp_path / "runs"), **SETTINGS)
    for changed, named in (({"folds": 5}, "folds: asked 5, recorded 3"), ({"seed": 7}, "seed: asked 7, recorded 0")):
        with pytest.raises(StopsignError, match="cannot add trials") as caught:
            tune(data, trials=1, resume=started.run_dir, progress=False, final=False, **changed)
        assert named in str(caught.value)


class WideTinyNet(torch.nn.Module):
    """A second stand-in backbone with 16 features, so a trial scored on the other backbone's features fails."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, images):
        return torch.relu(self.conv(images))


@pytest.fixture
def wide_backbone(tmp_path_factory, monkeypatch) -> str:
    from stopsign.model.backbones import BackboneSpec

    torch.manual_seed(1)
    weights = tmp_path_factory.mktemp("wide") / "wide.pt"
    torch.save(WideTinyNet().state_dict(), weights)

    def build(state):
        model = WideTinyNet()
        model.load_state_dict(state)
        return model

    monkeypatch.setitem(BACKBONES, "wide", BackboneSpec("wide", 16, {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                                                        lambda given: Path(given) if given else weights, build))
    monkeypatch.setattr("stopsign.config.BACKBONE_NAMES", tuple(BACKBONES))
    return "wide"


def test_backbones_and_tiles_are_searched_when_asked_and_the_final_model_uses_the_best(
        tmp_path, data, tiny_backbone, wide_backbone, capsys):
    from stopsign.cache import cache_info

    assert main(["-q", "tune", str(data), "--trials", "8", "--folds", "3", "--backbone", "tiny", "--tiles", "1",
                 "--workers", "0", "--out", str(tmp_path / "runs"), "--name", "both",
                 "--search-backbones", "tiny,wide", "--search-tiles", "1,2"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "both"
    trials = read_trials(run_dir)
    assert {row["backbone"] for row in trials} == {"tiny", "wide"}  # both drawn by the seeded start-up trials
    assert {row["tiles"] for row in trials} == {"1", "2"}
    best = json.loads((run_dir / "best.json").read_text())
    assert {"backbone", "tiles"} <= set(best["params"])
    assert best["starting_recipe"]["params"]["backbone"] == "tiny" and best["starting_recipe"]["params"]["tiles"] == 1
    final = json.loads((run_dir / "final" / "config.json").read_text())
    assert (final["backbone"], final["tiles"]) == (best["params"]["backbone"], best["params"]["tiles"])
    assert len(cache_info()["folders"]) == 2  # one feature folder per backbone
    recorded = json.loads((run_dir / "config.json").read_text())["tune"]["search"]
    assert recorded == {"backbone": ["tiny", "wide"], "tiles": [1, 2]}

    with pytest.raises(StopsignError, match="another search of features"):
        tune(data, trials=1, resume=run_dir, progress=False, final=False, search={"tiles": [1, 3]})
    resumed = tune(data, trials=1, resume=run_dir, progress=False, final=False)  # the recorded search goes on
    assert len(read_trials(resumed.run_dir)) == 9


def test_a_search_of_unknown_values_is_refused(tmp_path, data, tiny_backbone, capsys):
    with pytest.raises(StopsignError, match="unknown backbone 'nope'"):
        tune(data, trials=1, out=str(tmp_path / "runs"), search={"backbone": ["tiny", "nope"]}, **SETTINGS)
    with pytest.raises(StopsignError, match="1 to 4"):
        tune(data, trials=1, out=str(tmp_path / "runs"), search={"tiles": [1, 9]}, **SETTINGS)
    with pytest.raises(SystemExit):
        main(["tune", str(data), "--search-tiles", "1,x"])
    assert "comma-separated list of int" in capsys.readouterr().err


def test_resuming_a_study_whose_choices_changed_is_refused_naming_the_fix(tmp_path, data, tiny_backbone,
                                                                           monkeypatch):
    from optuna.distributions import CategoricalDistribution

    older = SEARCH_SPACE | {"pooling": CategoricalDistribution(["avg", "max", "gem"])}  # before --pooling regions
    monkeypatch.setattr(tune_module, "SEARCH_SPACE", older)
    started = tune(data, trials=1, out=str(tmp_path / "runs"), **SETTINGS)
    monkeypatch.setattr(tune_module, "SEARCH_SPACE", SEARCH_SPACE)
    with pytest.raises(StopsignError, match=r"drew pooling from \['avg', 'max', 'gem'\].*start a new study"):
        tune(data, trials=1, resume=started.run_dir, progress=False, final=False)


def test_the_starting_recipe_is_named_by_its_settings():
    assert recipe_name(Settings().replace(backbone="tiny", folds=3), SEARCH_SPACE) == "defaults"
    assert recipe_name(Settings.seed_recipe(backbone="tiny", folds=3), SEARCH_SPACE) == "seed recipe"
    for changed in ({"pooling": "max"}, {"lr_max": 0.1}, {"tiles": 1}):  # tiles: fixed for a study, the seed's 1
        assert recipe_name(Settings().replace(**changed), SEARCH_SPACE) == "given settings", changed


def settings_table(page: str) -> str:
    """The best-settings table: parameter, best, starting recipe."""
    start = page.index("<th>parameter</th>")
    return page[start:page.index("</table>", start)]


def test_the_best_settings_list_only_what_each_recipe_s_head_reads(tmp_path, monkeypatch):
    from stopsign.reporting.tune_report import write_tune_report

    without_plots(monkeypatch)
    rows, best = made_up_trials(3)
    logistic = {name: rows[1][name] for name in SEARCH_SPACE}  # trial 1 drew the logistic head
    assert logistic["head"] == "logistic"
    best["params"] = best["starting_recipe"]["params"] = logistic
    table = settings_table(write_tune_report(tmp_path, rows, best, SEARCH_SPACE, {}, title="t").read_text())
    assert "<td>pooling</td>" in table and "<td>class_weight</td>" in table and "<td>views</td>" in table
    for name in SGD_SETTINGS:
        assert f"<td>{name}</td>" not in table, name

    best["starting_recipe"]["params"] = logistic | {"head": "sgd"}  # one SGD recipe: its settings, beside "not used"
    table = settings_table(write_tune_report(tmp_path, rows, best, SEARCH_SPACE, {}, title="t").read_text())
    assert re.search(r'<td>lr_max</td><td>not used</td><td class="num">[\d.e-]+</td>', table)
    assert re.search(r"<td>head</td><td>logistic</td><td>sgd</td>", table)


def test_plots_that_show_nothing_are_not_drawn(tmp_path, monkeypatch):
    from stopsign.reporting.tune_report import plot_slice, write_tune_report

    drawn = without_plots(monkeypatch)
    rows, best = made_up_trials(3)
    page = write_tune_report(tmp_path / "one", rows[:1], best, SEARCH_SPACE, "not computed", title="t").read_text()
    assert drawn == [] and "data:image" not in page  # one trial: a point each, which the tables already give
    assert "One trial so far" in page

    rows[2]["head"] = "logistic"  # trial 0 is the only one whose head reads the learning rate
    write_tune_report(tmp_path / "three", rows, best, SEARCH_SPACE, "not computed", title="t")
    assert "history" in drawn and "slice_pooling" in drawn and "slice_views" in drawn
    assert not {f"slice_{name}" for name in SGD_SETTINGS} & set(drawn)

    monkeypatch.undo()
    figures = capture_figures(monkeypatch)
    rows[2]["head"] = "sgd"  # a slice of the learning rate shows the trials that used one, not the logistic one's
    plot_slice(rows, "lr_max", SEARCH_SPACE["lr_max"], tmp_path / "slice.png")
    assert len(figures[0].axes[0].collections[0].get_offsets()) == 2


def test_a_finished_tune_leaves_only_its_study_db(tmp_path, data, tiny_backbone):
    result = tune(data, trials=1, out=str(tmp_path / "runs"), **SETTINGS)
    files = sorted(p.name for p in result.run_dir.iterdir())
    assert [name for name in files if name.startswith("study.db")] == ["study.db"], files
    loaded = optuna.load_study(study_name="tune", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    assert len(loaded.trials) == 1  # what the WAL held is in study.db


def test_tune_shows_each_trial_s_folds_as_they_go(tmp_path, data, tiny_backbone, capsys, monkeypatch):
    monkeypatch.setattr(crossval, "tqdm", partial(crossval.tqdm, mininterval=0, miniters=1))  # every update drawn
    tune(data, trials=1, out=str(tmp_path / "runs"), **(SETTINGS | {"progress": True}))
    err = capsys.readouterr().err
    assert "trials: 100%" in err
    # the starting recipe's 3 folds and the trial's, each as it ends
    assert len(re.findall(r"folds:\s+\d+%\|[^|]*\| [123]/3 ", err)) >= 2 * 3


def test_when_no_trial_beats_the_starting_recipe_the_final_model_uses_it(tmp_path, data, tiny_backbone, monkeypatch,
                                                                          caplog):
    real = tune_module.scorer

    def worse_trials(plan, progress):
        score, skipped = real(plan, progress)

        def scored(trial, on_fold=None):  # a trial (on_fold given) scores 0.3 below what it got
            found = score(trial, on_fold)
            return found if on_fold is None else found | {"value": found["value"] - 0.3,
                                                          "accuracy": found["accuracy"] - 0.3}
        return scored, skipped

    monkeypatch.setattr(tune_module, "scorer", worse_trials)
    result = tune(data, trials=2, out=str(tmp_path / "runs"), **(SETTINGS | {"final": True}))
    best = json.loads((result.run_dir / "best.json").read_text())
    start = best["starting_recipe"]
    assert result.final_from == best["final_from"] == "the defaults" and best["value"] < start["value"]
    assert result.best_params == best["final_params"] == start["params"]
    trained = json.loads((result.final_run.run_dir / "config.json").read_text())
    assert {name: trained[name] for name in start["params"]} == start["params"]  # the defaults, not the best trial
    from stopsign.reporting.tune_report import summary_lines

    said = "\n".join(summary_lines(result))
    assert "no trial scored above the defaults" in said and "the final model uses the defaults" in said
    assert "final model (the defaults, all data)" in said
    assert "No trial scored above the" in (result.run_dir / "report.html").read_text()


def test_a_backbone_that_cannot_load_leaves_no_tune_folder(tmp_path, data, tiny_backbone):
    missing = tmp_path / "missing.pt"
    with pytest.raises(StopsignError, match="missing.pt"):
        tune(data, trials=1, out=str(tmp_path / "runs"), weights=str(missing), **SETTINGS)
    assert not list((tmp_path / "runs").glob("tune-*"))


def test_a_logistic_trial_draws_no_sgd_setting_and_settings_drawn_again_reuse_their_score(
        tmp_path, data, tiny_backbone, monkeypatch):
    calls = []
    real_fit = crossval.fit
    monkeypatch.setattr(crossval, "fit", lambda *args, **kwargs: calls.append(1) or real_fit(*args, **kwargs))
    # a space of two settings for the logistic head (and the SGD head's own): eight trials must repeat some
    space = {name: SEARCH_SPACE[name] for name in SGD_SETTINGS if name in SEARCH_SPACE} | {
        "head": optuna.distributions.CategoricalDistribution(["logistic"]),
        "pooling": optuna.distributions.CategoricalDistribution(["max", "avg"])}
    monkeypatch.setattr(tune_module, "SEARCH_SPACE", space)
    result = tune(data, trials=8, out=str(tmp_path / "runs"), **SETTINGS)

    rows = read_trials(result.run_dir)
    assert all(row[name] == "" for row in rows for name in SGD_SETTINGS if name in space)  # not drawn, not read
    first = {}
    for row in rows:
        key = row["pooling"]
        if key in first:  # the same settings on the same folds: the earlier trial's score, no fit
            assert row["same_as"] == first[key]["number"] and row["accuracy"] == first[key]["accuracy"]
        else:
            assert row["same_as"] == "" and row["state"] == "complete"
            first[key] = row
    assert len(first) == 2 and len(calls) == 3 * (len(first) + 1)  # 3 folds of each distinct trial and the start
    best = json.loads((result.run_dir / "best.json").read_text())
    assert best["trials"] == {"complete": 8, "repeats": 6}
    assert set(best["params"]) == {"head", "pooling"}
    page = (result.run_dir / "report.html").read_text()
    assert "<h3>The 2 best trials</h3>" in page and "Repeats:" in page  # each setting listed once
