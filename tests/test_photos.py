"""photos: the sample and error grids (layout, mistakes only, "unreadable" cells), the thumbnail store, data URIs."""

import base64
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import stopsign.reporting.photos as photos
from stopsign.reporting.metrics import Predictions
from stopsign.reporting.photos import GRID_IMAGE_SIDE, Thumbnails, data_uri, plot_samples

NAMES = ["not_stop", "stop"]
PAD, TITLE, SIDE = 8, 20, GRID_IMAGE_SIDE  # plot_samples' layout
CELL_W, CELL_H, HEADING = SIDE + 2 * PAD, SIDE + TITLE + 2 * PAD, 28
COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (200, 180, 40)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STOPSIGN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def photo_files(tmp_path) -> list[Path]:
    """Eight 240 x 240 JPEGs, each one flat colour (cycling) plus a little noise, so every file differs."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        pixels = np.clip(np.array(COLOURS[i % 4]) + rng.integers(-6, 7, (240, 240, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / "photos" / f"photo_{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95)
        paths.append(path)
    return paths


def predictions(paths, p1) -> Predictions:
    y = np.array([0, 1] * (len(paths) // 2))
    p1 = np.asarray(p1, dtype=float)
    return Predictions([str(p) for p in paths], y, np.c_[1 - p1, p1], NAMES)


class Recording(Thumbnails):
    """Thumbnails that remember which paths the grid asked for, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def get(self, path, side):
        self.asked.append(Path(path).name)
        return super().get(path, side)


@pytest.fixture
def drawn_text(monkeypatch) -> list[str]:
    """Every string plot_samples draws, in order."""
    texts, real_text = [], ImageDraw.ImageDraw.text

    def recording(self, xy, text, *args, **kwargs):
        texts.append(text)
        return real_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recording)
    return texts


def tile(grid: np.ndarray, slot: int, columns: int, top: int = 0, left: int = 0) -> np.ndarray:
    """The pixels of the photo square of one slot, less a margin for the frame."""
    x = left + (slot % columns) * CELL_W + PAD
    y = top + (slot // columns) * CELL_H + PAD + TITLE
    return grid[y + 6:y + SIDE - 6, x + 6:x + SIDE - 6].astype(int)


# y_true is 0, 1, 0, 1, ...; the predictions below get indices 2 (p=0.8 → stop, wrong, confidence 0.8),
# 5 (p=0.1 → not_stop, wrong, confidence 0.9) and 6 (p=0.6 → stop, wrong, confidence 0.6) wrong.
P1 = [0.1, 0.9, 0.8, 0.7, 0.2, 0.1, 0.6, 0.95]
WRONG_BY_CONFIDENCE = ["photo_5.jpg", "photo_2.jpg", "photo_6.jpg"]


def test_sample_grid_shows_the_first_images_in_a_grid_of_five_columns(photo_files, tmp_path):
    thumbnails = Recording()
    path = plot_samples(predictions(photo_files, P1), tmp_path / "samples.jpg", max_images=7, thumbnails=thumbnails)
    assert path == tmp_path / "samples.jpg"
    with Image.open(path) as jpeg:
        assert jpeg.format == "JPEG"
        assert jpeg.size == (5 * CELL_W, 2 * CELL_H)  # 7 images: 5 + 2, no heading
        grid = np.asarray(jpeg.convert("RGB"))
    assert thumbnails.asked == [f"photo_{i}.jpg" for i in range(7)]
    for slot in range(7):  # each square holds its photo's colour
        mean = tile(grid, slot, 5).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - COLOURS[slot % 4]).max() < 15, slot
    empty = tile(grid, 9, 5)  # the last cell of the second row holds nothing
    assert empty.min() > 240


