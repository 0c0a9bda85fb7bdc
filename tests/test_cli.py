"""The command line: exit codes, the last line of train, output formats, messages."""

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stopsign.arguments import build_parser
from stopsign.cli import main


@pytest.fixture
def data(tmp_path, make_images):
    return make_images(tmp_path / "data", {"stop": 10, "not_stop": 10}, layout="cvstudio")


def train_cli(tmp_path, data, *extra):
    return main(["-q", "train", str(data), "--recipe", "seed", "--backbone", "tiny", "--epochs", "3", "--workers", "0",
                 "--out", str(tmp_path / "runs"), "--name", "cli", "--val-fraction", "0.3", *extra])


def test_train_prints_best_accuracy_and_run_folder_last(tmp_path, data, tiny_backbone, capsys):
    assert train_cli(tmp_path, data) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"best validation accuracy \d\.\d{3} \(95% CI \d\.\d\d-\d\.\d\d, n=6\) at epoch \d; "
                        r"always not_stop: 0\.500; log-loss \d\.\d{4} against the prior's 0\.6931", lines[0])
    assert lines[1] == ("warning: the best of 3 epochs on the same 6 validation images: this figure is "
                        "optimistic; --folds 5 gives an unbiased one")
    assert lines[-1] == f"report {tmp_path / 'runs' / 'cli' / 'report.html'}"


def test_train_says_what_it_reads_and_each_epoch_unless_quiet(tmp_path, data, tiny_backbone, capsys):
    main(["train", str(data), "--recipe", "seed", "--backbone", "tiny", "--epochs", "2", "--workers", "0", "--out",
          str(tmp_path / "runs"), "--val-fraction", "0.3"])
    err = capsys.readouterr().err
    assert "CV Studio export: 20 images, not_stop 10 / stop 10; split 14/6" in err
    assert re.search(r"epoch 1/2  lr 1e-06  train loss \d\.\d{4} acc \d\.\d{3}  val loss \d\.\d{4} acc", err)
    assert "epoch 2/2" in err
    assert "hashed" not in err and "wrote the report" not in err  # only what a user reads: no internals
    train_cli(tmp_path, data, "--name", "quiet")
    assert "epoch 1/" not in capsys.readouterr().err


def test_a_message_while_a_progress_bar_runs_gets_a_line_of_its_own(capsys):
    """The threshold's fold fits run beside the final fit, under their bar: the fit's line must not end up glued
    to the bar, as print() would leave it."""
    import logging

    from tqdm.auto import tqdm

    from stopsign.cli import configure_logging

    configure_logging(quiet=False)
    with tqdm(total=5, desc="threshold folds") as bar:
        bar.update(2)
        logging.getLogger("stopsign.training").info("epoch 1/1  train loss 0.0377")
        bar.update(3)
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    assert "epoch 1/1  train loss 0.0377" in lines


