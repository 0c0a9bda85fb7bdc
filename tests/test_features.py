"""The feature store and the backbone pass: keys, atomic writes, agreement with the uncached path."""

import multiprocessing
import shutil

import numpy as np
import pytest
import torch

from stopsign.model.backbones import BACKBONES
from stopsign.cli import main
from stopsign.cache import cache_root
from stopsign.cache import cache_info
from stopsign.model.features import FeatureExtractor
from stopsign.store import ShardStore
from stopsign.model.transforms import preprocess, view_params
from stopsign.data.images import read_image


@pytest.fixture
def images(tmp_path, make_images):
    root = make_images(tmp_path / "data", {"a": 3, "b": 3}, layout="folders")
    return sorted(root.glob("*/*.png"))


def extractor(cache, name="tiny"):
    return FeatureExtractor(name, cache_dir=cache, num_workers=0)


def test_warm_cache_computes_nothing_and_rename_still_hits(tmp_path, images, tiny_backbone):
    cold = extractor(tmp_path / "cache").extract(images, views=[0, 1, 2])
    assert cold.computed == 18 and cold.features.shape == (6, 3, 8)
    warm = extractor(tmp_path / "cache").extract(images, views=[0, 1, 2])
    assert warm.computed == 0
    np.testing.assert_array_equal(cold.features, warm.features)
    renamed = images[0].with_name("renamed.png")
    shutil.copy(images[0], renamed)
    hit = extractor(tmp_path / "cache").extract([renamed])
    assert hit.computed == 0
    np.testing.assert_array_equal(hit.features[0, 0], cold.features[0, 0])


def test_edited_file_misses(tmp_path, images, tiny_backbone):
    extractor(tmp_path / "cache").extract(images)
    image = read_image(images[0])
    image.putpixel((0, 0), (255, 255, 255))
    image.save(images[0])
    assert extractor(tmp_path / "cache").extract(images).computed == 1


def test_other_backbone_or_preprocessing_misses(tmp_path, images, tiny_backbone, monkeypatch):
    extractor(tmp_path / "cache").extract(images)
    spec = BACKBONES["tiny"]
    monkeypatch.setitem(BACKBONES, "tiny2", spec.__class__("tiny2", 8, spec.preprocessing, spec.weights_file, spec.build))
    assert extractor(tmp_path / "cache", "tiny2").extract(images).computed == 6
    bigger = dict(spec.preprocessing, size=40)
    monkeypatch.setitem(BACKBONES, "tiny", spec.__class__("tiny", 8, bigger, spec.weights_file, spec.build))
    assert extractor(tmp_path / "cache").extract(images).computed == 6


def test_cached_features_equal_the_uncached_forward(tmp_path, images, tiny_backbone):
    features = extractor(tmp_path / "cache").extract(images, views=[0, 1], seed=5)
    plain = extractor(None)
    for row, path in enumerate(images):
        digest = features.digests[row]
        for column, view in enumerate([0, 1]):
            flip, angle = view_params(digest, view, 5, 5.0)
            tensor = torch.from_numpy(preprocess(read_image(path, draft=(32, 32)), plain.preprocessing, flip, angle))
            expected = plain.forward(tensor[None])[0, 0].numpy()  # pooling 0: the average
            np.testing.assert_allclose(features.features[row, column], expected, atol=1e-5)  # float32 noise only


def test_a_crashed_writer_leaves_no_entry(tmp_path, monkeypatch):
    store = ShardStore(tmp_path / "store")
    store.put("cd" * 32, "plain", np.ones((3, 8), dtype=np.float32))
    store.flush()

    def crash(handle, array):
        handle.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    store.put("ab" * 32, "plain", np.zeros((3, 8), dtype=np.float32))
    monkeypatch.setattr(np, "save", crash)  # the index of the second commit is never written whole
    with pytest.raises(KeyboardInterrupt):
        store.flush()
    monkeypatch.undo()
    reader = ShardStore(tmp_path / "store")
    assert reader.get("ab" * 32, "plain") is None
    np.testing.assert_array_equal(reader.get("cd" * 32, "plain"), np.ones((3, 8)))
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]  # the half-written index was removed


def test_damaged_entry_is_recomputed(tmp_path, images, tiny_backbone):
    cache = tmp_path / "cache"
    first = extractor(cache).extract(images[:1])
    shard = next(cache.rglob("*.f32"))
    shard.write_bytes(b"garbage")  # shorter than its index says: the whole shard is ignored
    again = extractor(cache).extract(images[:1])
    assert again.computed == 1
    np.testing.assert_array_equal(first.features, again.features)


def test_two_processes_fill_one_cache(tmp_path, images, tiny_backbone):
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        results = pool.map(_fill_forked, [(cache, images)] * 2)
    np.testing.assert_array_equal(results[0], results[1])
    assert cache_info(cache)["entries"] in (12, 24)  # each process wrote its own shard; a key twice is harmless
    assert len(list(cache.rglob("*.f32"))) in (1, 2) and not [p for p in cache.rglob("*.tmp")]
    assert extractor(cache).extract(images, views=[0, 1]).computed == 0


