"""Safe decoding of one image file: any mode to RGB, EXIF orientation, a pixel limit, JPEG draft; also a file's
content digest and the image files of a folder.

The pixel limit is `MAX_PIXELS`, read at each call (200 MP by default: the largest phone sensors); `set_max_pixels`
changes it for this process and the worker processes it starts. With `draft=` (every caller passes its input size)
a JPEG is decoded at 1/2, 1/4 or 1/8 scale and any image is then reduced by whole factors, never below the target,
so a 200 MP phone photo costs about 12 MB of pixels. Every failure to decode is an `ImageError` whose message is a
short reason ("not an image file", "truncated or corrupt image data", ...), so callers can report the file and skip it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import operator
import os
import re
import stat
import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from ..errors import DataError, ImageError
from ..files import sha256_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 200_000_000  # about 16,000 × 12,500: a 200 MP phone photo fits
MAX_PIXELS_ENV = "STOPSIGN_MAX_PIXELS"  # how set_max_pixels reaches spawned worker processes

_OS_REASONS = {errno.ENOENT: "file not found", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EISDIR: "is a directory", errno.ELOOP: "symbolic link loop"}

# Image.Transpose method for each EXIF orientation (what ImageOps.exif_transpose does, without its copy).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
# Modes whose pixels Image.reduce may average (not palette indices, not bits, not hues).
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})
_PILLOW_LIMIT_LOCK = threading.Lock()


def _initial_max_pixels() -> int:
    text = os.environ.get(MAX_PIXELS_ENV, "").strip() or str(DEFAULT_MAX_PIXELS)
    with contextlib.suppress(ValueError):
        if int(text) >= 1:
            return int(text)
    logger.warning("%s=%r is not a whole number of at least 1: the limit stays %d pixels",
                   MAX_PIXELS_ENV, text, DEFAULT_MAX_PIXELS)
    return DEFAULT_MAX_PIXELS


MAX_PIXELS = _initial_max_pixels()  # the limit read_image and decode_image apply when given none


def set_max_pixels(pixels: int) -> int:
    """Set MAX_PIXELS, the largest width × height decoded, for this process and (through STOPSIGN_MAX_PIXELS) the
    worker processes it starts afterwards, a DataLoader's under spawn or forkserver; returns the previous limit."""
    global MAX_PIXELS
    if not hasattr(pixels, "__index__") or isinstance(pixels, bool) or operator.index(pixels) < 1:
        raise ValueError(f"the pixel limit must be a whole number of at least 1, got {pixels!r}")
    previous, MAX_PIXELS = MAX_PIXELS, operator.index(pixels)
    os.environ[MAX_PIXELS_ENV] = str(MAX_PIXELS)
    return previous


def read_image(path: str | os.PathLike, *, draft: tuple[int, int] | None = None, max_pixels: int | None = None
               ) -> Image.Image:
    """Decode the image file at `path` into a loaded RGB image, or raise ImageError with the reason.

    draft: (width, height) the caller will resize to; the image comes back smaller than its file, but
    never below that. max_pixels: the limit on width × height; None (the default) is MAX_PIXELS now.
    """
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError("is a directory")
        if info.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with open(path, "rb") as file:
            return _decode(file, draft, max_pixels)
    except OSError as error:
        raise ImageError(_os_reason(error)) from None
    except ValueError:  # os.stat refuses a name holding a NUL byte
        raise ImageError("invalid file name") from None


