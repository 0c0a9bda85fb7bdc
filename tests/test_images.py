"""images.py: every file decodes to the right RGB pixels, or fails with an ImageError that says why."""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import make_image
from stopsign.data import images
from stopsign.errors import ImageError
from stopsign.data.images import decode_image, file_digest, list_images, read_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def close_to(pixel, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (the pixel data is a 1×1 image's)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC covers type + data
    return bytes(data)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    assert close_to(upright.getpixel((10, 5)), RED) and close_to(upright.getpixel((10, 35)), BLUE)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 0])  # index 0 red, index 1 black ...
    image.info["transparency"] = 1  # ... but index 1 is see-through
    image.paste(1, (4, 0, 8, 8))
    return image


def sixteen_bit_grey() -> Image.Image:
    return Image.fromarray(np.full((8, 8), 128 * 257, np.uint16))  # mid grey in 16 bits


@pytest.mark.parametrize(
    ("make", "file_name", "left", "right"),
    [
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg", RED, RED),
        (lambda: Image.new("CMYK", (8, 8), (255, 255, 0, 0)), "cmyk.tif", BLUE, BLUE),
        (sixteen_bit_grey, "grey16.png", (128,) * 3, (128,) * 3),  # not clipped to white
        (palette_with_transparency, "palette.png", RED, WHITE),  # transparency onto white
        (palette_with_transparency, "palette.gif", RED, WHITE),
        (lambda: Image.new("LA", (8, 8), (0, 0)), "clear.png", WHITE, WHITE),
        (lambda: Image.new("LA", (8, 8), (0, 255)), "black.png", (0, 0, 0), (0, 0, 0)),
        (lambda: Image.new("RGBA", (8, 8), (0, 0, 255, 0)), "clear.webp", WHITE, WHITE),
        (lambda: Image.new("L", (8, 8), 77), "grey.bmp", (77,) * 3, (77,) * 3),
        (lambda: Image.new("1", (8, 8), 1), "bits.png", WHITE, WHITE),
        (lambda: Image.fromarray(np.full((8, 8), 0.5, np.float32)), "float.tif", (128,) * 3, (128,) * 3),
    ],
)
def test_any_mode_becomes_the_right_rgb(tmp_path, make, file_name, left, right):
    make().save(tmp_path / file_name, **({"lossless": True} if file_name.endswith(".webp") else {}))
    image = read_image(tmp_path / file_name)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert close_to(image.getpixel((1, 4)), left) and close_to(image.getpixel((6, 4)), right)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE, BLUE)]
    frames[0].save(tmp_path / "blink.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = read_image(tmp_path / "blink.gif")
    assert image.mode == "RGB" and close_to(image.getpixel((4, 4)), RED)


def test_one_pixel_image_is_valid(tmp_path):
    Image.new("RGB", (1, 1), BLUE).save(tmp_path / "dot.png")
    assert read_image(tmp_path / "dot.png").getpixel((0, 0)) == BLUE


def test_draft_decodes_a_large_jpeg_smaller_but_not_below_the_target(tmp_path):
    Image.new("RGB", (1600, 1200), RED).save(tmp_path / "big.jpg")
    assert read_image(tmp_path / "big.jpg").size == (1600, 1200)
    drafted = read_image(tmp_path / "big.jpg", draft=(224, 224))
    assert 224 <= min(drafted.size) and drafted.size[0] <= 800


def test_draft_target_turns_with_the_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1600, 800), RED).save(tmp_path / "tall.jpg", exif=exif)  # shown 800 wide, 1600 high
    drafted = read_image(tmp_path / "tall.jpg", draft=(100, 400))
    assert drafted.size == (200, 400)  # quarter scale: the most that keeps 400 px of height


def test_decode_image_matches_read_image(tmp_path):
    make_image(3, (16, 16)).save(tmp_path / "a.png")
    from_bytes = decode_image((tmp_path / "a.png").read_bytes())
    assert from_bytes.tobytes() == read_image(tmp_path / "a.png").tobytes()


def noisy_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("file_name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("notes.jpg", b"shopping list: eggs, milk\n", "not an image file"),
        ("page.png", b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>", "HTML"),
        ("cut.jpg", noisy_jpeg()[:600], "truncated or corrupt image data"),
        ("bomb.png", png_claiming(50_000, 50_000), "too large: 2500000000 pixels exceeds the limit of 200000000"),
        ("big.png", png_claiming(20_000, 12_500), "too large: 20000×12500 = 250000000 pixels exceeds the limit"),
    ],
)
def test_bad_files_raise_image_error_with_the_reason(tmp_path, file_name, content, reason):
    (tmp_path / file_name).write_bytes(content)
    with pytest.raises(ImageError, match=re.escape(reason)):
        read_image(tmp_path / file_name)
    with pytest.raises(ImageError, match=re.escape(reason)):
        decode_image(content)


