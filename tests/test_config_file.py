"""--config FILE.yaml and args.yaml: a settings file and the flags agree, flags win, and a run's own args.yaml
gives its settings back; a file that names no setting, or a value of the wrong kind, stops before any work."""

import json

import pytest
import yaml

from stopsign import train
from stopsign.cli import main
from stopsign.config import LISTED, Settings, read_config
from stopsign.errors import StopsignError

FLAGS = ["--recipe", "seed", "--backbone", "tiny", "--epochs", "2", "--lr-max", "0.05", "--no-augment", "--workers",
         "0", "--val-fraction", "0.25"]
# the same settings as FLAGS; lr_base as a YAML 1.1 reader takes 1e-6 (text), as people write it
SETTINGS = {"pooling": "avg", "tiles": 1, "head": "sgd", "backbone": "tiny", "epochs": 2, "lr_max": 0.05,
            "augment": False, "num_workers": 0, "val_fraction": 0.25}


@pytest.fixture
def data(tmp_path, make_images):
    return make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="cvstudio")


def write_yaml(path, values: dict, text: str = ""):
    path.write_text(yaml.safe_dump(values) + text)
    return path


def settings_of(run_dir) -> dict:
    """config.json's settings, less the run folder's name."""
    config = json.loads((run_dir / "config.json").read_text())
    return {name: config[name] for name in LISTED if name != "name"}


def test_a_config_file_the_flags_and_args_yaml_give_the_same_run(tmp_path, data, tiny_backbone):
    out = ["--out", str(tmp_path / "runs")]
    assert main(["-q", "train", str(data), *FLAGS, *out, "--name", "flags"]) == 0
    config = write_yaml(tmp_path / "settings.yaml", SETTINGS, "lr_base: 1e-6\n")
    assert main(["-q", "train", str(data), "--config", str(config), *out, "--name", "file"]) == 0
    runs = tmp_path / "runs"
    assert settings_of(runs / "file") == settings_of(runs / "flags")

    # the run's args.yaml, fed back, gives its settings again; a flag given beside it wins
    args = runs / "flags" / "args.yaml"
    recorded = json.loads((runs / "flags" / "config.json").read_text())
    assert read_config(args) == {name: recorded[name] for name in LISTED}
    assert main(["-q", "train", str(data), "--config", str(args), "--epochs", "3", *out, "--name", "again"]) == 0
    assert settings_of(runs / "again") == settings_of(runs / "flags") | {"epochs": 3}
    assert yaml.safe_load(args.read_text())["epochs"] == 2


def test_the_python_api_reads_a_config_file_under_its_overrides(tmp_path, data, tiny_backbone):
    config = write_yaml(tmp_path / "settings.yaml", SETTINGS | {"out": str(tmp_path / "runs")})
    run_dir = train(data, config=config, epochs=1, progress=False).run_dir
    expected = Settings().replace(**SETTINGS | {"out": str(tmp_path / "runs"), "epochs": 1}).to_dict()
    assert settings_of(run_dir) == {name: value for name, value in expected.items() if name != "name"}
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["epochs"] == 1


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("text, named", [
    ("epoch: 5\n", ["'epoch' (did you mean epochs?) is no setting", "The settings are: backbone, weights,"]),
    ("epochs: ten\n", ["epochs: expected a whole number, got 'ten'"]),
    ("augment: 1\n", ["augment: expected true or false, got 1"]),
    ("pooling: mean\n", ["pooling: 'mean' is not one of avg, max, gem, regions"]),
    ("tiles: 9\n", ["tiles: 9 is out of range: it must be >= 1 and <= 4"]),
    ("- epochs\n", ["holds a list, not settings"]),
    ("epochs: [2\n", ["is not YAML: line 2, column 1"]),
])
def test_a_bad_config_file_fails_naming_the_key(tmp_path, monkeypatch, capsys, command, text, named):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["-q", command, str(tmp_path / "data"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: ") or err.startswith(f"error: {config} ")
    for part in named:
        assert part in err
    assert not (tmp_path / "runs").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(StopsignError, match="cannot read the settings file .*nowhere.yaml"):
        read_config(tmp_path / "nowhere.yaml")


def test_a_tune_folder_s_args_yaml_holds_its_study_s_settings(tmp_path, data, tiny_backbone):
    from stopsign import tune

    config = write_yaml(tmp_path / "settings.yaml", {"backbone": "tiny", "num_workers": 0, "tiles": 1})
    result = tune(data, trials=0, folds=2, final=False, progress=False, config=config, out=str(tmp_path / "runs"))
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert read_config(result.run_dir / "args.yaml") == {name: recorded[name] for name in LISTED}
    assert recorded["tiles"] == 1 and recorded["folds"] == 2