def decode_image(data: bytes, *, draft: tuple[int, int] | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes (an upload, say) exactly as `read_image` decodes a file."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    return _decode(io.BytesIO(data), draft, max_pixels)


def _decode(file: IO[bytes], draft: tuple[int, int] | None, max_pixels: int | None) -> Image.Image:
    # Pillow's plugins raise many exception types on malformed data (OSError, SyntaxError,
    # struct.error, IndexError, EOFError, ...): this is the one place that turns them all into a reason.
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    _keep_pillow_limit_above(max_pixels)
    try:
        with warnings.catch_warnings():
            # Pillow warns about bombs (we apply our own limit) and about corrupt metadata
            # (the image then decodes, or fails with a reason): noise either way.
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            with Image.open(file) as image:
                # Image.open reads only the header, so a bomb is refused before any pixel is decoded.
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(_too_large(f"{width}×{height} = {width * height}", max_pixels))
                target = None if draft is None else (max(1, draft[0]), max(1, draft[1]))
                # MPO (two JPEGs in one file, as many phones write) is a JpegImageFile too.
                if target is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
                    image.draft("RGB", _turned(target, _orientation(image)))
                image.load()  # for an animated GIF or WebP this is the first frame
                orientation = _orientation(image)
                loaded = image
                if target is not None and "transparency" not in image.info:
                    if image.mode.startswith("I;16"):  # reduce cannot average these; "I" holds the same values
                        loaded = image.convert("I")
                    if loaded.mode in _REDUCIBLE:
                        # before turning and converting, so a large PNG or TIFF is not copied at full size
                        loaded = _shrink(loaded, _turned(target, orientation))
                if orientation in _TRANSPOSE:
                    loaded = loaded.transpose(_TRANSPOSE[orientation])
                rgb = _to_rgb(loaded)
                return rgb if target is None else _shrink(rgb, target)  # modes not reducible before
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


def _keep_pillow_limit_above(max_pixels: int) -> None:
    """Raise Pillow's own bomb limit to at least ours, so ours speaks first.

    Image.open refuses an image of over 2 × Image.MAX_IMAGE_PIXELS pixels (179 million by default)
    before we see its size: a 190 MP photo within our limit would be refused. Pillow's check stays on,
    never lowered, as the backstop for what our header check does not see (GIF frames, TIFF tiles);
    between our limit and twice it Pillow only warns, and our refusal names the width and height.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        with _PILLOW_LIMIT_LOCK:
            if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
                Image.MAX_IMAGE_PIXELS = max_pixels


def _os_reason(error: OSError) -> str:
    return _OS_REASONS.get(error.errno, error.strerror or str(error))


def _too_large(size: str, max_pixels: int) -> str:
    return f"too large: {size} pixels exceeds the limit of {max_pixels}"


def _orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(0x0112, 1)
    return orientation if isinstance(orientation, int) else 1


def _turned(target: tuple[int, int], orientation: int) -> tuple[int, int]:
    # Pixels are stored before the EXIF rotation, so a quarter-turned photo needs the target turned too.
    return (target[1], target[0]) if orientation in (5, 6, 7, 8) else target


def _shrink(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Reduced by the largest whole factor (box averages) that keeps both sides at least the target's."""
    factor = min(image.width // target[0], image.height // target[1])
    return image.reduce(factor) if factor >= 2 else image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency onto white, high bit depths scaled, not clipped."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # Pillow's own convert() clips these to 0..255, turning a 16-bit photo white; scale instead.
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
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


def photo_size(source) -> tuple[int, int]:
    """The upright (width, height) of an image file or file object, from its header: the frame of its boxes."""
    with Image.open(source) as image:
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        return (image.height, image.width) if turned else image.size


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of the file's bytes: equal for equal content, whatever the file is called."""
    try:
        return sha256_file(path)
    except OSError as error:
        raise ImageError(_os_reason(error)) from None


def list_images(folder: str | os.PathLike, skipped: dict[str, str] | None = None) -> list[Path]:
    """Image files directly in `folder`, sorted by name; the extension matches in any case.

    Skips folders named like images, broken links and link loops (recording why in `skipped`, when
    given), and hidden files: macOS leaves `._photo.jpg` companions in copied folders that carry an
    image name but hold no image.
    """
    folder, skipped = Path(folder), {} if skipped is None else skipped
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError as error:
        raise DataError(f"{folder}: cannot list the folder ({error.strerror or error})") from None
    found = []
    for name in names:
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            mode = os.stat(folder / name).st_mode  # follows links; a loop raises
        except OSError as error:
            logger.warning("%s: skipped, a broken or looping link", folder / name)
            skipped[str(folder / name)] = ("broken link: its target does not exist" if error.errno == errno.ENOENT
                                           else _os_reason(error))
            continue
        if stat.S_ISREG(mode):
            found.append(folder / name)
        else:
            skipped[str(folder / name)] = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
    return found
