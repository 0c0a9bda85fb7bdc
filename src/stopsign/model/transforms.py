"""What a backbone sees of an image: resize, normalise, the augmentation draws (flip, rotation; --finetune's
stronger ones, jittered), the tiles, and the pixels each region of a tile's feature map covers (region_box).

Both training paths draw through `view_params`: the cached path's augmented view k and the live path's view
at epoch e (k = e + 1) of the same image under the same seed are the same flip and angle. numpy and Pillow
only, no torch, so that an onnxruntime-only deployment preprocesses exactly as training did.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

REGIONS = 4  # --pooling regions: the max over each of 2×2 overlapping quarters of the last feature map
FULL_DECODE = 1 << 16  # a JPEG draft target larger than any image: decode it at its own size


def resize(image: Image.Image, size: int) -> Image.Image:
    """size×size, bilinear, antialiased when shrinking: exactly what torchvision's TF.resize does to a PIL image."""
    return image.resize((size, size), Image.Resampling.BILINEAR)


def normalize(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """RGB pixels to a (3, H, W) float32 array: /255, then (x - mean) / std per channel, in float32 as torch does."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def preprocess(image: Image.Image, preprocessing: dict, flip: bool = False, angle: float = 0.0) -> np.ndarray:
    """The one preprocessing of the package: a decoded RGB image to a backbone's (3, size, size) input, with an
    optional flip and rotation of the resized image in between (an augmented view)."""
    image = resize(image, preprocessing["size"])
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # what torchvision's TF.hflip does to a PIL image
    if angle:
        # TF.rotate on a PIL image is this call (same centre, black fill, no expansion): identical pixels.
        image = image.rotate(angle, Image.Resampling.BILINEAR)
    return normalize(image, preprocessing)


def view_params(digest: str, view: int, seed: int, rotation: float) -> tuple[bool, float]:
    """View 0 is the plain image; view k >= 1 draws a flip and an angle from (seed, image content, k)."""
    if view == 0:
        return False, 0.0
    rng = np.random.default_rng([seed, view, int(digest[:15], 16)])
    return bool(rng.random() < 0.5), float(rng.uniform(-rotation, rotation))


def jittered(image: Image.Image, rng: np.random.Generator, rotation: float) -> tuple[Image.Image, bool, float]:
    """A --finetune training view's draw: a random resized crop (torchvision's RandomResizedCrop with scale 0.6-1,
    ratio 3/4-4/3) with brightness, contrast and saturation jittered by up to 20% (ColorJitter(0.2, 0.2, 0.2)),
    and the flip and angle that preprocess() applies."""
    width, height = image.size
    area = width * height * rng.uniform(0.6, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_width = min(width, max(1, round(math.sqrt(area * ratio))))
    crop_height = min(height, max(1, round(math.sqrt(area / ratio))))
    left, top = rng.integers(0, width - crop_width + 1), rng.integers(0, height - crop_height + 1)
    image = image.crop((int(left), int(top), int(left) + crop_width, int(top) + crop_height))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.8, 1.2))
    return image, bool(rng.random() < 0.5), float(rng.uniform(-rotation, rotation))


def view_tag(view: int, seed: int, rotation: float) -> str:
    """How the feature store names a view: the plain view, or augmented view k of (seed, rotation)."""
    return "plain" if view == 0 else f"aug-s{seed}-r{rotation:g}-{view}"


def tile_count(tiles: int) -> int:
    """Images a view is seen as: the whole image alone, or the whole image and a K×K grid of crops (with
    --tile-pixels, at most K×K crops; the rest of the K×K slots repeat the whole image)."""
    return 1 if tiles <= 1 else tiles * tiles + 1


def tile_box(width: int, height: int, tiles: int, index: int, pixels: int = 0) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of tile `index`: 0 is the whole image; 1..K×K the crops of a K×K grid,
    row by row, each 2/(K+1) of the side and overlapping its neighbours by half (a 2×2 grid: 2/3-side crops).
    pixels > 0: the crops of pixel_grid instead, row by row, and the whole image in the slots left over."""
    if index == 0 or tiles <= 1:
        return 0, 0, width, height
    if pixels:
        columns, rows, side = pixel_grid(width, height, tiles, pixels)
        if index > columns * rows:
            return 0, 0, width, height
        row, column = divmod(index - 1, columns)
        crop_width, crop_height = min(side, width), min(side, height)
        left = column * (width - crop_width) / max(1, columns - 1)
        top = row * (height - crop_height) / max(1, rows - 1)
        return round(left), round(top), round(left + crop_width), round(top + crop_height)
    row, column = divmod(index - 1, tiles)
    side = 2 / (tiles + 1)
    left, top = column * side / 2, row * side / 2
    return (round(left * width), round(top * height), round((left + side) * width), round((top + side) * height))


