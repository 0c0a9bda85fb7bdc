"""review: suspected label errors found out of fold, decisions written back to each layout, undo, conflicts,
and the review app refusing hostile input."""

import csv
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from stopsign.cli import main
from stopsign.data.datasets import load_data
from stopsign.data.labels import Conflict, LabelStore
from stopsign.deploy.review import create_review_app
from stopsign.errors import DataError
from stopsign.training.review import Review, Suspect, find_suspects

from conftest import LAYOUTS, make_image


def labels_of(root) -> dict[str, str]:
    """{file name: label} of what load_data reads now."""
    data = load_data(root)
    return {s.path.name: data.class_names[s.label] for s in data.samples}


def tint_strongly(folder: Path) -> None:
    """Each image blended further toward its class's tint (conftest's: red not_stop, green stop), so that the tiny
    backbone's features tell 16-image classes apart with room to spare; each keeps its own grid (no duplicates)."""
    tints = {"not_stop": (220, 30, 30), "stop": (30, 160, 60)}
    for file in folder.glob("*.png"):
        pixels = np.asarray(Image.open(file).convert("RGB"), dtype=float)
        tint = tints["not_stop" if file.name.startswith("not_stop") else "stop"]
        Image.fromarray((0.4 * pixels + 0.6 * np.array(tint)).astype(np.uint8)).save(file)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


# --- suspects --------------------------------------------------------------------------------------------

