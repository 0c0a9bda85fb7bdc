"""What a backbone sees of an image: resize, normalise, and the augmentation draws (flip, rotation).

Both training paths draw through `view_params`: the cached path's augmented view k and the live path's view
at epoch e (k = e + 1) of the same image under the same seed are the same flip and angle. numpy and Pillow
only, no torch, so that an onnxruntime-only deployment preprocesses exactly as training did.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


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


def view_tag(view: int, seed: int, rotation: float) -> str:
    """How the feature store names a view: the plain view, or augmented view k of (seed, rotation)."""
    return "plain" if view == 0 else f"aug-s{seed}-r{rotation:g}-{view}"
