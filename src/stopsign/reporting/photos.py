"""The report's photos: thumbnails kept by content, the sample and error grids, duplicate-group thumbnails.

Grids are pasted with PIL and saved as JPEG: one matplotlib axis per photo, or photos in PNG, are many times slower.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.images import file_digest, read_image
from ..errors import ImageError, StopsignError
from ..files import atomic_write_bytes
from .metrics import Predictions

logger = logging.getLogger(__name__)

MAX_ERROR_IMAGES = 100  # errors.jpg shows every mistake up to this many (a figure of 1,000 photos helps no one)
THUMBNAIL_SIDE = 96  # duplicate-group thumbnails in the HTML, in pixels
GRID_IMAGE_SIDE = 192  # images of samples.jpg and errors.jpg, in pixels (the size the matplotlib grid showed)
MAX_THUMBNAIL_GROUPS = 50  # duplicate groups shown with thumbnails; the rest are listed by name
WRONG = "#c0392b"
LOOKED = "#ffd600"  # the outline of where the model looked (inference/explain.py's box colour)
JPEG_END = b"\xff\xd9"  # the end-of-image marker: a stored thumbnail without it is damaged


class Thumbnails:
    """Upright RGB thumbnails for one report: each file is decoded once, at `side` pixels.

    Each thumbnail is also kept as a small JPEG in `store`, named by the sha256 of the file's bytes, so the next
    report of the same photos reads a small file instead of decoding each photo. A thumbnail is always the stored
    JPEG's pixels, so a report is the same whether the store was warm. The store is a cache: a damaged entry is
    decoded again, and one that cannot be written costs speed, never the report.
    """

    def __init__(self, side: int = GRID_IMAGE_SIDE, store: Path | None = None):
        self.side = side
        self.store = Path(store) if store else None
        self.decoded: dict[str, Image.Image | None] = {}

    def get(self, path, side: int) -> Image.Image | None:
        """A copy of the image at most side x side pixels, or None when it cannot be read."""
        path = str(path)
        if path not in self.decoded:
            self.decoded[path] = self._load(path)
        image = self.decoded[path]
        if image is None:
            return None
        image = image.copy()
        image.thumbnail((side, side))
        return image

    def _load(self, path: str) -> Image.Image | None:
        try:
            stored = self.store / f"{file_digest(path)}-{self.side}.jpg" if self.store else None
        except ImageError:
            return None
        try:
            data = stored.read_bytes() if stored is not None else b""
            if data.endswith(JPEG_END):  # else missing, or cut short or zero-filled by a crash: decoded again
                with Image.open(io.BytesIO(data)) as image:
                    return image.convert("RGB")
        except (OSError, ValueError):
            pass  # unreadable or damaged: decoded again and rewritten below
        try:  # JPEG: decoded at a reduced scale no smaller than self.side
            image = read_image(path, draft=(self.side, self.side))
            image.thumbnail((self.side, self.side))
        except ImageError:
            return None
        if stored is None:
            return image
        data = jpeg(image, quality=95)
        try:
            atomic_write_bytes(stored, data, durable=False)
        except StopsignError as error:
            logger.debug("thumbnail not stored: %s", error)
        with Image.open(io.BytesIO(data)) as image:  # the stored pixels
            return image.convert("RGB")


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """The text, cut with an ellipsis where it is wider than width pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def shown_mistakes(pred: Predictions) -> list[int]:
    """The misclassified images errors.jpg shows: most confident first, at most MAX_ERROR_IMAGES."""
    wrong = pred.y_pred != pred.y_true
    return [int(i) for i in np.argsort(-pred.confidence, kind="stable") if wrong[i]][:MAX_ERROR_IMAGES]


