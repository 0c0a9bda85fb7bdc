"""images.py: every file decodes to the right RGB pixels, or fails with an ImageError that says why."""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

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
        ("bomb.png", png_claiming(50_000, 50_000), "too large: 2500000000 pixels exceeds the limit of 40000000"),
        ("big.png", png_claiming(8_000, 8_000), "too large: 8000×8000 = 64000000 pixels"),
    ],
)
def test_bad_files_raise_image_error_with_the_reason(tmp_path, file_name, content, reason):
    (tmp_path / file_name).write_bytes(content)
    with pytest.raises(ImageError, match=re.escape(reason)):
        read_image(tmp_path / file_name)
    with pytest.raises(ImageError, match=re.escape(reason)):
        decode_image(content)


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
