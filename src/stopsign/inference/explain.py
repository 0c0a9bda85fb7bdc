"""Where a model looked in a photo (Explanation): the boxes a backend's scores give, and the photo drawn with them.

A backend scores every region a regions head saw and every cell of the winning tile's last feature map (a class
activation map, CAM); `explanation` turns those scores into pixel boxes of the photo as it stands upright, and
`write_explanation` draws them. A region is coarse (a quarter of a 2/3-side tile is over a third of the photo's
side), so the box reported is the CAM's, of the tile seen at CAM_SCALE times the model's input side: on a 7-cell
map a cell is as wide as a small sign, and the box, a cell or two, misses it. bench/explain.py measures both boxes
against the generated scenes' known sign boxes.
numpy, Pillow and scipy only, no torch: the geometry is that of model/transforms.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.images import read_image
from ..files import atomic_write_bytes
from ..model.transforms import cell_box, region_box, tile_box

EXPLAIN_SIDE = 1024  # the longest side of the photos `predict --explain` writes, in pixels
CAM_LEVEL = 0.5  # a cell is in the CAM's box at or above this fraction of the way from the lowest cell to the best
CAM_SCALE = 3  # the winning tile's side for its CAM, in model input sides: a 21-cell map for a 7-cell model
SHADE = (200, 20, 30)  # the colour regions are shaded with, more opaque the higher their score
BOX = (255, 214, 0)  # the box's outline: yellow, seen on the red shade and on most photos


@dataclass
class Explanation:
    """Where the model looked in one photo; boxes are (left, top, right, bottom) in pixels of the upright photo."""

    size: tuple[int, int]  # the photo's (width, height), the frame of the boxes
    box: tuple[int, int, int, int]  # the class activation map's box around its best cell: the one to show
    region_box: tuple[int, int, int, int] | None = None  # the winning region's box (regions pooling only)
    region_score: float | None = None  # its score: the positive class's log-odds, else the predicted class's logit
    regions: list[tuple[tuple[int, int, int, int], float]] = field(default_factory=list)  # every region's

    def to_dict(self) -> dict:
        """What a prediction row carries: the box and the winning region's score (None without regions)."""
        return {"box": list(self.box), "region_score": self.region_score}

    def fractions(self) -> tuple[float, ...]:
        """The box as fractions of the photo's width and height, for drawing on a copy of any size."""
        return tuple(value / self.size[index % 2] for index, value in enumerate(self.box))


def explanation(decoded: tuple[int, int], size: tuple[int, int], tiles: int, region_scores: np.ndarray | None,
                cells: tuple[int, int], cam: np.ndarray | None = None, cam_tile: int = 0, pixels: int = 0
                ) -> Explanation:
    """The Explanation of a photo decoded at `decoded` (width, height) whose upright size is `size`: scores of its
    regions (None: a pooling without regions) on the model's (rows, columns) = `cells` feature maps, and the CAM
    (rows, columns, of any size) of tile `cam_tile` of the decode. Without a CAM (a model exported before its
    cell scores were), the box is the winning region's. pixels: the model's --tile-pixels."""
    scale = (size[0] / decoded[0], size[1] / decoded[1])

    def scaled(box) -> tuple[int, ...]:
        return tuple(int(round(value * scale[index % 2])) for index, value in enumerate(box))

    box = scaled(cam_box(cam, tile_box(*decoded, tiles, cam_tile, pixels))) if cam is not None else None
    if region_scores is None:
        return Explanation(tuple(size), box)
    regions = [(scaled(region_box(*decoded, tiles, region, cells, pixels)), float(score))
               for region, score in enumerate(region_scores)]
    winner = int(np.argmax(region_scores))
    return Explanation(tuple(size), box or regions[winner][0], regions[winner][0], regions[winner][1], regions)


def cam_box(cam: np.ndarray, part: tuple[int, int, int, int]) -> tuple[float, ...]:
    """Pixel box of the cells connected to the best cell of `cam` (scores of the cells of image part `part`'s
    feature map) that score at or above CAM_LEVEL of the way from the lowest cell to it; each cell stands for its
    share of the part (its centre ± half a cell)."""
    from scipy import ndimage  # only an explanation needs it

    best = np.unravel_index(int(np.argmax(cam)), cam.shape)
    low = float(cam.min())
    labels, _ = ndimage.label(cam >= low + CAM_LEVEL * (float(cam[best]) - low))
    rows, columns = np.nonzero(labels == labels[best])
    return cell_box(part, cam.shape, slice(rows.min(), rows.max() + 1), slice(columns.min(), columns.max() + 1))


def draw_explanation(image: Image.Image, explained: Explanation) -> Image.Image:
    """The photo (upright, at any scale) with its regions shaded by score, each pixel as red as the best region
    that covers it, and the box outlined (the winning region's box thinly, in white)."""
    scale = (image.width / explained.size[0], image.height / explained.size[1])

    def scaled(box) -> tuple[int, ...]:
        return tuple(int(round(value * scale[index % 2])) for index, value in enumerate(box))

    if explained.regions:
        heat = np.full((image.height, image.width), -np.inf, dtype=np.float32)
        for box, score in explained.regions:
            left, top, right, bottom = scaled(box)
            np.maximum(heat[top:bottom, left:right], score, out=heat[top:bottom, left:right])
        low, high = float(heat.min()), float(heat.max())
        share = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
        mask = Image.fromarray(np.uint8(np.nan_to_num(share) * 140))  # at most ~55% opaque: the photo shows through
        image = Image.composite(Image.new("RGB", image.size, SHADE), image, mask)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 150))
    if explained.region_box:
        draw.rectangle(scaled(explained.region_box), outline="white", width=max(1, width // 2))
    draw.rectangle(scaled(explained.box), outline=BOX, width=width)
    return image


def write_explanation(path: Path, explained: Explanation, folder: Path, taken: set[str]) -> Path:
    """The photo at `path` drawn with its explanation into `folder` as <name>.jpg (<name>-2.jpg... when an
    earlier photo of this call had the name: `taken`), at most EXPLAIN_SIDE pixels a side."""
    image = read_image(path, draft=(EXPLAIN_SIDE, EXPLAIN_SIDE))
    image.thumbnail((EXPLAIN_SIDE, EXPLAIN_SIDE))
    name, count = Path(path).stem, 1
    while f"{name}.jpg" in taken:
        count += 1
        name = f"{Path(path).stem}-{count}"
    taken.add(f"{name}.jpg")
    buffer = io.BytesIO()
    draw_explanation(image, explained).save(buffer, format="JPEG", quality=90)
    return atomic_write_bytes(Path(folder) / f"{name}.jpg", buffer.getvalue(), durable=False)