def plot_samples(pred: Predictions, path, *, max_images: int = 16, wrong_only: bool = False,
                 thumbnails: Thumbnails | None = None) -> Path:
    """A grid of images titled "predicted p=0.93 / truth", mistakes in red with a thick red frame, and where the
    model looked outlined in yellow on each image whose prediction carries a box (pred.boxes).

    wrong_only=True shows every misclassified image (up to MAX_ERROR_IMAGES), most confident first, and ignores
    max_images; otherwise the first max_images images in evaluation order.
    """
    thumbnails = thumbnails or Thumbnails()
    y_pred, confidence = pred.y_pred, pred.confidence
    wrong = y_pred != pred.y_true
    if wrong_only:
        shown = shown_mistakes(pred)
    else:
        shown = list(range(min(max_images, len(pred.y_true))))
    columns = max(1, min(5, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    pad, title_height, side = 8, 20, GRID_IMAGE_SIDE
    cell_width, cell_height = side + 2 * pad, side + title_height + 2 * pad
    heading = ""
    if wrong_only and shown:
        total = int(wrong.sum())
        heading = f"{total} misclassified, most confident first" + (f" (first {len(shown)})" if total > len(shown) else "")
    top = 28 if heading else 0
    title_font, heading_font = ImageFont.load_default(size=13), ImageFont.load_default(size=16)
    width = max(columns * cell_width, math.ceil(heading_font.getlength(heading)) + 2 * pad)  # one photo, whole heading
    left = (width - columns * cell_width) // 2
    grid = Image.new("RGB", (width, top + rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    if heading:
        draw.text((grid.width / 2, top / 2), heading, fill="black", font=heading_font, anchor="mm")
    if not shown:
        draw.text((grid.width / 2, grid.height / 2), "no misclassified images" if wrong_only else "no images to show",
                  fill="black", font=heading_font, anchor="mm")
    for slot, i in enumerate(shown):
        x = left + (slot % columns) * cell_width
        y = top + (slot // columns) * cell_height
        color = WRONG if wrong[i] else "black"
        title = f"{pred.class_names[y_pred[i]]} p={confidence[i]:.2f} / {pred.class_names[pred.y_true[i]]}"
        draw.text((x + cell_width / 2, y + pad + title_height / 2), fit_text(draw, title, title_font, cell_width - 4),
                  fill=color, font=title_font, anchor="mm")
        box = (x + pad, y + pad + title_height, x + pad + side, y + pad + title_height + side)
        image = thumbnails.get(pred.paths[i], side)
        if image is None:
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "unreadable", fill="black", font=title_font,
                      anchor="mm")
        else:  # centred in the square, as imshow would show it
            corner = (box[0] + (side - image.width) // 2, box[1] + (side - image.height) // 2)
            grid.paste(image, corner)
            looked = pred.boxes[i] if pred.boxes else None
            if looked:
                draw.rectangle([corner[k % 2] + fraction * (image.width, image.height)[k % 2]
                                for k, fraction in enumerate(looked)], outline=LOOKED, width=2)
        frame = 3 if wrong[i] else 1
        draw.rectangle((box[0] - frame, box[1] - frame, box[2] + frame - 1, box[3] + frame - 1),
                       outline=color if wrong[i] else "#999999", width=frame)
    return atomic_write_bytes(path, jpeg(grid, quality=90))


def data_uri(data: bytes, kind: str) -> str:
    """An image's bytes as a data: URI, for a page that must hold its images itself."""
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def file_data_uri(path: Path) -> str:
    """A written plot as a data: URI (JPEG or PNG by its suffix)."""
    return data_uri(Path(path).read_bytes(), "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png")


def duplicate_thumbnails(checks: dict | None, thumbnails: Thumbnails | None = None) -> dict[str, str]:
    """JPEG data URIs for the files of the duplicate groups the report shows."""
    thumbnails = thumbnails or Thumbnails(THUMBNAIL_SIDE)
    if not checks:
        return {}
    groups = checks.get("exact_duplicates", [])[:MAX_THUMBNAIL_GROUPS] + checks.get("near_duplicates", [])[:MAX_THUMBNAIL_GROUPS]
    uris = {}
    for file in (f for group in groups for f in group["files"]):
        if file["path"] in uris:
            continue
        image = thumbnails.get(file["path"], THUMBNAIL_SIDE)
        if image is not None:
            uris[file["path"]] = data_uri(jpeg(image, quality=80), "jpeg")
    return uris