def test_planted_flips_come_first_with_copies_and_unreadable_files_listed(tmp_path, make_images, tiny_backbone,
                                                                          capsys):
    root = make_images(tmp_path / "data", {"stop": 16, "not_stop": 16}, layout="cvstudio")
    tint_strongly(root / "images")
    document = json.loads((root / "_annotations.json").read_text())
    rng = np.random.default_rng(7)
    planted = {f"{name}-{i}.png" for name in ("stop", "not_stop") for i in rng.choice(15, 2, replace=False)}
    for name in planted:
        entry = document["annotations"][name][0]
        entry["label"] = "not_stop" if entry["label"] == "stop" else "stop"
    shutil.copy(root / "images/stop-15.png", root / "images/copy.png")  # the same photo, another label
    document["annotations"]["copy.png"] = [{"label": "not_stop", "id": "copy"}]
    (root / "images/broken.png").write_bytes(b"not an image")
    document["annotations"]["broken.png"] = [{"label": "stop", "id": "broken"}]
    (root / "_annotations.json").write_text(json.dumps(document))

    out = tmp_path / "review"
    assert main(["-q", "review", str(root), "--no-serve", "--backbone", "tiny", "--tiles", "1", "--pooling", "avg",
                 "--workers", "0", "--folds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 suspected label errors, 1 unreadable, 0 new photos among 34 images (3-fold" in printed
    assert str(out / "label_issues.csv") in printed
    rows = read_csv(out / "label_issues.csv")
    assert list(rows[0]) == ["path", "given_label", "suggested_label", "score", "reason"]
    ranked = [row for row in rows if row["reason"].startswith("held-out probability")]
    assert {Path(row["path"]).name for row in ranked[:5]} >= planted  # the 4 planted flips and the odd copy first
    for row in ranked:
        if Path(row["path"]).name in planted:
            assert row["suggested_label"] != row["given_label"] and float(row["score"]) < 0.5
    assert [float(row["score"]) for row in ranked] == sorted(float(row["score"]) for row in ranked)
    copies = {Path(row["path"]).name: row for row in rows if "a copy of" in row["reason"]}
    assert set(copies) == {"copy.png", "stop-15.png"}
    assert "stop-15.png (stop)" in copies["copy.png"]["reason"]
    broken = [row for row in rows if row["path"] == "images/broken.png"]
    assert len(broken) == 1 and broken[0]["reason"].startswith("could not be read") and broken[0]["score"] == ""


def test_review_shows_its_progress_and_quiet_silences_it(tmp_path, make_images, tiny_backbone, capsys):
    root = make_images(tmp_path / "data", {"stop": 6, "not_stop": 6}, layout="folders")
    new = tmp_path / "new"
    new.mkdir()
    make_image(1001).save(new / "photo.png")
    command = ["review", str(root), "--no-serve", "--backbone", "tiny", "--tiles", "1", "--pooling", "avg",
               "--workers", "0", "--folds", "2", "--add", str(new), "--out", str(tmp_path / "review")]
    assert main(command) == 0
    shown = capsys.readouterr().err
    assert "hashing:" in shown and "folds:" in shown and "/2 [" in shown  # tqdm's "folds:   0%|   | 0/2 [..."
    assert "labelling 1 new photo(s): a head trained on all 12 labelled images" in shown
    assert main(["-q", *command]) == 0
    quiet = capsys.readouterr().err
    assert "%|" not in quiet and "labelling" not in quiet  # no bar, no progress line (a warning may remain)


def test_add_names_the_subfolders_it_does_not_read(tmp_path, make_images, tiny_backbone, caplog):
    root = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="folders")
    (tmp_path / "new" / "monday").mkdir(parents=True)
    make_image(1001).save(tmp_path / "new" / "monday" / "photo.png")
    review = find_suspects(root, backbone="tiny", tiles=1, pooling="avg", num_workers=0, out=tmp_path / "review",
                           add=tmp_path / "new", folds=2)
    assert not [s for s in review.suspects if s.new]
    assert (f"--add {tmp_path / 'new'}: no images directly in that folder (its subfolders are not read: give one "
            "of them, monday)") in caplog.text


def test_new_photos_get_the_model_label_least_certain_first(tmp_path, make_images, tiny_backbone):
    root = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders")
    new = tmp_path / "new"
    new.mkdir()
    make_image(1001, tint=(220, 30, 30)).save(new / "red.png")  # conftest's tint of not_stop
    make_image(1002, tint=(30, 160, 60)).save(new / "green.png")
    make_image(1003, tint=(125, 95, 45)).save(new / "between.png")  # halfway: the least certain
    review = find_suspects(root, backbone="tiny", tiles=1, pooling="avg", num_workers=0, out=tmp_path / "review",
                           add=new, folds=2)
    added = [s for s in review.suspects if s.new]
    assert {s.path.name: s.suggested for s in added if s.path.name != "between.png"} == \
        {"red.png": "not_stop", "green.png": "stop"}
    assert [s.score for s in added] == sorted(s.score for s in added) and added[0].path.name == "between.png"
    assert all(len(s.neighbours) == 5 and s.given is None for s in added)
    rows = {row["path"]: row for row in read_csv(review.issues_file)}
    assert rows[str(new / "red.png")]["reason"] == "unlabelled (--add)"

    # on the page: keep takes the suggestion and copies the photo into its class folder; undo takes it back
    client = TestClient(create_review_app(review, out=tmp_path / "review"))
    items = {item["name"]: item for item in client.get("/api/suspects").json()["items"]}
    green = items["green.png"]
    assert green["new"] and green["label"] is None and green["suggested"] == "stop"
    answer = client.post("/api/decision", json={"id": green["id"], "action": "keep", "against": None})
    assert answer.status_code == 200 and answer.json()["item"]["label"] == "stop"
    assert answer.json()["added"] == {"not_stop": 0, "stop": 1}  # the page shows what each class has received
    assert (root / "stop/green.png").read_bytes() == (new / "green.png").read_bytes()
    assert labels_of(root)["green.png"] == "stop" and len(labels_of(root)) == 17
    assert client.get(f"/api/photo/{green['id']}").content == (new / "green.png").read_bytes()
    again = client.post("/api/decision", json={"id": green["id"], "action": "keep", "against": None})
    assert again.status_code == 409  # another page that still shows it as new
    red = items["red.png"]
    assert client.post("/api/decision", json={"id": red["id"], "action": "exclude", "against": None}).json()[
        "reviewed"] == 2  # left out: counted, nothing copied
    assert not (root / "not_stop/red.png").exists()
    client.post("/api/undo", json={})
    assert client.post("/api/undo", json={}).json()["added"] == {"not_stop": 0, "stop": 0}
    assert not (root / "stop/green.png").exists() and (new / "green.png").is_file() and len(labels_of(root)) == 16


# --- writing back ------------------------------------------------------------------------------------------

def data_set(tmp_path, make_images, layout):
    counts = {"train": {"stop": 3, "not_stop": 3}, "val": {"stop": 2, "not_stop": 2}} if layout == "splits" \
        else {"stop": 3, "not_stop": 3}
    root = make_images(tmp_path / "data", counts, layout=layout)
    prefix = "train-" if layout == "splits" else ""
    new = tmp_path / "new.png"
    make_image(999).save(new)
    return root, f"{prefix}stop-0.png", f"{prefix}not_stop-1.png", new


def source_text(root: Path, layout: str) -> str:
    return {"cvstudio": lambda: (root / "_annotations.json").read_text(),
            "csv": lambda: (root / "labels.csv").read_text()}.get(layout, lambda: "")()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decisions_are_written_back_and_undone_in_every_layout(tmp_path, make_images, layout):
    root, relabel, drop, new = data_set(tmp_path, make_images, layout)
    before, original = labels_of(root), source_text(root, layout)
    paths = {s.path.name: s.path for s in load_data(root).samples}
    store = LabelStore(root, tmp_path / "review")
    store.decide(store.key(paths[relabel]), "set", label="not_stop", against="stop", by="a")
    store.decide(store.key(paths[drop]), "exclude", against="not_stop", by="a")
    store.decide(store.key(paths["not_stop-0.png" if layout != "splits" else "val-not_stop-0.png"]), "keep",
                 against="not_stop", by="a")
    added = store.add(new, "stop", by="a")

    after = labels_of(root)
    assert after.pop(relabel) == "not_stop" and drop not in after and after.pop(Path(added["file"]).name) == "stop"
    assert after == {name: label for name, label in before.items() if name not in (relabel, drop)}
    assert paths[drop].name in {p.name for p in root.rglob("*.png")}  # excluded, never deleted
    assert (new.read_bytes() == store.path(added["file"]).read_bytes()) and new.is_file()
    backups = list((tmp_path / "review/backups").iterdir())
    assert len(backups) == 1  # one backup, of the original, before the first change
    if layout in ("cvstudio", "csv"):
        assert backups[0].read_text() == original
    else:
        assert {row["label"] for row in read_csv(backups[0])} == {"stop", "not_stop"}
        assert len(read_csv(backups[0])) == len(before)
    log = [json.loads(line) for line in (tmp_path / "review/decisions.jsonl").read_text().splitlines()]
    assert [(r["action"], r["before"], r["after"]) for r in log] == [
        ("set", "stop", "not_stop"), ("exclude", "not_stop", None), ("keep", "not_stop", "not_stop"),
        ("add", None, "stop")]
    assert all(r["when"] and r["by"] == "a" for r in log)

    for _ in range(4):
        store.undo(by="a")
    assert labels_of(root) == before
    assert not store.path(added["file"])  # the undone addition's copy is gone; the photo itself stays
    if layout == "cvstudio":
        assert json.loads(source_text(root, layout)) == json.loads(original)
    elif layout == "csv":
        assert source_text(root, layout) == original
    with pytest.raises(DataError, match="nothing to undo"):
        store.undo(by="a")


def test_the_cvstudio_file_keeps_its_order_and_unknown_fields(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="cvstudio")
    document = json.loads((root / "_annotations.json").read_text())
    document = {"info": {"exported": "2026-11-30", "tool": "cvstudio"}, **document, "zz_extra": [1, 2.5, None]}
    for i, entry in enumerate(document["annotations"].values()):
        entry[0]["confidence"] = i / 10  # a field stopsign does not know
    text = json.dumps(document, indent=2)
    (root / "_annotations.json").write_text(text)
    store = LabelStore(root, tmp_path / "review")
    store.decide("stop-1.png", "set", label="not_stop", against="stop")
    store.decide("not_stop-2.png", "exclude", against="not_stop")

    written = (root / "_annotations.json").read_text()
    now = json.loads(written)
    assert written.startswith('{\n  "info"')  # indented as it was
    assert list(now) == list(document) and now["labels"] == document["labels"]
    assert list(now["annotations"]) == list(document["annotations"])
    changed = {key for key in now["annotations"] if now["annotations"][key] != document["annotations"][key]}
    assert changed == {"stop-1.png", "not_stop-2.png"}
    assert now["annotations"]["stop-1.png"] == [{"label": "not_stop", "id": "id-1", "confidence": 0.1}]
    assert now["annotations"]["not_stop-2.png"][0]["stopsign_excluded"] is True
    assert {k: v for k, v in now.items() if k != "annotations"} == {k: v for k, v in document.items()
                                                                    if k != "annotations"}
    # a compact export (CV Studio's own) stays on one line
    (root / "_annotations.json").write_text(json.dumps(document, separators=(",", ":")))
    LabelStore(root, tmp_path / "review2").decide("stop-0.png", "set", label="not_stop", against="stop")
    assert "\n" not in (root / "_annotations.json").read_text()


def test_a_decision_against_a_changed_label_is_a_conflict_and_undo_never_overwrites(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="cvstudio")
    alice, bob = LabelStore(root, tmp_path / "review"), LabelStore(root, tmp_path / "review")
    alice.decide("stop-0.png", "set", label="not_stop", against="stop", by="alice")
    with pytest.raises(Conflict, match="it was 'stop' when you saw it and is 'not_stop' now") as refused:
        bob.decide("stop-0.png", "exclude", against="stop", by="bob")
    assert refused.value.current == "not_stop"
    bob.decide("stop-0.png", "set", label="stop", against="not_stop", by="bob")  # decided again, on what is there
    with pytest.raises(Conflict, match="changed after that decision"):
        alice.undo(by="alice")
    assert labels_of(root)["stop-0.png"] == "stop"
    with pytest.raises(DataError, match="unknown class 'cat'"):
        alice.decide("stop-1.png", "set", label="cat", against="stop")


def test_concurrent_decisions_lose_no_update(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="cvstudio")
    stores = [LabelStore(root, tmp_path / "review") for _ in range(2)]  # two server workers
    results, barrier = {}, threading.Barrier(16)

    def decide(i: int) -> None:
        barrier.wait()
        key = f"stop-{i % 8}.png" if i < 8 else "not_stop-0.png"  # 8 entries, and 8 reviewers on one entry
        try:
            stores[i % 2].decide(key, "set", label="not_stop" if i < 8 else "stop", against="stop" if i < 8
                                 else "not_stop", by=str(i))
            results[i] = "ok"
        except Conflict:
            results[i] = "conflict"

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(8)] == ["ok"] * 8
    assert sorted(results[i] for i in range(8, 16)) == ["conflict"] * 7 + ["ok"]
    labels = labels_of(root)
    assert all(labels[f"stop-{i}.png"] == "not_stop" for i in range(8)) and labels["not_stop-0.png"] == "stop"
    log = (tmp_path / "review/decisions.jsonl").read_text().splitlines()
    assert len(log) == 9 and sorted(json.loads(line)["n"] for line in log) == list(range(1, 10))