def _fill_forked(args):
    cache, paths = args
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    return FeatureExtractor("tiny", cache_dir=cache, num_workers=0).extract(paths, views=[0, 1]).features


def test_unreadable_image_is_skipped_with_reason(tmp_path, images, tiny_backbone):
    images[0].write_bytes(b"")
    features = extractor(tmp_path / "cache").extract(images)
    assert len(features.paths) == 5 and str(images[0]) in features.skipped
    assert "empty" in features.skipped[str(images[0])]


def test_cache_info_and_clear_commands(tmp_path, images, tiny_backbone, capsys):
    extractor(tmp_path / "cache").extract(images)
    assert cache_info(tmp_path / "cache")["entries"] == 6
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "6 entries" in capsys.readouterr().out
    thumbnails = cache_root() / "thumbnails"
    thumbnails.mkdir(parents=True)
    (thumbnails / "a-192.jpg").write_bytes(b"x" * 2000)
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "removed 6 entries" in out and "thumbnails" not in out  # a folder of its own: only that folder
    assert cache_info(tmp_path / "cache")["entries"] == 0 and thumbnails.exists()
    assert main(["cache", "info"]) == 0
    assert f"thumbnails {thumbnails} holds 1 files, 0.0 MB" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert f"thumbnails {thumbnails} removed 1 files" in capsys.readouterr().out and not thumbnails.exists()


def test_one_pass_caches_every_pooling_and_tiles_are_their_own_entries(tmp_path, images, tiny_backbone):
    cache = tmp_path / "cache"
    average = extractor(cache).extract(images)
    assert average.computed == 6
    for pooling in ("max", "gem"):  # every pooling came from that pass: nothing more to compute
        other = extractor(cache).extract(images, pooling=pooling)
        assert other.computed == 0 and not np.allclose(other.features, average.features)
    tiled = extractor(cache).extract(images, tiles=2, pooling="max")
    assert tiled.computed == 6 * 4  # the four crops of each image; the whole image was cached already
    assert extractor(cache).extract(images, tiles=2, pooling="gem").computed == 0
    assert extractor(cache).extract(images, tiles=3).computed == 6 * 9  # another grid: other crops


def test_tiled_features_are_the_max_over_the_whole_image_and_its_crops(tmp_path, images, tiny_backbone):
    from stopsign.data.images import read_image
    from stopsign.model.transforms import tile_views

    plain = extractor(None)
    tiled = plain.extract(images[:2], tiles=2, pooling="gem").features[:, 0]
    for row, path in enumerate(images[:2]):
        image = read_image(path)
        passes = plain.forward(torch.from_numpy(np.stack(tile_views(image, plain.preprocessing, 2))))
        np.testing.assert_allclose(tiled[row], passes[:, 2].numpy().max(axis=0), atol=1e-5)  # 2: gem
        np.testing.assert_allclose(plain.image_features([image], pooling="gem", tiles=2)[0], tiled[row], atol=1e-5)


def test_tile_boxes_cover_the_image_with_overlapping_crops():
    from stopsign.model.transforms import tile_box, tile_count

    assert tile_count(1) == 1 and tile_count(2) == 5 and tile_count(3) == 10
    assert tile_box(300, 150, 2, 0) == (0, 0, 300, 150)
    assert [tile_box(300, 150, 2, i) for i in range(1, 5)] == [(0, 0, 200, 100), (100, 0, 300, 100),
                                                              (0, 50, 200, 150), (100, 50, 300, 150)]


def test_no_readable_image_gives_no_rows_of_the_heads_width_not_a_crash(tmp_path, images, tiny_backbone):
    from stopsign.config import Settings
    from stopsign.data.datasets import Sample
    from stopsign.training.sources import CachedFeatures

    missing = tmp_path / "missing.jpg"
    for given in ([], [missing]):  # regions of two tiles: 5 passes × 4 regions × 8 features per row
        for cache in (tmp_path / "cache", None):
            nothing = extractor(cache).extract(given, pooling="regions", tiles=2)
            assert nothing.features.shape == (0, 1, 160) and nothing.paths == [] and nothing.computed == 0
            assert nothing.skipped == ({str(missing): "file not found"} if given else {})
    assert extractor(None).image_features([], pooling="regions", tiles=2).shape == (0, 160)
    # training with no validation images: every training image's features, no validation rows
    config = Settings().replace(backbone="tiny", pooling="regions", tiles=2, views=2)
    features = CachedFeatures(extractor(tmp_path / "cache"), [Sample(p, 0) for p in images], [], config.model, config.recipe)
    assert features.train_features.shape == (6, 2, 160) and features.val_features.shape == (0, 160)
    assert list(features.val_batches([])) == []
