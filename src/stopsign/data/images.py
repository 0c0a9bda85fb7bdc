"""Safe decoding of one image file: any mode to RGB, EXIF orientation, a pixel limit, JPEG draft.

Also the content digest of a file and the listing of image files in a folder. Every failure to
decode is an `ImageError` whose message is a short reason ("not an image file", "truncated or
corrupt image data", ...), so callers can report the file and skip it.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import stat
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError, ImageError
from ..files import sha256_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MAX_PIXELS = 40_000_000  # about 6300 x 6300: far beyond any photo worth resizing to 224 px

_OS_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "symbolic link loop",
}


def read_image(
    path: str | os.PathLike, *, draft: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode the image file at `path` into a loaded RGB image, or raise ImageError with the reason."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError("is a directory")
        if info.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with open(path, "rb") as file:
            return _decode(file, draft, max_pixels)
    except OSError as error:
        raise ImageError(_OS_REASONS.get(error.errno, error.strerror or str(error))) from None
    except ValueError:  # os.stat refuses a name holding a NUL byte
        raise ImageError("invalid file name") from None


def decode_image(
    data: bytes, *, draft: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode encoded image bytes (an upload, say) exactly as `read_image` decodes a file."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    return _decode(io.BytesIO(data), draft, max_pixels)


def _decode(file: IO[bytes], draft: tuple[int, int] | None, max_pixels: int) -> Image.Image:
    # Pillow's plugins raise many exception types on malformed data (OSError, SyntaxError,
    # struct.error, IndexError, EOFError, ...): this is the one place that turns them all into a reason.
    try:
        with warnings.catch_warnings():
            # Pillow warns about bombs (we apply our own, lower limit) and about corrupt metadata
            # (the image then decodes, or fails with a reason): noise either way.
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            with Image.open(file) as image:
                # Image.open reads only the header, so a bomb is refused before any pixel is decoded.
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(_too_large(f"{width}×{height} = {width * height}", max_pixels))
                if draft is not None and image.format == "JPEG":
                    image.draft("RGB", _draft_size(image, draft))
                image.load()  # for an animated GIF or WebP this is the first frame
                return _to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        file.seek(0)
        # A web page saved under an image name is the usual culprit when scraping images.
        hint = " (it is an HTML or XML page)" if file.read(64).lstrip().startswith(b"<") else ""
        raise ImageError(f"not an image file{hint}") from None
    except Image.DecompressionBombError as error:
        found = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageError(_too_large(found.group(1) if found else "the image", max_pixels)) from None
    except MemoryError:
        raise ImageError("not enough memory to decode it") from None
    except Exception as error:
        logger.debug("decoding failed: %r", error)
        raise ImageError("truncated or corrupt image data") from None


def _too_large(size: str, max_pixels: int) -> str:
    return f"too large: {size} pixels exceeds the limit of {max_pixels}"


def _draft_size(image: Image.Image, draft: tuple[int, int]) -> tuple[int, int]:
    width, height = max(1, draft[0]), max(1, draft[1])
    # JPEG decodes before the EXIF rotation, so a quarter-turned photo needs the target turned too.
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
        width, height = height, width
    return width, height


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency onto white, high bit depths scaled, not clipped."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # Pillow's own convert() clips these to 0..255, turning a 16-bit photo white; scale instead.
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # always a new image, detached from the (closed) file


def _to_uint8(values: np.ndarray) -> np.ndarray:
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if is_float and 0.0 <= low and high <= 1.0:
        scale = 255.0  # floats in [0, 1]
    elif low >= 0 and high <= 255:
        scale = 1.0  # 8-bit values stored wide
    elif low >= 0 and high <= 65535:
        scale = 255.0 / 65535.0  # 16-bit
    else:
        values, scale = values - low, 255.0 / max(high - low, 1e-12)  # anything else: stretch
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of the file's bytes: equal for equal content, whatever the file is called."""
    try:
        return sha256_file(path)
    except OSError as error:
        raise ImageError(_OS_REASONS.get(error.errno, error.strerror or str(error))) from None


def list_images(folder: str | os.PathLike, skipped: dict[str, str] | None = None) -> list[Path]:
    """Image files directly in `folder`, sorted by name; the extension matches in any case.

    Skips folders named like images, broken links and link loops (recording why in `skipped`, when
    given), and hidden files: macOS leaves `._photo.jpg` companions in copied folders that carry an
    image name but hold no image.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise DataError(f"{folder}: cannot list the folder ({error.strerror or error})") from None
    found = []
    for entry in entries:
        if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            mode = os.stat(entry.path).st_mode  # follows links; a loop raises
            if not stat.S_ISREG(mode):
                if skipped is not None:
                    skipped[str(folder / entry.name)] = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
                continue
        except OSError as error:
            logger.warning("%s: skipped, a broken or looping link", entry.path)
            if skipped is not None:
                skipped[str(folder / entry.name)] = ("broken link: its target does not exist"
                                                     if error.errno == errno.ENOENT else
                                                     _OS_REASONS.get(error.errno, error.strerror or str(error)))
            continue
        found.append(folder / entry.name)
    return sorted(found, key=lambda path: path.name)