# --- the app -------------------------------------------------------------------------------------------------

@pytest.fixture
def app_over(tmp_path, make_images):
    """A review app over a CV Studio export of 4 + 4 images whose suspects are its first three (no backbone)."""
    root = make_images(tmp_path / "data", {"stop": 4, "not_stop": 4}, layout="cvstudio")
    data = load_data(root)
    names = data.class_names
    samples = sorted(data.samples, key=lambda s: s.path.name)
    suspects = [Suspect(s.path, names[s.label], names[1 - s.label], 0.1, ["planted"],
                        {names[s.label]: 0.1, names[1 - s.label]: 0.9},
                        [(other.path, names[other.label], 0.9) for other in samples[4:6]]) for s in samples[:3]]
    review = Review(root, data, suspects, 5, tmp_path / "review/label_issues.csv", 0.0)
    return TestClient(create_review_app(review, out=tmp_path / "review")), root, suspects


def test_the_app_lists_decides_and_undoes(app_over):
    client, root, suspects = app_over
    listing = client.get("/api/suspects").json()
    assert listing["classes"] == ["not_stop", "stop"] and (listing["reviewed"], listing["total"]) == (0, 3)
    first = listing["items"][0]
    assert first["name"] == f"images/{suspects[0].path.name}" and first["neighbours"][0]["label"] in listing["classes"]
    assert client.get("/api/photo/0").content == suspects[0].path.read_bytes()
    assert client.get("/api/photo/0/neighbour/1").content == suspects[0].neighbours[1][0].read_bytes()
    answer = client.post("/api/decision", json={"id": 0, "action": "set", "label": "stop", "against": first["given"]})
    assert answer.status_code == 200 and answer.json()["reviewed"] == 1
    assert labels_of(root)[suspects[0].path.name] == "stop"
    stale = client.post("/api/decision", json={"id": 0, "action": "exclude", "against": first["given"]})
    assert stale.status_code == 409 and stale.json()["current"] == "stop"
    assert "changed meanwhile" in stale.json()["detail"]
    assert labels_of(root)[suspects[0].path.name] == "stop"  # the conflict changed nothing
    undone = client.post("/api/undo", json={})
    assert undone.status_code == 200 and undone.json()["reviewed"] == 0
    assert labels_of(root)[suspects[0].path.name] == first["given"]
    assert client.post("/api/undo", json={}).status_code == 404