def test_predict_formats_and_exit_status(tmp_path, data, tiny_backbone, capsys):
    train_cli(tmp_path, data)
    checkpoint = str(tmp_path / "runs" / "cli" / "best.pt")
    capsys.readouterr()
    assert main(["-q", "predict", checkpoint, str(data / "images"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 20 and set(rows[0]) == {"path", "label", "probabilities", "similarity", "unfamiliar"}
    assert main(["-q", "predict", checkpoint, str(data / "images" / "stop-0.png"), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(table[0]) == ["path", "label", "p_not_stop", "p_stop", "error", "similarity", "unfamiliar"]
    assert table[0]["label"] in ("stop", "not_stop")
    assert abs(float(table[0]["p_stop"]) + float(table[0]["p_not_stop"]) - 1) < 1e-3
    # With a threshold the table shows the positive class's probability, the one the label follows.
    assert main(["-q", "predict", checkpoint, str(data / "images" / "stop-0.png"), "--threshold", "0.99"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "p(stop)" and abs(float(row.split()[-1]) - float(table[0]["p_stop"])) < 1e-3
    (tmp_path / "bad.jpg").write_text("nope")
    assert main(["-q", "predict", checkpoint, str(tmp_path / "bad.jpg"), str(data / "images" / "stop-0.png")]) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "stop-0.png" in out


def test_predict_prints_each_chunk_of_rows_before_it_reads_the_next(tmp_path, data, tiny_backbone, capsys,
                                                                     monkeypatch):
    """A big folder streams: the csv header and the first rows are out while later files wait to be predicted."""
    from functools import partialmethod

    from stopsign.inference.base import Classifier
    from stopsign.inference.pytorch import CheckpointClassifier

    train_cli(tmp_path, data)
    capsys.readouterr()
    printed = []  # what stdout had received as each chunk of files began to be predicted, then the rest
    probabilities = CheckpointClassifier.probabilities
    monkeypatch.setattr(CheckpointClassifier, "probabilities", lambda self, paths, progress=False:
                        printed.append(capsys.readouterr().out) or probabilities(self, paths, progress))
    monkeypatch.setattr(Classifier, "predict_iter", partialmethod(Classifier.predict_iter, chunk=8))
    checkpoint = str(tmp_path / "runs" / "cli" / "best.pt")
    assert main(["-q", "predict", checkpoint, str(data / "images"), "--format", "csv"]) == 0
    printed.append(capsys.readouterr().out)
    assert [text.count("\n") for text in printed] == [1, 8, 8, 4]  # the header first, then 20 rows 8 at a time
    assert printed[0].startswith("path,label,p_not_stop,p_stop,error")


def test_info_and_evaluate(tmp_path, data, tiny_backbone, capsys):
    train_cli(tmp_path, data)
    checkpoint = str(tmp_path / "runs" / "cli" / "best.pt")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "runs" / "cli")]) == 0  # a run folder means its best.pt
    out = capsys.readouterr().out
    assert "classes            not_stop, stop\n" in out and "head parameters    18\n" in out
    assert "preprocessing      32×32, mean 0.5 0.5 0.5, std 0.25 0.25 0.25\n" in out
    assert "trained on         14 images" in out and out.count("sha256") == 1  # once, shortened
    assert re.search(r"epoch              \d+ \(validation accuracy \d\.\d{3}, loss \d\.\d{4}\)", out)
    assert "{" not in out and "tensor" not in out  # no raw dicts or tensors
    assert main(["-q", "evaluate", checkpoint, str(data), "--out", str(tmp_path / "evals")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accuracy ") and "95% CI" in out and "report.html" in out
    assert "  truth / predicted not_stop  stop" in out  # the confusion matrix names its classes


def test_data_errors_exit_2_with_the_message(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_help_says_how_the_cycle_is_stepped(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "stepped once per epoch" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_the_installed_command_exits_with_the_status_main_returns(tmp_path):
    script = Path(sys.executable).parent / "stopsign"
    if not script.exists():
        pytest.skip("stopsign is not installed as a command next to this Python")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("stopsign ")
    missing = subprocess.run([str(script), "train", str(tmp_path / "nowhere")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and not missing.stdout


def test_info_on_a_file_that_is_no_export_says_so(tmp_path, capsys):
    for name in ("model.torchscript", "model.onnx"):
        (tmp_path / name).write_bytes(b"not a model")
        assert main(["info", str(tmp_path / name)]) == 2
        assert f"error: {tmp_path / name} is not" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.torchscript")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quiet_goes_before_or_after_the_subcommand(tmp_path, make_images, tiny_backbone, capsys):
    data = make_images(tmp_path / "data", {"stop": 5, "not_stop": 5}, layout="folders")
    for argv in (["-q", "train", str(data)], ["train", str(data), "-q"], ["train", str(data), "--quiet"]):
        args = build_parser().parse_args(argv)
        assert args.quiet is True and args.command == "train"
    assert build_parser().parse_args(["train", str(data)]).quiet is False
    for command in ("train", "predict", "evaluate", "info", "demo", "cache", "export", "serve", "tune"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "-q, --quiet" in capsys.readouterr().out


def test_numbers_and_names_are_checked_before_any_data_is_read(tmp_path, capsys):
    for flags, message in ((["--epochs", "0"], "--epochs: 0 is out of range: it must be >= 1"),
                           (["--batch-size", "-3"], "--batch-size: -3 is out of range"),
                           (["--rotation", "-10"], "--rotation: -10 is out of range"),
                           (["--epochs", "ten"], "--epochs: 'ten' is not an integer"),
                           (["--backbone", "resnet81"], "invalid choice: 'resnet81'"),
                           (["--scheduler", "cosin"], "invalid choice: 'cosin'")):
        with pytest.raises(SystemExit) as exited:
            main(["train", str(tmp_path / "no-such-data"), *flags, "--out", str(tmp_path / "runs")])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_recipe_fills_only_the_settings_not_written_and_a_written_default_counts():
    from stopsign.arguments import TRAIN_FIELDS, given
    from stopsign.config import recipe_settings

    args = build_parser().parse_args(["train", "data", "--recipe", "seed", "--tiles", "2", "--epochs", "10"])
    # --epochs 10 is the default, yet written: --resume checks it against the run's own
    assert given(args, TRAIN_FIELDS) == {"tiles": 2, "epochs": 10}
    assert recipe_settings(args.recipe, given(args, TRAIN_FIELDS)) == {"pooling": "avg", "tiles": 2, "head": "sgd",
                                                                       "epochs": 10}
    assert recipe_settings("stopsign", {"tiles": 2}) == {"tiles": 2}


def test_train_help_shows_each_default_once_and_no_misleading_ones(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert "--no-augment train-time horizontal flip and rotation (--no-augment: none)" in text
    assert "--epochs EPOCHS passes over the training set (default: 10)" in text


def test_predict_searches_folders_and_refuses_to_find_nothing(tmp_path, data, tiny_backbone, capsys):
    train_cli(tmp_path, data)
    checkpoint = str(tmp_path / "runs" / "cli" / "best.pt")
    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    for image in sorted((data / "images").glob("*.png"))[:3]:
        (nested / image.name).write_bytes(image.read_bytes())
    capsys.readouterr()
    assert main(["-q", "predict", checkpoint, str(tmp_path / "nested"), "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3  # found in the subfolder
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for inputs in ([str(tmp_path / "empty")], [str(tmp_path / "no-match-*.png"), "--format", "csv"]):
        assert main(["-q", "predict", checkpoint, *inputs]) == 2
        captured = capsys.readouterr()  # streamed csv too: no header before the error
        assert captured.out == "" and f"error: no image found in {inputs[0]}" in captured.err


def test_resume_refuses_other_settings_and_needs_no_data(tmp_path, data, tiny_backbone, capsys):
    assert train_cli(tmp_path, data) == 0  # 3 epochs, lr_max 1e-2
    run_dir = str(tmp_path / "runs" / "cli")
    (tmp_path / "runs" / "cli" / "summary.json").unlink()  # stopped before its summary: a run that resumes
    capsys.readouterr()
    assert main(["-q", "train", str(data), "--resume", run_dir, "--epochs", "5", "--lr-max", "0.1",
                 "--backbone", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "epochs: asked 5, recorded 3" in err and "lr_max: asked 0.1, recorded 0.01" in err
    assert "backbone" not in err  # the same as recorded: no conflict
    # DATA comes from the run; where and how fast it runs may change (runtime options)
    assert main(["-q", "train", "--resume", run_dir, "--device", "cpu", "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report {run_dir}/report.html"


def test_a_separate_validation_set_and_folds_do_not_combine(tmp_path, data, tiny_backbone, capsys):
    assert main(["-q", "train", str(data), "--val", str(data), "--folds", "3", "--backbone", "tiny",
                 "--out", str(tmp_path / "runs")]) == 2
    assert "--val and --folds do not combine" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_max_pixels_sets_the_decoding_limit(tmp_path, data, tiny_backbone, capsys):
    from stopsign import arguments
    from stopsign.data import images

    assert arguments.DEFAULT_MAX_PIXELS == images.DEFAULT_MAX_PIXELS  # the flag's default is the module's
    train_cli(tmp_path, data)
    checkpoint = str(tmp_path / "runs" / "cli" / "best.pt")
    capsys.readouterr()
    previous = images.MAX_PIXELS
    try:
        # --no-cache: training stored this image's features, and a cached image is never decoded again
        assert main(["-q", "predict", checkpoint, str(data / "images" / "stop-0.png"), "--max-pixels", "100",
                     "--no-cache"]) == 1
        assert "too large: 32×32 = 1024 pixels exceeds the limit of 100" in capsys.readouterr().out
    finally:
        images.set_max_pixels(previous)


def test_every_option_of_every_command_has_help_and_the_top_help_names_the_cache(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        missing = [a.dest for a in sub._actions if not a.help]
        assert missing == [], f"{name}: {missing}"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "STOPSIGN_CACHE" in text and "train an honest image classifier" in text and "argparse" not in text


def test_a_reader_that_stops_early_gets_no_traceback():
    """`stopsign predict … | head -1`: the command ends quietly with the shell's SIGPIPE code."""
    child = subprocess.Popen(
        [sys.executable, "-c", "from stopsign import cli\n"
         "cli.main = lambda: [print('a row of results') for _ in range(100_000)] and 0\ncli.run()"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == b"a row of results\n"
    child.stdout.close()  # as head does after its line
    assert child.wait(timeout=60) == 141
    assert b"Traceback" not in child.stderr.read()