def test_error_grid_shows_only_the_mistakes_most_confident_first(photo_files, tmp_path, drawn_text):
    thumbnails = Recording()
    path = plot_samples(predictions(photo_files, P1), tmp_path / "errors.jpg", wrong_only=True, thumbnails=thumbnails)
    assert thumbnails.asked == WRONG_BY_CONFIDENCE
    with Image.open(path) as jpeg:
        assert jpeg.format == "JPEG"
        assert jpeg.size[1] == HEADING + CELL_H  # one row of three under the heading
        heading_width = ImageFont.load_default(size=16).getlength("3 misclassified, most confident first")
        assert jpeg.size[0] == max(3 * CELL_W, int(np.ceil(heading_width)) + 2 * PAD)
        grid = np.asarray(jpeg.convert("RGB"))
    assert drawn_text[0] == "3 misclassified, most confident first"
    assert drawn_text[1:] == ["not_stop p=0.90 / stop", "stop p=0.80 / not_stop", "stop p=0.60 / not_stop"]
    left = (grid.shape[1] - 3 * CELL_W) // 2
    for slot, index in enumerate([5, 2, 6]):
        mean = tile(grid, slot, 3, top=HEADING, left=left).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - COLOURS[index % 4]).max() < 15, slot
        frame_x = left + slot * CELL_W + PAD - 2  # the thick red frame of a mistake, just outside the square
        frame = grid[HEADING + PAD + TITLE + SIDE // 2, frame_x].astype(int)
        assert frame[0] > 150 and frame[1] < 100 and frame[2] < 100, slot


def test_error_grid_without_mistakes_says_so(photo_files, tmp_path, drawn_text):
    path = plot_samples(predictions(photo_files, [0.1, 0.9] * 4), tmp_path / "errors.jpg", wrong_only=True)
    with Image.open(path) as jpeg:
        assert jpeg.size == (CELL_W, CELL_H)
    assert drawn_text == ["no misclassified images"]


@pytest.mark.parametrize("store", [False, True], ids=["no store", "store"])
def test_an_unreadable_image_gets_an_unreadable_cell(photo_files, tmp_path, drawn_text, store):
    garbage = tmp_path / "photos" / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG at all, just some bytes" * 10)
    missing = tmp_path / "photos" / "missing.jpg"
    paths = [photo_files[0], garbage, photo_files[2], missing]
    thumbnails = Thumbnails(store=tmp_path / "thumbs") if store else None
    path = plot_samples(predictions(paths, [0.1, 0.9, 0.2, 0.8]), tmp_path / "samples.jpg", thumbnails=thumbnails)
    with Image.open(path) as jpeg:
        assert jpeg.size == (4 * CELL_W, CELL_H)
        grid = np.asarray(jpeg.convert("RGB"))

    assert drawn_text.count("unreadable") == 2
    assert drawn_text == ["not_stop p=0.90 / not_stop", "stop p=0.90 / stop", "unreadable",
                          "not_stop p=0.80 / not_stop", "stop p=0.80 / stop", "unreadable"]
    for slot in (1, 3):  # white squares with a little dark text in the middle
        square = tile(grid, slot, 4)
        assert (square.min(axis=2) > 230).mean() > 0.97, slot
        middle = square[SIDE // 2 - 16:SIDE // 2 + 4]
        assert (middle.max(axis=2) < 100).sum() > 20, slot  # the word was drawn
    for slot in (0, 2):  # readable photos are pasted
        mean = tile(grid, slot, 4).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - COLOURS[slot % 4]).max() < 15, slot
    if store:
        assert len(list((tmp_path / "thumbs").glob("*.jpg"))) == 2  # nothing stored for the unreadable ones


def test_thumbnails_are_stored_by_content_and_reused(photo_files, tmp_path, monkeypatch):
    store = tmp_path / "thumbs"
    first = Thumbnails(store=store)
    image = first.get(photo_files[0], 100)
    assert image.size == (100, 100) and image.mode == "RGB"
    digest = hashlib.sha256(photo_files[0].read_bytes()).hexdigest()
    entries = list(store.glob("*.jpg"))
    assert [p.name for p in entries] == [f"{digest}-{GRID_IMAGE_SIDE}.jpg"]
    with Image.open(entries[0]) as stored:
        assert stored.format == "JPEG" and stored.size == (GRID_IMAGE_SIDE, GRID_IMAGE_SIDE)

    copy = tmp_path / "copy.jpg"
    copy.write_bytes(photo_files[0].read_bytes())
    first.get(photo_files[1], 50)
    first.get(copy, 50)  # same content as photo_0: no new entry
    assert len(list(store.glob("*.jpg"))) == 2

    def no_decoding(*args, **kwargs):
        raise AssertionError("read_image called: the store was not used")

    monkeypatch.setattr(photos, "read_image", no_decoding)
    second = Thumbnails(store=store)
    again = second.get(photo_files[0], 100)
    assert again.size == (100, 100)
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(image, dtype=int)).mean() < 2
    assert second.get(copy, 192).size == (192, 192)
    mean = np.asarray(second.get(photo_files[1], 64), dtype=float).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - COLOURS[1]).max() < 10


@pytest.mark.parametrize("damage", ["truncated", "garbage ending like a JPEG", "empty"])
def test_a_damaged_stored_thumbnail_is_decoded_again(photo_files, tmp_path, monkeypatch, damage):
    store = tmp_path / "thumbs"
    Thumbnails(store=store).get(photo_files[2], 64)
    (entry,) = store.glob("*.jpg")
    good = entry.read_bytes()
    entry.write_bytes({"truncated": good[: len(good) // 2],
                       "garbage ending like a JPEG": b"not a picture" + photos.JPEG_END,
                       "empty": b""}[damage])

    decoded, real_read_image = [], photos.read_image
    monkeypatch.setattr(photos, "read_image", lambda path, **kw: decoded.append(Path(path).name) or real_read_image(path, **kw))
    image = Thumbnails(store=store).get(photo_files[2], 64)
    assert decoded == ["photo_2.jpg"]
    assert image.size == (64, 64)
    mean = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - COLOURS[2]).max() < 10
    assert entry.read_bytes().endswith(photos.JPEG_END)  # rewritten whole
    with Image.open(entry) as rewritten:
        rewritten.load()
        assert rewritten.size == (GRID_IMAGE_SIDE, GRID_IMAGE_SIDE)


def test_thumbnails_of_unreadable_files_are_none(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG but not really")
    store = tmp_path / "thumbs"
    for thumbnails in (Thumbnails(), Thumbnails(store=store)):
        assert thumbnails.get(garbage, 64) is None
        assert thumbnails.get(tmp_path / "missing.jpg", 64) is None
    assert not store.exists() or not any(store.iterdir())  # nothing stored for them


def test_data_uri_is_base64_jpeg():
    data = b"\xff\xd8\xff\xe0 some jpeg bytes \xff\xd9"
    uri = data_uri(data, "jpeg")
    assert uri.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(uri.removeprefix("data:image/jpeg;base64,")) == data
    assert data_uri(b"png", "png") == "data:image/png;base64," + base64.b64encode(b"png").decode()
