"""data.py: each layout loads, every bad entry is named in one DataError, the split is stratified and seeded."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_image
from stopsign.data import datasets
from stopsign.data.datasets import Sample, kfold_samples, load_data, split_samples
from stopsign.errors import DataError

COUNTS = {"stop": 5, "not_stop": 3}


@pytest.mark.parametrize("layout", ["cvstudio", "folders", "csv"])
def test_each_layout_loads_classes_counts_and_paths(tmp_path, make_images, layout):
    data = load_data(make_images(tmp_path, COUNTS, layout=layout))
    assert data.layout == layout and data.root == tmp_path and data.splits is None
    assert data.class_names == ["not_stop", "stop"]  # sorted (the CV Studio fixture lists them sorted)
    assert data.class_counts() == {"not_stop": 3, "stop": 5}
    for sample in data.samples:
        assert sample.path.is_absolute() and sample.path.is_file()
        assert sample.path.name.startswith(data.class_names[sample.label] + "-")


def test_split_folders_fix_the_splits(tmp_path, make_images):
    counts = {"train": {"stop": 4, "not_stop": 3}, "valid": {"stop": 2, "not_stop": 1}, "test": {"stop": 1}}
    data = load_data(make_images(tmp_path, counts, layout="splits"))
    assert data.layout == "splits" and data.class_names == ["not_stop", "stop"]
    assert {split: data.class_counts(samples) for split, samples in data.splits.items()} == {
        "train": {"not_stop": 3, "stop": 4},
        "val": {"not_stop": 1, "stop": 2},
        "test": {"not_stop": 0, "stop": 1},
    }
    assert len(data.samples) == 11 and all(sample.path.parent.parent.name == "valid" for sample in data.splits["val"])


def test_cvstudio_keeps_the_label_order_and_finds_images_beside_the_json(tmp_path):
    for name in ("b c é.png", "a.png", "d.png"):  # spaces and Unicode are fine
        make_image(len(name)).save(tmp_path / name)
    labels = {"b c é.png": "stop", "a.png": "not_stop", "d.png": "stop"}
    write_annotations(tmp_path, ["stop", "not_stop"], {key: [{"label": label}] for key, label in labels.items()})
    data = load_data(tmp_path / "_annotations.json")  # the JSON file itself is a valid path too
    assert data.class_names == ["stop", "not_stop"]
    assert {sample.path.name: sample.label for sample in data.samples} == {"b c é.png": 0, "a.png": 1, "d.png": 0}


def test_csv_file_of_any_name_with_images_in_a_subfolder(tmp_path, make_images):
    make_images(tmp_path, COUNTS, layout="csv")
    (tmp_path / "labels.csv").rename(tmp_path / "my data.csv")
    data = load_data(tmp_path / "my data.csv")
    assert data.layout == "csv" and data.class_counts() == {"not_stop": 3, "stop": 5}
    assert all(sample.path.parent == tmp_path / "images" for sample in data.samples)


def test_given_class_names_fix_the_order_and_reject_unknown_labels(tmp_path, make_images):
    root = make_images(tmp_path, COUNTS, layout="folders")
    data = load_data(root, class_names=["stop", "not_stop"])
    assert data.class_counts() == {"stop": 5, "not_stop": 3}
    assert all(sample.path.parent.name == data.class_names[sample.label] for sample in data.samples)
    with pytest.raises(DataError, match="'not_stop' is not one of the classes \\['stop', 'yield'\\]"):
        load_data(root, class_names=["stop", "yield"])


def test_unlabelled_images_are_ignored_with_a_warning(tmp_path, make_images, caplog):
    root = make_images(tmp_path, COUNTS, layout="cvstudio")
    make_image(99).save(root / "images" / "stray.png")
    with caplog.at_level(logging.WARNING, logger="stopsign.data"):
        data = load_data(root)
    assert len(data.samples) == 8 and "stray.png" in caplog.text


def test_nonexistent_or_unrecognised_path_lists_the_layouts(tmp_path):
    make_image(0).save(tmp_path / "loose.png")
    for path in (tmp_path / "nowhere", tmp_path, tmp_path / "loose.png"):
        with pytest.raises(DataError, match="four layouts") as caught:
            load_data(path)
        assert str(path) in str(caught.value) and "DATA/train/<class>" in str(caught.value)


def write_annotations(root: Path, labels, annotations, kind="classification") -> None:
    document = {"version": "1.0", "type": kind, "labels": labels, "annotations": annotations}
    (root / "_annotations.json").write_text(json.dumps(document), encoding="utf-8")


def cvstudio_error(tmp_path, make_images, change) -> str:
    """Load a good CV Studio set after `change(document, root)` edits its JSON; return the error."""
    root = make_images(tmp_path / "data", COUNTS, layout="cvstudio")
    document = json.loads((root / "_annotations.json").read_text())
    change(document, root)  # may set document["raw"] to the exact text to write
    text = document.get("raw") or json.dumps(document)
    (root / "_annotations.json").write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_data(root)
    return str(caught.value)


def add(key, labels):
    return lambda document, root: document["annotations"].update({key: [{"label": label} for label in labels]})


def only_stop(document, root):
    document["labels"] = ["stop"]
    document["annotations"] = {key: value for key, value in document["annotations"].items() if "not" not in key}


def link_outside(document, root):
    make_image(50).save(root.parent / "secret.png")
    os.symlink(root.parent / "secret.png", root / "images" / "escape.png")
    document["annotations"]["escape.png"] = [{"label": "stop"}]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d, r: d.update(raw='{"labels": ["a",\n  "b" "c"]}'), "not valid JSON: .* at line 2, column 7"),
        (lambda d, r: d.update(type="object-detection"), "'object-detection': stopsign needs a 'classification'"),
        (lambda d, r: d.update(labels="stop,not_stop"), "'labels' must be a list of class names"),
        (lambda d, r: d.update(annotations=["stop-0.png"]), "'annotations' must be an object"),
        (lambda d, r: d["annotations"].update({"stop-0.png": "stop"}), "'stop-0.png': must be a list of"),
        (add("ghost.png", ["stop"]), "'ghost.png': file not found"),
        (add("stop-0.png", ["yield"]), "'stop-0.png': label 'yield' is not in 'labels'"),
        (add("sub/stop-0.png", ["stop"]), "'sub/stop-0.png': contains a path separator"),
        (add("../stop-0.png", ["stop"]), r"'\.\./stop-0.png': contains '\.\.'"),
        (add("/etc/passwd", ["stop"]), "'/etc/passwd': is an absolute path"),
        (link_outside, "'escape.png': links to a file outside the data folder"),
        (add("stop-1.png", []), "'stop-1.png': has no label"),
        (add("stop-2.png", ["stop", "not_stop"]), r"'stop-2.png': has 2 labels \(stop, not_stop\)"),
        (lambda d, r: d["labels"].append("yield"), "class 'yield' has no images"),
        (only_stop, r"1 class\(es\) \['stop'\]: a classifier needs at least two"),
    ],
)
def test_bad_cvstudio_entries_are_named(tmp_path, make_images, change, expected):
    message = cvstudio_error(tmp_path, make_images, change)
    assert re.search(expected, message), message


def test_duplicate_json_keys_are_named(tmp_path, make_images):
    def duplicate(document, root):
        text = json.dumps(document)
        document["raw"] = text.replace('"stop-0.png":', '"stop-0.png": [{"label": "stop"}], "stop-0.png":')

    assert "'stop-0.png': appears more than once" in cvstudio_error(tmp_path, make_images, duplicate)


def test_all_problems_come_in_one_error_capped_at_twenty(tmp_path, make_images):
    def many(document, root):
        document["type"] = "segmentation"
        document["annotations"].update({f"ghost-{i:02d}.png": [{"label": "stop"}] for i in range(30)})

    message = cvstudio_error(tmp_path, make_images, many)
    assert "31 problem(s)" in message and "'segmentation'" in message and "'ghost-18.png'" in message
    assert "'ghost-19.png'" not in message and "and 11 more" in message
    assert "Fix or delete these entries" in message  # and says how to fix it


def test_bad_class_folders_are_named(tmp_path, make_images):
    root = make_images(tmp_path / "data", COUNTS, layout="folders")
    (root / "yield").mkdir()
    (root / "empty").mkdir()
    with pytest.raises(DataError) as caught:
        load_data(root)
    assert "class 'yield' has no images" in str(caught.value) and "class 'empty' has no images" in str(caught.value)


@pytest.fixture
def library(tmp_path) -> Path:
    """A photo library outside the data folder: library/a.png, library/b.png, library/cats/c-0.png, c-1.png."""
    folder = tmp_path / "library"
    (folder / "cats").mkdir(parents=True)
    for seed, name in enumerate(["a.png", "b.png", "cats/c-0.png", "cats/c-1.png"]):
        make_image(70 + seed).save(folder / name)
    return folder


@pytest.mark.parametrize("layout", ["folders", "splits"])
def test_class_folders_follow_links_to_images_and_folders_anywhere(tmp_path, make_images, library, layout):
    counts = COUNTS if layout == "folders" else {"train": COUNTS, "val": COUNTS}
    root = make_images(tmp_path / "data", counts, layout=layout)
    classes = root if layout == "folders" else root / "train"
    os.symlink(library / "a.png", classes / "stop" / "linked-a.png")  # an image linked from elsewhere
    os.symlink(library / "cats", classes / "cat")  # a whole class folder linked from elsewhere
    os.symlink(library / "gone.png", classes / "stop" / "broken.png")  # still skipped, with the reason
    if layout == "splits":
        os.symlink(library / "cats", root / "val" / "cat")
    data = load_data(root)
    assert data.class_names == ["cat", "not_stop", "stop"]
    in_train = data.samples if layout == "folders" else data.splits["train"]
    assert data.class_counts(in_train) == {"cat": 2, "not_stop": 3, "stop": 6}
    paths = {sample.path: data.class_names[sample.label] for sample in in_train}
    assert paths[classes / "stop" / "linked-a.png"] == "stop" and paths[classes / "cat" / "c-1.png"] == "cat"
    assert all(path.is_file() for path in paths)  # the link's own path, which opens the library's file
    assert data.skipped == {str(classes / "stop" / "broken.png"): "broken link: its target does not exist"}


def test_one_class_folder_is_not_enough(tmp_path, make_images):
    with pytest.raises(DataError, match="a classifier needs at least two"):
        load_data(make_images(tmp_path, {"stop": 4}, layout="folders"))


def test_split_folders_need_a_validation_folder_and_every_class_in_it(tmp_path, make_images):
    root = make_images(tmp_path / "a", {"train": {"stop": 2, "not_stop": 2}}, layout="splits")
    with pytest.raises(DataError, match="has train/ but no val/"):
        load_data(root)
    root = make_images(tmp_path / "b", {"train": {"stop": 2, "not_stop": 2}, "val": {"stop": 2}}, layout="splits")
    with pytest.raises(DataError, match="val/not_stop: no images"):
        load_data(root)


def test_bad_csv_rows_are_named_with_their_line(tmp_path, make_images):
    root = make_images(tmp_path, COUNTS, layout="csv")
    with open(root / "labels.csv", "a", encoding="utf-8") as file:
        file.write(f"stop-0.png,stop\nghost.png,stop\n{tmp_path / 'gone.png'},stop\nstop-1.png,\n../gone.png,stop\n")
    with pytest.raises(DataError) as caught:
        load_data(root)
    message = str(caught.value)
    assert "line 10 'stop-0.png': is listed again (first on line 2)" in message
    assert "line 11 'ghost.png': file not found (looked in the data folder or images/)" in message
    assert f"line 12 '{tmp_path / 'gone.png'}': file not found ({tmp_path / 'gone.png'})" in message
    assert "line 13 'stop-1.png': has no label" in message
    assert f"line 14 '../gone.png': file not found ({tmp_path.parent / 'gone.png'})" in message
    assert "5 problem(s)" in message
    (root / "labels.csv").write_text("file,class\nstop-0.png,stop\n")
    with pytest.raises(DataError, match="the header must be 'filename,label'"):
        load_data(root)


def test_csv_names_files_by_absolute_or_parent_relative_paths_and_follows_links(tmp_path, library, caplog):
    lists = tmp_path / "lists"
    (lists / "images").mkdir(parents=True)
    make_image(80).save(lists / "images" / "own.png")
    os.symlink(library / "cats", lists / "linked-cats")  # a subfolder linked from elsewhere
    os.symlink(library / "b.png", lists / "images" / "linked-b.png")  # a file linked from elsewhere
    rows = {"../library/a.png": "stop",  # relative to the CSV's folder
            str(library / "b.png"): "not_stop",  # absolute
            "linked-cats/c-0.png": "stop",
            "linked-b.png": "not_stop",  # found in images/
            "../lists/images/own.png": "stop",
            "images/../../library/cats/./c-1.png": "not_stop"}
    (lists / "labels.csv").write_text("filename,label\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    with caplog.at_level(logging.WARNING, logger="stopsign.data"):
        data = load_data(lists / "labels.csv")
    assert data.layout == "csv" and data.class_counts() == {"not_stop": 3, "stop": 3}
    assert [str(sample.path) for sample in data.samples] == [
        str(library / "a.png"), str(library / "b.png"), str(lists / "linked-cats" / "c-0.png"),
        str(lists / "images" / "linked-b.png"), str(lists / "images" / "own.png"), str(library / "cats" / "c-1.png")]
    assert all(sample.path.is_absolute() and ".." not in sample.path.parts for sample in data.samples)
    assert "without a label" not in caplog.text


def test_a_csv_file_named_through_links_and_dotdot_counts_as_listed(tmp_path, make_images, caplog):
    make_images(tmp_path / "data", COUNTS, layout="csv")
    os.symlink(tmp_path / "data", tmp_path / "shortcut")  # the CSV is read through a linked folder
    text = (tmp_path / "data" / "labels.csv").read_text().replace("\nstop-0.png,", "\n../data/images/stop-0.png,")
    (tmp_path / "data" / "labels.csv").write_text(text)
    with caplog.at_level(logging.WARNING, logger="stopsign.data"):
        data = load_data(tmp_path / "shortcut")
    assert len(data.samples) == 8 and tmp_path / "data" / "images" / "stop-0.png" in {s.path for s in data.samples}
    assert "without a label" not in caplog.text  # images/stop-0.png is listed, by another path
    make_image(99).save(tmp_path / "data" / "images" / "stray.png")
    with caplog.at_level(logging.WARNING, logger="stopsign.data"):
        load_data(tmp_path / "shortcut")
    assert "1 image(s) without a label were ignored" in caplog.text and "stray.png" in caplog.text


def test_a_cv_studio_export_stays_confined_to_its_folder(tmp_path, make_images, library):
    """The paths a CSV may use, to files that exist, are refused as keys of an export (made elsewhere)."""
    root = make_images(tmp_path / "data", COUNTS, layout="cvstudio")
    os.symlink(library / "a.png", root / "images" / "linked-a.png")
    os.symlink(library / "cats", root / "images" / "linked-cats")
    keys = {"../library/b.png": "contains '..': the file must be inside the data folder",
            "../../library/b.png": "contains '..'",
            str(library / "b.png"): "is an absolute path: name the file relative to the data folder",
            "linked-a.png": "links to a file outside the data folder",
            "linked-cats/c-0.png": "contains a path separator: give the plain file name"}
    document = json.loads((root / "_annotations.json").read_text())
    document["annotations"] |= {key: [{"label": "stop"}] for key in keys}
    (root / "_annotations.json").write_text(json.dumps(document))
    with pytest.raises(DataError) as caught:
        load_data(root)
    message = str(caught.value)
    assert "5 problem(s)" in message
    for key, reason in keys.items():
        assert f"{key!r}: {reason}" in message


def test_a_link_out_of_the_export_is_one_problem_and_not_also_an_image_without_a_label(tmp_path, make_images,
                                                                                      caplog):
    root = make_images(tmp_path / "data", COUNTS, layout="cvstudio")
    document = json.loads((root / "_annotations.json").read_text())
    link_outside(document, root)
    (root / "_annotations.json").write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="stopsign.data"), pytest.raises(DataError) as caught:
        load_data(root)
    assert "1 problem(s)" in str(caught.value)
    assert "'escape.png': links to a file outside the data folder" in str(caught.value)
    assert "without a label" not in caplog.text


def test_a_csv_row_with_too_many_fields_is_one_malformed_row(tmp_path, make_images, caplog):
    root = make_images(tmp_path, COUNTS, layout="csv")
    with open(root / "labels.csv", "a", encoding="utf-8") as file:
        file.write("too,many,fields\nstop-0.png,stop,extra\n")  # line 10; line 11 names a real image
    with caplog.at_level(logging.WARNING, logger="stopsign.data"), pytest.raises(DataError) as caught:
        load_data(root)
    message = str(caught.value)
    assert "2 problem(s)" in message
    assert "line 10: a malformed row: expected 2 fields (filename,label), found 3" in message
    assert "line 11: a malformed row: expected 2 fields (filename,label), found 3" in message
    assert "file not found" not in message and "has no images" not in message and "'many'" not in message
    assert "without a label" not in caplog.text  # stop-0.png is named, though on a malformed row


def samples(counts: dict[int, int]) -> list[Sample]:
    return [Sample(Path(f"/data/{label}-{i:03d}.png"), label) for label, n in counts.items() for i in range(n)]


def test_split_is_stratified_with_the_right_fractions():
    everything = samples({0: 40, 1: 20})
    train, val = split_samples(everything, 0.25, seed=0)
    assert Counter(s.label for s in val) == {0: 10, 1: 5} and Counter(s.label for s in train) == {0: 30, 1: 15}
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(everything)


def test_split_puts_at_least_one_image_of_every_class_in_validation():
    train, val = split_samples(samples({0: 100, 1: 2, 2: 3}), 0.1, seed=0)
    assert Counter(s.label for s in val) == {0: 10, 1: 1, 2: 1}


def test_split_depends_on_the_seed_only():
    everything = samples({0: 30, 1: 30})
    shuffled = random.Random(1).sample(everything, len(everything))
    assert split_samples(everything, 0.2, seed=7) == split_samples(shuffled, 0.2, seed=7)
    assert split_samples(everything, 0.2, seed=7)[1] != split_samples(everything, 0.2, seed=8)[1]


def test_split_refuses_a_class_of_one_and_a_bad_fraction():
    with pytest.raises(DataError, match="class 'stop'.*fewer than 2 images"):
        split_samples(samples({0: 5, 1: 1}), 0.2, seed=0, class_names=["not_stop", "stop"])
    with pytest.raises(DataError, match="class 1 \\(e.g. /data/1-000.png\\)"):
        split_samples(samples({0: 5, 1: 1}), 0.2, seed=0)
    for fraction in (0, 1, 1.5):
        with pytest.raises(DataError, match="val_fraction"):
            split_samples(samples({0: 5, 1: 5}), fraction, seed=0)


def test_kfold_validates_every_sample_exactly_once():
    everything = samples({0: 23, 1: 12})
    folds = kfold_samples(everything, 5, seed=3)
    assert len(folds) == 5
    assert Counter(s for _, val in folds for s in val) == Counter(everything)
    for train, val in folds:
        assert set(train).isdisjoint(val) and len(train) + len(val) == 35
        assert Counter(s.label for s in val)[1] in (2, 3)  # stratified: 12 stop images over 5 folds
    assert kfold_samples(everything[::-1], 5, seed=3) == folds
    assert kfold_samples(everything, 5, seed=4) != folds
    with pytest.raises(DataError, match="class 'stop'.*fewer than 5"):
        kfold_samples(samples({0: 9, 1: 4}), 5, seed=0, class_names=["not_stop", "stop"])


def test_kfold_keeps_a_group_in_one_fold_and_splits_once_for_the_same_question(monkeypatch):
    everything = samples({0: 23, 1: 12})
    groups = {str(s.path): 7 for s in everything[:3]} | {str(everything[-1].path): 7}
    splits, split = [], datasets.StratifiedGroupKFold.split
    monkeypatch.setattr(datasets.StratifiedGroupKFold, "split", lambda *a, **k: splits.append(1) or split(*a, **k))
    datasets._fold_indices.cache_clear()
    folds = kfold_samples(everything, 5, seed=3, groups=groups)
    grouped = {s for s in everything if str(s.path) in groups}
    assert sum(grouped <= set(val) for _, val in folds) == 1  # the group's four images: one fold's
    assert kfold_samples(list(everything), 5, seed=3, groups=dict(groups)) == folds and len(splits) == 1
    assert kfold_samples(everything, 5, seed=4, groups=groups) != folds and len(splits) == 2


def test_the_real_cv_studio_export_loads(shared_photos):
    data = load_data(shared_photos)
    assert data.layout == "cvstudio" and data.class_names == ["not_stop", "stop"]
    assert len(data.samples) == 197 and data.class_counts() == {"not_stop": 100, "stop": 97}
    assert all(sample.path.parent == shared_photos / "images" and sample.path.is_file() for sample in data.samples)


def test_a_labels_csv_beside_class_folders_is_said_to_win(tmp_path, make_images, caplog):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="folders")
    (root / "labels.csv").write_text("filename,label\nstop/stop-0.png,stop\nnot_stop/not_stop-0.png,not_stop\n")
    with caplog.at_level("WARNING"):
        data = load_data(root)
    assert data.layout == "csv" and len(data.samples) == 2
    assert "reading the labels from labels.csv, not from the class folders beside it" in caplog.text
    caplog.clear()
    csv_root = make_images(tmp_path / "csv", {"stop": 2, "not_stop": 2}, layout="csv")  # labels.csv + images/
    with caplog.at_level("WARNING"):
        load_data(csv_root)
    assert "class folders" not in caplog.text


def test_a_folder_spelt_another_way_is_the_models_class(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"Not-Stop": 2, "stop": 2}, layout="folders")
    data = load_data(root, class_names=["not_stop", "stop"])
    assert sorted(data.class_counts().items()) == [("not_stop", 2), ("stop", 2)]
    with pytest.raises(DataError, match="'Not-Stop' is not one of the classes"):
        load_data(root, class_names=["not_stop", "not-stop", "stop"])  # two would match: ambiguous, refused