def test_the_app_refuses_hostile_input(app_over, tmp_path):
    client, root, suspects = app_over
    before = (root / "_annotations.json").read_text()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"private")
    for url in ("/api/photo/3", "/api/photo/-1", "/api/photo/0/neighbour/2", "/api/photo/..%2F..%2Fsecret.png",
                f"/api/photo/{secret}", "/api/photo/0/neighbour/..%2F_annotations.json"):
        response = client.get(url)
        assert response.status_code in (404, 422) and b"private" not in response.content, url
    suspects[1].path.unlink()
    suspects[1].path.symlink_to(secret)  # a file of the data set swapped for a link out of it
    refused = client.get("/api/photo/1")
    assert refused.status_code == 403 and "not a file of the data set" in refused.json()["detail"]
    unknown = client.post("/api/decision", json={"id": 0, "action": "set", "label": "cat", "against": "not_stop"})
    assert unknown.status_code == 422 and "unknown class 'cat'" in unknown.json()["detail"]
    assert client.post("/api/decision", json={"id": 0, "action": "delete", "against": "stop"}).status_code == 422
    assert client.post("/api/decision", json={"id": 99, "action": "keep", "against": "stop"}).status_code == 404
    huge = client.post("/api/decision", content=b'{"id": 0, "action": "keep", "label": "' + b"x" * 100_000 + b'"}',
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "a decision is at most 16384 bytes" in huge.json()["detail"]
    chunked = client.post("/api/decision", content=iter([b"x" * 8_000] * 4),  # no length declared
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert (root / "_annotations.json").read_text() == before
    assert not (tmp_path / "review/decisions.jsonl").exists()
    page = client.get("/")
    assert page.status_code == 200 and "http://" not in page.text and "https://" not in page.text


@pytest.mark.slow
def test_flips_planted_in_a_copy_of_the_shared_photos_are_found(shared_photos, photo_features, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(shared_photos / "images", copy / "images")
    document = json.loads((shared_photos / "_annotations.json").read_text())
    names = sorted(document["annotations"])
    planted = {names[i] for i in np.random.default_rng(0).choice(len(names), 10, replace=False)}
    for name in planted:
        entry = document["annotations"][name][0]
        entry["label"] = "stop" if entry["label"] == "not_stop" else "not_stop"
    (copy / "_annotations.json").write_text(json.dumps(document, separators=(",", ":")))
    # The review defaults (5 folds, the regions head) on the whole image only: one backbone pass per photo instead
    # of five, the pass test_serve's model and test_integration's evaluation cache too. Decoding in this process:
    # one worker would run the backbone here beside it, two threads on a busy machine's two cores.
    review = find_suspects(copy, backbone="efficientnet_lite0", tiles=1, out=tmp_path / "review", num_workers=0,
                           cache_dir=photo_features)
    first = {s.path.name for s in review.suspects[:20]}
    assert len(planted & first) >= 8, (sorted(planted - first), len(review.suspects))  # 9 here; bench/review_flips.py: the defaults


def test_a_decision_after_a_torn_log_line_is_logged_and_undone(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="cvstudio")
    store = LabelStore(root, tmp_path / "review")
    store.decide("stop-0.png", "set", label="not_stop", against="stop", by="a")
    with open(tmp_path / "review/decisions.jsonl", "a") as log:
        log.write('{"n": 2, "when": "2026-')  # a writer killed in the middle of its line
    store.decide("stop-1.png", "set", label="not_stop", against="stop", by="a")
    assert [(r["n"], r["file"]) for r in store.decisions()] == [(1, "stop-0.png"), (2, "stop-1.png")]
    assert store.undo(by="a")["file"] == "stop-1.png"
    assert labels_of(root)["stop-1.png"] == "stop" and labels_of(root)["stop-0.png"] == "not_stop"


@pytest.mark.parametrize("layout", ["folders", "cvstudio"])
def test_two_reviewers_first_changes_in_one_second_keep_the_original_backup(tmp_path, make_images, monkeypatch,
                                                                             layout):
    from stopsign.data import labels

    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout=layout)
    original = labels_of(root)
    monkeypatch.setattr(labels.time, "strftime", lambda *_: "20261202-101500")  # both within one second
    alice, bob = LabelStore(root, tmp_path / "review"), LabelStore(root, tmp_path / "review")
    paths = {s.path.name: s.path for s in load_data(root).samples}
    alice.decide(alice.key(paths["stop-0.png"]), "set", label="not_stop", against="stop")
    bob.decide(bob.key(paths["stop-1.png"]), "set", label="not_stop", against="stop")
    backups = sorted((tmp_path / "review/backups").iterdir())
    assert len(backups) == 2 and alice.backup != bob.backup
    if layout == "folders":
        assert {Path(row["filename"]).name: row["label"] for row in read_csv(alice.backup)} == original


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_added_photo_named_like_an_entry_gets_a_name_of_its_own(tmp_path, make_images, layout):
    root, relabel, _, _ = data_set(tmp_path, make_images, layout)
    new = tmp_path / "incoming" / relabel  # a camera's next IMG_0001.jpg: the name of a photo already labelled
    new.parent.mkdir()
    make_image(998).save(new)
    (original_file,) = [s.path for s in load_data(root).samples if s.path.name == relabel]
    store = LabelStore(root, tmp_path / "review")
    original_key = store.key(original_file)
    added = store.add(new, "not_stop")  # another class: for class folders, another folder
    assert added["file"] != original_key and store.path(added["file"]).read_bytes() == new.read_bytes()
    assert store.label(original_key) == "stop" and original_file.is_file()
    store.decide(original_key, "set", label="not_stop", against="stop")  # both entries can still be decided on
    store.undo()
    store.undo()
    assert store.label(original_key) == "stop" and not store.path(added["file"])


@pytest.mark.parametrize("layout", ["cvstudio", "csv"])
def test_an_added_photo_never_takes_over_the_entry_of_an_excluded_file_since_deleted(tmp_path, make_images, layout):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout=layout)
    store = LabelStore(root, tmp_path / "review")
    (file,) = [s.path for s in load_data(root).samples if s.path.name == "stop-0.png"]
    key = store.key(file)
    store.decide(key, "exclude", against="stop")
    file.unlink()  # excluded, then thrown away
    new = tmp_path / "stop-0.png"  # a new photo that happens to have its name
    make_image(997).save(new)
    added = store.add(new, "not_stop")
    assert added["file"] != key and store.label(added["file"]) == "not_stop"
    assert store.path(added["file"]).name != "stop-0.png"  # not the file the excluded entry names
    assert store.label(key) is None and store.backend.entry(store.backend.load(), key)[1]  # still there, excluded
    store.undo()  # the addition: its own entry and copy go, the excluded one stays
    assert store.label(key) is None and store.backend.entry(store.backend.load(), key)[1]
    assert len(labels_of(root)) == 5


def test_review_refuses_a_url_and_the_local_copy_of_one_where_decisions_would_be_lost(tmp_path, make_images):
    from stopsign.cache import REMOTE, store_dir
    from stopsign.errors import StopsignError

    with pytest.raises(StopsignError, match="copy the data to a folder of your own") as refused:
        find_suspects("s3://bucket/export/", out=tmp_path / "review")
    assert "mirror" not in str(refused.value)  # never advice to review the cache
    mirror = make_images(store_dir(REMOTE) / "export-0123456789abcdef" / "files", {"stop": 3, "not_stop": 3},
                         layout="cvstudio")
    with pytest.raises(StopsignError, match="local copy of data at a URL, a cache"):
        find_suspects(mirror, out=tmp_path / "review")


def test_undo_keeps_an_excluded_column_the_csv_had_before_review(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout="csv")
    rows = read_csv(root / "labels.csv")
    text = "filename,label,excluded\n" + "".join(f"{row['filename']},{row['label']},\n" for row in rows)
    (root / "labels.csv").write_text(text)  # the user's own column, no row excluded yet
    store = LabelStore(root, tmp_path / "review")
    key = rows[0]["filename"]
    store.decide(key, "set", label="not_stop" if rows[0]["label"] == "stop" else "stop", against=rows[0]["label"])
    store.undo()
    assert (root / "labels.csv").read_text() == text


@pytest.mark.parametrize("layout", ["csv", "cvstudio"])
def test_undoing_an_exclusion_of_an_entry_removed_since_is_a_conflict(tmp_path, make_images, layout):
    root = make_images(tmp_path / "data", {"stop": 3, "not_stop": 3}, layout=layout)
    store = LabelStore(root, tmp_path / "review")
    (file,) = [s.path for s in load_data(root).samples if s.path.name == "stop-0.png"]
    key = store.key(file)
    store.decide(key, "exclude", against="stop")
    if layout == "csv":  # someone deletes the row by hand meanwhile
        lines = (root / "labels.csv").read_text().splitlines(keepends=True)
        (root / "labels.csv").write_text("".join(line for line in lines if not line.startswith(key + ",")))
    else:
        document = json.loads((root / "_annotations.json").read_text())
        del document["annotations"][key]
        (root / "_annotations.json").write_text(json.dumps(document))
    before = source_text(root, layout)
    with pytest.raises(Conflict, match="no longer in the data set"):
        store.undo()
    assert source_text(root, layout) == before


def test_the_first_new_photos_to_label_cover_both_classes(tmp_path, make_images, tiny_backbone):
    root = make_images(tmp_path / "data", {"stop": 8, "not_stop": 8}, layout="folders")
    new = tmp_path / "new"
    new.mkdir()
    for i in range(6):  # red-leaning, unsure: what least-certain-first would ask for first
        make_image(2000 + i, tint=(150 + 3 * i, 80, 42)).save(new / f"reddish-{i}.png")
    for i in range(3):
        make_image(3000 + i, tint=(30, 160, 60)).save(new / f"green-{i}.png")
    out = tmp_path / "review"
    assert main(["-q", "review", str(root), "--no-serve", "--backbone", "tiny", "--tiles", "1", "--pooling", "avg",
                 "--workers", "0", "--folds", "2", "--add", str(new), "--out", str(out)]) == 0
    added = [row for row in read_csv(out / "label_issues.csv") if row["reason"] == "unlabelled (--add)"]
    least_certain = sorted(added, key=lambda row: float(row["score"]))
    assert {row["suggested_label"] for row in least_certain[:4]} == {"not_stop"}
    assert {row["suggested_label"] for row in added[:4]} == {"not_stop", "stop"}
