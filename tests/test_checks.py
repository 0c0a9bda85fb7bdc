"""checks: planted exact and near duplicates are found, a clean set gives nothing, cross-split copies are flagged."""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stopsign.data.checks import check_data, find_duplicates

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cvstudio-stop-signs" / "images"


@dataclass
class Sample:
    path: Path
    label: int


def distinct_image(seed: int, size=(320, 240)) -> Image.Image:
    """A photo-like picture: a smooth random colour field with a few random shapes on it."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(4):
        x, y = rng.integers(0, size[0] - 60), rng.integers(0, size[1] - 60)
        box = [int(x), int(y), int(x + rng.integers(30, 120)), int(y + rng.integers(30, 120))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return field


@pytest.fixture
def clean_set(tmp_path) -> list[Path]:
    paths = []
    for seed in range(10):
        path = tmp_path / f"img{seed}.jpg"
        distinct_image(seed).save(path, quality=92)
        paths.append(path)
    return paths


def test_clean_set_has_no_duplicates(clean_set):
    found = find_duplicates(clean_set)
    assert found["exact"] == [] and found["near"] == [] and found["unreadable"] == []


def test_planted_exact_and_near_duplicates_are_found(clean_set, tmp_path):
    copy = tmp_path / "renamed.jpg"
    shutil.copyfile(clean_set[0], copy)
    resized = tmp_path / "resized.png"
    Image.open(clean_set[1]).resize((160, 120), Image.Resampling.BILINEAR).save(resized)
    reencoded = tmp_path / "reencoded.jpg"
    Image.open(clean_set[2]).save(reencoded, quality=60)

    found = find_duplicates(clean_set + [copy, resized, reencoded])

    assert found["exact"] == [sorted([str(clean_set[0]), str(copy)])]
    near = [group["paths"] for group in found["near"]]
    assert sorted([str(clean_set[1]), str(resized)]) in near
    assert sorted([str(clean_set[2]), str(reencoded)]) in near
    assert len(near) == 2  # the exact copy is not reported again as a near duplicate
    assert all(group["max_distance"] <= 6 for group in found["near"])


def test_unreadable_files_are_skipped_without_a_warning(clean_set, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    found = find_duplicates(clean_set + [broken])
    assert found["unreadable"] == [str(broken)] and found["exact"] == []
    report = check_data({"train": [Sample(p, 0) for p in clean_set[:5]] + [Sample(broken, 1)]}, ["a", "b"])
    assert not any("broken" in warning for warning in report["warnings"])


def test_check_data_flags_copies_across_train_and_val(clean_set, tmp_path):
    leaked = tmp_path / "leaked.jpg"
    shutil.copyfile(clean_set[0], leaked)
    kept_in_train = tmp_path / "again.jpg"
    shutil.copyfile(clean_set[1], kept_in_train)
    train = [Sample(p, i % 2) for i, p in enumerate(clean_set[:8])] + [Sample(kept_in_train, 1)]
    val = [Sample(p, i % 2) for i, p in enumerate(clean_set[8:])] + [Sample(leaked, 0)]

    report = check_data({"train": train, "val": val}, ["not_stop", "stop"])

    assert report["class_counts"] == {"train": {"not_stop": 4, "stop": 5}, "val": {"not_stop": 2, "stop": 1}}
    assert report["cross_split"] == 1
    by_files = {frozenset(Path(f["path"]).name for f in g["files"]): g for g in report["exact_duplicates"]}
    leak = by_files[frozenset({"img0.jpg", "leaked.jpg"})]
    assert leak["cross_split"] and {f["split"] for f in leak["files"]} == {"train", "val"}
    assert not by_files[frozenset({"img1.jpg", "again.jpg"})]["cross_split"]
    assert any("more than one split" in warning for warning in report["warnings"])


def test_check_data_reports_imbalance_and_conflicting_labels(clean_set, tmp_path):
    copy = tmp_path / "relabelled.jpg"
    shutil.copyfile(clean_set[9], copy)
    train = [Sample(p, 0) for p in clean_set[:8]] + [Sample(clean_set[9], 1), Sample(copy, 0)]

    report = check_data({"train": train}, ["not_stop", "stop"])

    assert report["imbalance"]["ratio"] == 9.0
    assert "imbalanced" in report["imbalance"]["warning"]
    assert report["exact_duplicates"][0]["labels_disagree"]
    assert any("different labels" in warning for warning in report["warnings"])


def test_balanced_clean_data_gives_no_warnings(clean_set):
    train = [Sample(p, i % 2) for i, p in enumerate(clean_set[:8])]
    val = [Sample(p, i % 2) for i, p in enumerate(clean_set[8:])]
    report = check_data({"train": train, "val": val}, ["not_stop", "stop"])
    assert report["warnings"] == [] and report["cross_split"] == 0 and report["imbalance"]["warning"] is None


@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason=f"the shared real photos are not at {REAL_IMAGES}")
def test_real_photos_exact_copies_found_quickly():
    paths = sorted(REAL_IMAGES.glob("*.jpg"))
    start = time.perf_counter()
    found = find_duplicates(paths)
    seconds = time.perf_counter() - start
    assert len(found["exact"]) >= 3  # the export holds a few copies under different names
    for group in found["exact"]:
        sizes = {os.path.getsize(p) for p in group}
        assert len(sizes) == 1
    assert seconds < 20  # ~0.6 s on two cores; full-size decoding would be several times slower


def test_hash_cache_gives_identical_results_and_notices_edits_and_damage(clean_set, tmp_path, monkeypatch):
    cache = tmp_path / "hash-cache"
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(clean_set[0], copy)
    paths = clean_set + [copy]
    fresh = find_duplicates(paths)
    assert find_duplicates(paths, cache_dir=cache)["exact"] == fresh["exact"]  # cold: fills the cache
    monkeypatch.setattr("stopsign.data.checks.perceptual_hash", lambda image: pytest.fail("a warm run decoded a file"))
    warm = find_duplicates(paths, cache_dir=cache)
    assert warm == fresh
    monkeypatch.undo()

    distinct_image(99).save(copy, quality=92)  # edited: new size and mtime, so hashed again
    assert find_duplicates(paths, cache_dir=cache)["exact"] == []
    for file in cache.glob("*.json"):
        file.write_text("{not json")
    assert find_duplicates(paths, cache_dir=cache)["exact"] == []  # a damaged cache is recomputed