def test_a_250_mp_header_is_refused_before_any_pixel_is_decoded(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels decoded")  # read_image would then say "truncated or corrupt"

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="too large: 20000×12500 = 250000000 pixels exceeds the limit of 200000000"):
        decode_image(png_claiming(20_000, 12_500), draft=(224, 224))
    with pytest.raises(ImageError, match="corrupt"):  # the spy works: a small image reaches load()
        decode_image(png_claiming(16, 16))


@pytest.fixture(scope="module")
def phone_jpeg(tmp_path_factory) -> tuple[Path, Image.Image]:
    """A 48.8 MP photo (8000×6100, as a 48 MP phone writes) of 100-px blocks, at quality 50 (about 1.6 MB)."""
    small = make_image(7, (80, 61))
    path = tmp_path_factory.mktemp("phone") / "IMG_0001.jpg"
    small.resize((8000, 6100), Image.Resampling.NEAREST).save(path, quality=50)
    return path, small


def test_a_48_mp_phone_photo_is_accepted_and_drafted_small(phone_jpeg):
    path, small = phone_jpeg
    started = time.perf_counter()
    image = read_image(path, draft=(224, 224))
    assert time.perf_counter() - started < 2  # a full decode is 0.4 s, and 195 MB
    assert image.mode == "RGB" and 224 <= min(image.size) and max(image.size) < 1000
    assert image.size == (334, 255)  # 1/8 by draft (1000×763), then a third: the most that keeps 224 px
    # The pixels are the photo's: the block at the 40th column, 30th row of the 80×61 original.
    assert close_to(image.getpixel((40 * 334 // 80 + 2, 30 * 255 // 61 + 2)), small.getpixel((40, 30)), 20)


def test_drafting_the_phone_photo_holds_a_few_mb_not_the_full_195(phone_jpeg):
    path, _ = phone_jpeg
    script = ("import resource, sys\n"
              "from stopsign.data.images import read_image\n"
              "read_image(sys.argv[1], draft=(8, 8))  # warm up Pillow's JPEG decoder on the same file\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "image = read_image(sys.argv[1], draft=(224, 224))\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, image.size)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    grown_kib = int(done.stdout.split()[0])
    assert grown_kib < 40 * 1024, done.stdout  # full-size pixels would be 8000 × 6100 × 4 bytes = 195 MB


def test_a_phone_mpo_is_drafted_like_a_jpeg(tmp_path):
    # Many phones write MPO (a photo and its depth map or preview in one .jpg); Pillow names it "MPO".
    Image.new("RGB", (1600, 1200), RED).save(tmp_path / "pair.jpg", "MPO", save_all=True,
                                             append_images=[Image.new("RGB", (1600, 1200), BLUE)])
    assert Image.open(tmp_path / "pair.jpg").format == "MPO"
    drafted = read_image(tmp_path / "pair.jpg", draft=(224, 224))
    assert drafted.size == (400, 300) and close_to(drafted.getpixel((200, 150)), RED)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16", "P", "L"])
def test_draft_shrinks_any_format_by_whole_factors_not_below_the_target(tmp_path, mode):
    image = Image.new("RGB", (900, 600), RED)
    image.paste(BLUE, (450, 0, 900, 600))
    if mode == "I;16":
        image = Image.fromarray(np.where(np.asarray(image)[..., 0] > 128, 65535, 0).astype(np.uint16))
        left, right = WHITE, (0, 0, 0)
    else:
        image, left, right = (image.convert(mode), RED, BLUE) if mode != "L" else (image.convert("L"), (76,) * 3,
                                                                                  (29,) * 3)
    image.save(tmp_path / "wide.png")
    drafted = read_image(tmp_path / "wide.png", draft=(100, 200))  # 900 // 100 = 9, 600 // 200 = 3: a third
    assert drafted.mode == "RGB" and drafted.size == (300, 200)
    assert close_to(drafted.getpixel((50, 100)), left) and close_to(drafted.getpixel((250, 100)), right)
    assert read_image(tmp_path / "wide.png").size == (900, 600)  # without a draft, full size


def test_pillows_own_bomb_limit_never_refuses_within_ours(monkeypatch):
    buffer = io.BytesIO()
    make_image(4, (100, 100)).save(buffer, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow alone would refuse 10000 pixels ...
    assert decode_image(buffer.getvalue(), max_pixels=20_000).size == (100, 100)  # ... ours allows them
    assert Image.MAX_IMAGE_PIXELS == 20_000  # raised to ours, still on: the backstop for GIF frames and tiles
    with pytest.raises(ImageError, match="too large: 100×100 = 10000 pixels exceeds the limit of 9999"):
        decode_image(buffer.getvalue(), max_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS == 20_000  # never lowered


@pytest.fixture
def limit(monkeypatch):
    """Restores images.MAX_PIXELS and STOPSIGN_MAX_PIXELS after the test."""
    monkeypatch.setattr(images, "MAX_PIXELS", images.MAX_PIXELS)
    monkeypatch.delenv(images.MAX_PIXELS_ENV, raising=False)
    return images.set_max_pixels


def test_the_limit_is_set_at_run_time(tmp_path, limit):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert images.MAX_PIXELS == images.DEFAULT_MAX_PIXELS == 200_000_000
    assert limit(1000) == 200_000_000  # the previous limit
    with pytest.raises(ImageError, match="32×32 = 1024 pixels exceeds the limit of 1000"):
        read_image(tmp_path / "a.png")
    with pytest.raises(ImageError, match="exceeds the limit of 1000"):
        decode_image((tmp_path / "a.png").read_bytes())
    assert os.environ["STOPSIGN_MAX_PIXELS"] == "1000"  # what a spawned worker process reads
    limit(1024)
    assert read_image(tmp_path / "a.png").size == (32, 32)
    assert read_image(tmp_path / "a.png", max_pixels=5000).size == (32, 32)  # a caller's own limit wins
    for bad in (0, -1, 1.5, "1000", True, None):
        with pytest.raises(ValueError, match="whole number of at least 1"):
            limit(bad)
    assert images.MAX_PIXELS == 1024


@pytest.mark.parametrize(("value", "expected"),
                         [("300_000_000", 300_000_000), ("lots", 200_000_000), ("0", 200_000_000)])
def test_a_worker_process_takes_the_limit_from_the_environment(value, expected):
    script = "from stopsign.data import images; print(images.MAX_PIXELS)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env=os.environ | {"STOPSIGN_MAX_PIXELS": value})
    assert int(done.stdout) == expected


def test_max_pixels_is_the_callers_limit(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="32×32 = 1024 pixels exceeds the limit of 1000"):
        read_image(tmp_path / "a.png", max_pixels=1000)


def test_every_truncation_of_valid_files_is_an_image_or_an_image_error():
    encoded = [noisy_jpeg()]
    for file_format in ("PNG", "GIF", "WEBP", "TIFF", "BMP"):
        buffer = io.BytesIO()
        make_image(1, (16, 16)).save(buffer, file_format)
        encoded.append(buffer.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decoding corrupt data must not spray warnings either
        for data in encoded:
            for length in range(1, len(data), max(1, len(data) // 40)):
                try:
                    assert decode_image(data[:length]).mode == "RGB"
                except ImageError:
                    pass  # any other exception type fails the test


def test_missing_file_directory_link_loop_and_bad_name_are_reasons(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.symlink(tmp_path / "a.jpg", tmp_path / "b.jpg")
    cases = {"gone.jpg": "file not found", "folder.jpg": "is a directory", "a.jpg": "symbolic link loop",
             "nul\0.jpg": "invalid file name"}
    for file_name, reason in cases.items():
        with pytest.raises(ImageError, match=reason):
            read_image(tmp_path / file_name)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_permission_denied(tmp_path):
    make_image(0).save(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        read_image(tmp_path / "locked.png")


def test_permission_denied_simulated(tmp_path, monkeypatch):
    # Runs as root too, where chmod cannot take read access away.
    make_image(0).save(tmp_path / "locked.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", refuse, raising=False)
    with pytest.raises(ImageError, match="permission denied"):
        read_image(tmp_path / "locked.png")


def test_list_images_finds_image_files_only(tmp_path):
    for file_name in ("b.png", "A.JPG", "c.Jpeg", "d.webp", "e.TIFF"):
        make_image(0).save(tmp_path / file_name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._b.png").write_bytes(b"macOS resource fork")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "sub").mkdir()
    make_image(0).save(tmp_path / "sub" / "deeper.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "broken.png")
    os.symlink(tmp_path / "loop2.png", tmp_path / "loop1.png")
    os.symlink(tmp_path / "loop1.png", tmp_path / "loop2.png")
    os.symlink(tmp_path / "b.png", tmp_path / "link.png")
    assert [path.name for path in list_images(tmp_path)] == ["A.JPG", "b.png", "c.Jpeg", "d.webp", "e.TIFF", "link.png"]
    assert read_image(tmp_path / "A.JPG").size == (32, 32)  # upper-case extension decodes too


def test_file_digest_follows_content_not_name(tmp_path):
    make_image(0).save(tmp_path / "a.png")
    make_image(1).save(tmp_path / "c.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    digest = file_digest(tmp_path / "a.png")
    assert digest == hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    assert file_digest(tmp_path / "b.png") == digest != file_digest(tmp_path / "c.png")
    with pytest.raises(ImageError, match="file not found"):
        file_digest(tmp_path / "gone.png")