def pixel_grid(width: int, height: int, tiles: int, pixels: int) -> tuple[int, int, float]:
    """(columns, rows, side) of the --tile-pixels crops of a width × height image: squares of `pixels` a side in
    the image's own pixels, or of 2/3 of its shorter side where that is less (a small photo is cut as the default
    2×2 grid cuts it, so its crops still zoom in); the fewest that cover it, spread evenly; where that takes more
    than tiles × tiles crops, the smallest larger side that covers it with that many. A crop is resized to the
    model's input, so a sign of s pixels is seen at s × input / side."""
    pixels = min(pixels, 2 * min(width, height) / 3)
    limit, best = tiles * tiles, float(max(width, height))
    for count in range(1, limit + 1):  # each side that makes `count` columns, or rows, just fit
        for side in (max(pixels, width / count), max(pixels, height / count)):
            if side < best and _cover(width, side) * _cover(height, side) <= limit:
                best = side
    return _cover(width, best), _cover(height, best), best


def _cover(length: int, side: float) -> int:
    """Crops of `side` that cover `length` (a hair of slack for the division that made `side`)."""
    return max(1, math.ceil(length / side - 1e-9))


def quarters(length: int) -> tuple[slice, slice]:
    """Two overlapping windows along a side of `length` cells, each just over half of it (7 cells: 0-3 and 3-6;
    1 cell: that cell twice)."""
    size = length // 2 + 1
    return slice(0, size), slice(length - size, length)


def region_box(width: int, height: int, tiles: int, region: int, cells: tuple[int, int], pixels: int = 0
               ) -> tuple[float, ...]:
    """Pixel box (left, top, right, bottom) of region `region` of a regions head's input (tile after tile, each
    tile's REGIONS quarters row by row, as model.pooling lays them out): its tile's box, then the quarter's cells
    of that tile's (rows, columns) = `cells` feature map as the same fraction of it."""
    tile, quarter = divmod(region, REGIONS)
    left, top, right, bottom = tile_box(width, height, tiles, tile, pixels)
    rows, columns = quarters(cells[0])[quarter // 2], quarters(cells[1])[quarter % 2]
    return cell_box((left, top, right, bottom), cells, rows, columns)


def cell_box(box: tuple[int, int, int, int], cells: tuple[int, int], rows: slice, columns: slice
             ) -> tuple[float, ...]:
    """Pixel box of the cells rows × columns of a (rows, columns) = `cells` feature map of the image part `box`:
    each cell stands for an equal share of the part's side (the part is resized to a square input)."""
    left, top, right, bottom = box
    x, y = (right - left) / cells[1], (bottom - top) / cells[0]
    return left + columns.start * x, top + rows.start * y, left + columns.stop * x, top + rows.stop * y


def decode_size(preprocessing: dict, tiles: int, pixels: int = 0) -> int:
    """The smallest side to decode an image at (JPEG draft) so that every tile still has `size` pixels; with
    --tile-pixels, the image's own pixels (FULL_DECODE: larger than any image, so no reduced decode)."""
    if pixels and tiles > 1:
        return FULL_DECODE
    return preprocessing["size"] if tiles <= 1 else -(-preprocessing["size"] * (tiles + 1) // 2)


def tile_views(image: Image.Image, preprocessing: dict, tiles: int, flip: bool = False,
               angle: float = 0.0, pixels: int = 0) -> list[np.ndarray]:
    """preprocess() of each tile of `image` (tile_count(tiles) arrays), each with the view's flip and rotation.
    Under the max that combines tiles, flipping each tile is flipping the whole image."""
    return [preprocess(image.crop(tile_box(*image.size, tiles, index, pixels)) if index else image, preprocessing,
                       flip, angle) for index in range(tile_count(tiles))]
