"""The built-in demo data: rendered street scenes with and without a stop sign, written as a CV Studio export.

Every scene is a one-point-perspective street (sky, facades with windows, road, sidewalks, trees, poles, cars,
clutter) seen through a random camera (exposure, white balance, blur, noise, JPEG). Positives hold one red
octagonal STOP sign; half the negatives hold things a lazy classifier would confuse with it (yield and no-entry
signs, speed-limit and street-name plates, red cars, brick buildings), so the model must learn the octagon and
the word, not "red". One numpy Generator, seeded once, drives every draw: one seed gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from ..config import DEMO_PER_CLASS
from ..errors import StopsignError
from ..files import atomic_write, staging_folder
from .datasets import ANNOTATIONS

log = logging.getLogger(__name__)

CLASS_NAMES = ["not_stop", "stop"]
CONFUSERS = ("yield", "speed_limit", "no_entry", "street_name", "red_car", "brick_building")

# (zenith, horizon): day, haze, overcast, dusk, dawn
SKIES = [((70, 130, 200), (190, 215, 235)), ((140, 165, 190), (220, 225, 225)), ((145, 150, 155), (205, 205, 205)),
         ((60, 60, 120), (240, 160, 110)), ((120, 150, 200), (250, 210, 170))]
FACADE_COLOURS = [(200, 190, 170), (170, 170, 165), (140, 120, 100), (225, 215, 195), (120, 130, 140), (190, 160, 120)]
BRICK = (150, 60, 45)
CAR_COLOURS = [(30, 30, 35), (200, 200, 205), (120, 125, 130), (30, 60, 120), (235, 235, 235), (40, 80, 50)]
SIGN_RED = (200, 20, 30)
WHITE = (245, 245, 245)
STREET_NAMES = ["MAIN ST", "OAK AVE", "ELM ST", "2ND ST", "PARK RD", "HILL ST", "LAKE AVE"]


@dataclass
class Scene:
    image: Image.Image
    stop_box: tuple[int, int, int, int] | None  # the stop sign's pixel box (left, top, right, bottom), if any
    occluder: str | None  # what partly hides the stop sign: "tree", "car", "pole" or None


PARAMETERS_FILE = "demo.json"  # what a generated data set was made with, so a different request regenerates it
GENERATOR_VERSION = 1  # raise when render_scene draws differently


def parameters(per_class: int, seed: int, size: int) -> dict:
    return {"per_class": per_class, "seed": seed, "size": size, "generator": GENERATOR_VERSION}


def demo_data(out_dir, *, per_class: int = DEMO_PER_CLASS, seed: int = 0, size: int = 256, progress: bool = False
              ) -> tuple[Path, bool]:
    """The demo data set in out_dir made with these parameters: reused when it is there (True), else generated,
    replacing an earlier demo data set made with other parameters (False). Any other folder is left alone."""
    out_dir = Path(out_dir)
    with contextlib.suppress(OSError, ValueError):  # no record, or a damaged one: the data set is generated anew
        record = json.loads((out_dir / PARAMETERS_FILE).read_text())
        if record == parameters(per_class, seed, size) and (out_dir / ANNOTATIONS).is_file():
            return out_dir, True
    if entries := {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set():
        if not entries <= {PARAMETERS_FILE, ANNOTATIONS, "images"} or ANNOTATIONS not in entries:
            raise StopsignError(f"{out_dir} holds something other than stopsign's demo data; delete it or choose "
                                "another folder with --data")
        shutil.rmtree(out_dir)  # an earlier demo data set, made with other parameters
    return make_demo_data(out_dir, per_class=per_class, seed=seed, size=size, progress=progress), False


def make_demo_data(out_dir, *, per_class: int = DEMO_PER_CLASS, seed: int = 0, size: int = 256,
                   progress: bool = False) -> Path:
    """Render per_class stop and per_class not-stop scenes into out_dir as a CV Studio export; return out_dir."""
    out_dir = Path(out_dir)
    if per_class < 1 or size < 64:
        raise StopsignError(f"demo data needs per_class >= 1 and size >= 64, got per_class={per_class}, size={size}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StopsignError(f"{out_dir} is not empty; delete it or choose a new folder for the demo data")
    rng = np.random.default_rng(seed)
    # Half the negatives carry confusers by construction, so every data set has them, whatever its size.
    jobs = [("stop", ())] * per_class + [("not_stop", ())] * (per_class - per_class // 2)
    jobs += [("not_stop", draw_confusers(rng)) for _ in range(per_class // 2)]
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]

    # Build next to out_dir and rename at the end, so out_dir only ever holds a complete export.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out_dir.parent, prefix=f".{out_dir.name}-")
    try:
        (staging / "images").mkdir()
        annotations = {}
        for label, confusers in tqdm(jobs, desc="demo images", unit="image", disable=not progress):
            image_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            scene = render_scene(rng, size, stop=label == "stop", confusers=confusers)
            scene.image.save(staging / "images" / f"{image_id}.jpg", quality=90)
            annotations[f"{image_id}.jpg"] = [{"label": label, "id": image_id}]
        export = {"version": "1.0", "type": "classification", "labels": CLASS_NAMES, "annotations": annotations}
        (staging / ANNOTATIONS).write_text(json.dumps(export, indent=1))
        (staging / PARAMETERS_FILE).write_text(json.dumps(parameters(per_class, seed, size)) + "\n")
        staging.rename(out_dir)  # replaces an empty out_dir
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.debug("wrote %d demo images (%d per class) to %s", len(jobs), per_class, out_dir)
    return out_dir


def synthetic_negatives(folder, count: int, *, seed: int = 0, size: int = 256, progress: bool = False
                        ) -> list[Path]:
    """`count` rendered street scenes without a stop sign, each with one to three confusers (other signs, red
    cars, brick), as JPEG files in `folder` (made once for each (count, seed, size); a later call reads them)."""
    folder = Path(folder) / f"n{count}-s{seed}-{size}px-v{GENERATOR_VERSION}"
    paths = [folder / f"negative-{index:05d}.jpg" for index in range(count)]
    if all(path.is_file() for path in paths):
        return paths
    rng = np.random.default_rng([seed, count, 7])  # not the demo data's own stream: other scenes
    for path in tqdm(paths, desc="synthetic negatives", unit="image", disable=not progress):
        image = render_scene(rng, size, stop=False, confusers=draw_confusers(rng)).image
        # a cache: training skips a damaged file, named
        atomic_write(path, lambda file: image.save(file, format="JPEG", quality=90), durable=False)
    return paths


def draw_confusers(rng: np.random.Generator) -> tuple[str, ...]:
    return tuple(str(name) for name in rng.choice(CONFUSERS, rng.integers(1, 4), replace=False))


def render_scene(rng: np.random.Generator, size: int, *, stop: bool, confusers=()) -> Scene:
    """One street scene, with a stop sign when stop is true and each named confuser drawn on purpose."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA fills blend: shadows, clouds, lit windows
    street = Street.random(rng, size)
    draw_sky(image, draw, street, rng)
    draw_far_buildings(draw, street, rng)
    draw_road(draw, street, rng)
    for side in (-1, 1):
        if rng.random() < 0.85:  # else an open lot on that side
            draw_facades(draw, street, rng, side, brick="brick_building" in confusers or rng.random() < 0.15)
    for _ in range(rng.integers(0, 4)):
        x, y, depth = street.sidewalk_point(rng)
        draw_tree(draw, x, y, size * rng.uniform(0.4, 0.8) * depth, rng)
    for _ in range(rng.integers(0, 3)):
        x, y, depth = street.sidewalk_point(rng)
        draw_pole(draw, x, y - 0.9 * size * depth, y, max(2, 0.012 * size * depth), top_arm=True)
    draw_clutter(draw, street, rng)
    cars = max(int(rng.integers(0, 4)), int("red_car" in confusers))
    for i, depth in enumerate(sorted(rng.uniform(0.15, 1.0, cars))):  # far to near, so near cars hide far ones
        red = ("red_car" in confusers and i == cars - 1) or rng.random() < 0.1
        x = street.vanish_x + rng.uniform(-0.6, 0.6) * street.road_half * depth
        draw_car(draw, x, street.ground_y(depth), 0.55 * street.road_half * depth, rng, red=red)

    signs = [name for name in confusers if name in SIGN_PATCHES]
    if stop and rng.random() < 0.15:  # now and then a positive has another sign too, as real corners do
        signs.append(rng.choice(list(SIGN_PATCHES)))
    for name in signs:
        place_sign(image, draw, SIGN_PATCHES[name](rng), size * log_uniform(rng, 0.08, 0.3), rng)
    stop_box = occluder = None
    if stop:
        stop_box = place_sign(image, draw, stop_sign_patch(rng), size * log_uniform(rng, 0.08, 0.45), rng)
        if rng.random() < 0.25:
            occluder = occlude(draw, stop_box, str(rng.choice(["tree", "car", "pole"])), rng, size)
    return Scene(apply_camera(image, rng), stop_box, occluder)


# --- the street --------------------------------------------------------------------------------------------------
@dataclass
class Street:
    """One-point perspective: everything on the ground converges on (vanish_x, horizon)."""

    size: int
    horizon: float
    vanish_x: float
    road_half: float  # half the road's width where it meets the bottom edge
    walk_half: float  # half the width out to the sidewalks' outer edges at the bottom edge

    @classmethod
    def random(cls, rng, size):
        road_half = size * rng.uniform(0.4, 0.8)
        horizon, vanish_x = size * rng.uniform(0.38, 0.55), size * rng.uniform(0.3, 0.7)
        return cls(size, horizon, vanish_x, road_half, road_half * rng.uniform(1.4, 1.9))

    def ground_y(self, depth):
        """The image row of ground at depth (0 at the horizon, 1 at the bottom edge, more is nearer still)."""
        return self.horizon + (self.size - self.horizon) * depth

    def sidewalk_point(self, rng):
        """(x, y, depth) of a random spot on either sidewalk."""
        depth = rng.uniform(0.2, 1.0)
        half = rng.uniform(self.road_half * 1.1, self.walk_half)
        return self.vanish_x + rng.choice([-1, 1]) * half * depth, self.ground_y(depth), depth


def log_uniform(rng, low, high):
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def jitter(rng, colour, amount=15):
    return tuple(int(c) for c in np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255))


def draw_sky(image, draw, street, rng):
    zenith, horizon = SKIES[rng.integers(len(SKIES))]
    rows = np.clip(np.arange(image.height) / street.horizon, 0, 1)[:, None, None] ** 0.7
    sky = np.array(jitter(rng, zenith, 20)) * (1 - rows) + np.array(jitter(rng, horizon, 20)) * rows
    image.paste(Image.fromarray(np.broadcast_to(sky, (image.height, image.width, 3)).astype(np.uint8)))
    for _ in range(rng.integers(0, 4)):  # clouds: clusters of translucent puffs
        x, y = rng.uniform(0, street.size), rng.uniform(0, street.horizon * 0.7)
        r = street.size * rng.uniform(0.03, 0.08)
        for dx, dy in rng.normal(0, r, (5, 2)):
            draw.ellipse((x + dx - r, y + dy / 3 - r / 2, x + dx + r, y + dy / 3 + r / 2), fill=(250, 250, 250, 110))


def draw_far_buildings(draw, street, rng):
    """A low skyline where the street ends, so the vanishing point is not bare sky."""
    x = street.vanish_x - street.size * 0.25
    while x < street.vanish_x + street.size * 0.25:
        width, height = street.size * rng.uniform(0.03, 0.08), street.size * rng.uniform(0.02, 0.12)
        draw.rectangle((x, street.horizon - height, x + width, street.horizon), fill=jitter(rng, (150, 155, 165), 20))
        x += width


def draw_facades(draw, street, rng, side, brick):
    """Building fronts along one sidewalk, as quads converging on the vanishing point, with rows of windows."""
    far = 0.04
    near = rng.uniform(1.3, 2.5)  # depth of the nearest building's front edge (past the bottom edge: off-frame)
    while near > far:
        depth_far = max(far, near * rng.uniform(0.45, 0.75))
        height = street.size * rng.uniform(0.25, 1.1)  # facade height in pixels at depth 1
        is_brick = brick and depth_far < 0.9  # the nearest building that is in view
        brick = brick and not is_brick
        colour = jitter(rng, BRICK, 20) if is_brick else jitter(rng, FACADE_COLOURS[rng.integers(len(FACADE_COLOURS))])

        def point(depth, up):  # up: 0 at the foot of the facade, 1 at its top
            return (street.vanish_x + side * street.walk_half * depth,
                    street.horizon + depth * ((street.size - street.horizon) * (1 - up) - height * up))

        draw.polygon([point(near, 0), point(depth_far, 0), point(depth_far, 1), point(near, 1)], fill=colour)
        if is_brick:  # mortar courses
            for up in np.linspace(0, 1, 40):
                draw.line([point(near, up), point(depth_far, up)], fill=(120, 110, 100, 120))
        # Windows are evenly spaced in distance, which is 1/depth in this projection.
        distances = np.linspace(1 / near, 1 / depth_far, rng.integers(3, 7) * 2 + 2)[1:-1]
        window = (40, 55, 75, 230) if rng.random() < 0.7 else (240, 220, 150, 230)
        floors = np.linspace(0.08, 0.95, rng.integers(3, 9) * 2)
        for d0, d1 in zip(distances[::2], distances[1::2]):
            for up0, up1 in zip(floors[::2], floors[1::2]):
                corners = [(1 / d0, up0), (1 / d1, up0), (1 / d1, up1), (1 / d0, up1)]
                draw.polygon([point(depth, up) for depth, up in corners], fill=window)
        near = depth_far


def draw_road(draw, street, rng):
    s, vx, hy = street.size, street.vanish_x, street.horizon
    ground = (95, 130, 70) if rng.random() < 0.3 else (150, 150, 145)
    draw.rectangle((0, hy, s, s), fill=jitter(rng, ground))
    below = [(vx - street.walk_half * 3, street.ground_y(3)), (vx + street.walk_half * 3, street.ground_y(3))]
    draw.polygon([(vx, hy), *below[::-1]], fill=jitter(rng, (175, 172, 165), 12))
    road = [(vx, hy), (vx + street.road_half * 3, street.ground_y(3)), (vx - street.road_half * 3, street.ground_y(3))]
    draw.polygon(road, fill=jitter(rng, (75, 75, 80), 15))
    for side in (-1, 1):  # curbs
        curb = [(vx, hy), (vx + side * street.road_half * 3, street.ground_y(3))]
        draw.line(curb, fill=(205, 205, 200), width=max(1, s // 100))
    line = (240, 200, 40) if rng.random() < 0.5 else WHITE
    offset = rng.uniform(-0.15, 0.15) * street.road_half
    for start in np.linspace(0.02, 1.2, 9) ** 1.6:  # centre dashes, longer as they come nearer
        quad = [(vx + (offset + side * 0.012 * s) * d, street.ground_y(d)) for d, side in
                [(start, -1), (start, 1), (start * 1.35, 1), (start * 1.35, -1)]]
        draw.polygon(quad, fill=line)
    if rng.random() < 0.3:  # a zebra crossing
        depth = rng.uniform(0.5, 0.9)
        far, near = street.ground_y(depth), street.ground_y(depth * 1.15)
        for u in np.linspace(-1, 1, 8):
            x, unit = vx + u * street.road_half * depth, s * depth
            stripe = [(x, far), (x + 0.05 * unit, far), (x + 0.06 * unit, near), (x + 0.01 * unit, near)]
            draw.polygon(stripe, fill=WHITE)


def draw_canopy(draw, x, y, radius, rng):
    green = jitter(rng, (55, 105, 45), 20)
    for dx, dy in rng.normal(0, radius * 0.45, (7, 2)):
        r = radius * rng.uniform(0.45, 0.7)
        draw.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill=jitter(rng, green, 12))


def draw_tree(draw, x, y, height, rng):
    if rng.random() < 0.3:  # a bush
        draw_canopy(draw, x, y - 0.1 * height, 0.15 * height, rng)
        return
    draw.rectangle((x - 0.03 * height, y - 0.6 * height, x + 0.03 * height, y), fill=jitter(rng, (90, 65, 45)))
    draw_canopy(draw, x, y - 0.75 * height, 0.3 * height, rng)


def draw_pole(draw, x, top, bottom, width, top_arm=False):
    draw.rectangle((x - width / 2, top, x + width / 2, bottom), fill=(110, 112, 115))
    if top_arm:  # a street lamp
        draw.line([(x, top), (x + 6 * width, top - 2 * width)], fill=(110, 112, 115), width=int(width))
        draw.ellipse((x + 5 * width, top - 3 * width, x + 8 * width, top - width), fill=(230, 230, 200))


def draw_car(draw, x, bottom, width, rng, red=False):
    """A car seen from behind: body, rear window, tail lights, plate, wheels and a shadow."""
    body = jitter(rng, (190, 20, 25), 15) if red else jitter(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    w, h = width, width * 0.75
    draw.ellipse((x - 0.6 * w, bottom - 0.08 * h, x + 0.6 * w, bottom + 0.06 * h), fill=(0, 0, 0, 90))
    for side in (-1, 1):  # wheels
        wheel = x + side * 0.42 * w
        draw.rectangle((wheel - 0.09 * w, bottom - 0.15 * h, wheel + 0.09 * w, bottom), fill=(20, 20, 20))
    draw.polygon([(x - 0.38 * w, bottom - 0.55 * h), (x + 0.38 * w, bottom - 0.55 * h),
                  (x + 0.3 * w, bottom - h), (x - 0.3 * w, bottom - h)], fill=body)
    draw.polygon([(x - 0.33 * w, bottom - 0.58 * h), (x + 0.33 * w, bottom - 0.58 * h),
                  (x + 0.27 * w, bottom - 0.93 * h), (x - 0.27 * w, bottom - 0.93 * h)], fill=(45, 55, 70))
    draw.rounded_rectangle((x - 0.5 * w, bottom - 0.6 * h, x + 0.5 * w, bottom - 0.1 * h), radius=0.08 * w, fill=body)
    for side in (-1, 1):  # tail lights
        light = x + side * 0.45 * w
        draw.rectangle((light - 0.05 * w, bottom - 0.5 * h, light + 0.05 * w, bottom - 0.38 * h), fill=(210, 30, 30))
    draw.rectangle((x - 0.12 * w, bottom - 0.35 * h, x + 0.12 * w, bottom - 0.22 * h), fill=(235, 235, 225))


def draw_clutter(draw, street, rng):
    """Bins, hydrants, cones and boxes on the sidewalks."""
    for _ in range(rng.integers(0, 5)):
        x, y, depth = street.sidewalk_point(rng)
        unit = street.size * 0.06 * depth
        kind = rng.integers(4)
        if kind == 0:  # bin
            draw.rectangle((x - unit / 2, y - 1.3 * unit, x + unit / 2, y), fill=jitter(rng, (50, 80, 60), 25))
        elif kind == 1:  # hydrant
            draw.rectangle((x - unit / 4, y - unit, x + unit / 4, y), fill=jitter(rng, (200, 160, 30), 30))
        elif kind == 2:  # traffic cone
            draw.polygon([(x - unit / 3, y), (x + unit / 3, y), (x, y - 1.1 * unit)], fill=(240, 110, 20))
        else:  # crate
            draw.rectangle((x - unit / 2, y - unit * 0.8, x + unit / 2, y), fill=jitter(rng, (150, 120, 80), 25))


# --- signs -------------------------------------------------------------------------------------------------------
PATCH = 200  # signs are drawn this big, then warped and shrunk to fit, which anti-aliases the small ones


@functools.lru_cache(maxsize=None)
def _text_mask(text: str) -> Image.Image:
    """The text in Pillow's built-in font, bold by stroke, cropped to the ink; callers resize a copy to fit."""
    try:
        font = ImageFont.load_default(size=64)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font; the resize still scales it to the sign
        font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text, stroke_width=2)
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font, stroke_width=2, stroke_fill=255)
    return mask


def _write(patch, text, box, colour):
    left, top, right, bottom = (round(v) for v in box)
    patch.paste(colour, (left, top), _text_mask(text).resize((right - left, bottom - top), Image.Resampling.LANCZOS))


def stop_sign_patch(rng):
    """A red octagon with a white rim and STOP in white, on a transparent square."""
    patch = Image.new("RGBA", (PATCH, PATCH))
    draw, centre = ImageDraw.Draw(patch), PATCH / 2
    draw.regular_polygon((centre, centre, centre), 8, fill=jitter(rng, WHITE, 10))
    draw.regular_polygon((centre, centre, centre * 0.9), 8, fill=jitter(rng, SIGN_RED, 25))
    _write(patch, "STOP", (0.17 * PATCH, 0.38 * PATCH, 0.83 * PATCH, 0.62 * PATCH), jitter(rng, WHITE, 10))
    return patch


def yield_sign_patch(rng):
    """A point-down triangle: red border, white inside."""
    patch = Image.new("RGBA", (PATCH, round(PATCH * 0.87)))
    draw = ImageDraw.Draw(patch)
    corners = np.array([(0, 0), (PATCH, 0), (PATCH / 2, PATCH * 0.87)])
    centroid = corners.mean(axis=0)
    draw.polygon([tuple(p) for p in corners], fill=jitter(rng, SIGN_RED, 25))
    draw.polygon([tuple(p) for p in centroid + (corners - centroid) * 0.62], fill=jitter(rng, WHITE, 10))
    return patch


def no_entry_patch(rng):
    """A red disc with a white bar."""
    patch = Image.new("RGBA", (PATCH, PATCH))
    draw = ImageDraw.Draw(patch)
    draw.ellipse((0, 0, PATCH - 1, PATCH - 1), fill=jitter(rng, SIGN_RED, 25))
    draw.rectangle((0.18 * PATCH, 0.41 * PATCH, 0.82 * PATCH, 0.59 * PATCH), fill=jitter(rng, WHITE, 10))
    return patch


def speed_limit_patch(rng):
    """A white plate with a black rim and SPEED LIMIT 30 in black."""
    width, height = round(PATCH * 0.8), PATCH
    patch = Image.new("RGBA", (width, height))
    ImageDraw.Draw(patch).rounded_rectangle((0, 0, width - 1, height - 1), radius=12, fill=jitter(rng, WHITE, 10),
                                            outline=(20, 20, 20), width=6)
    for text, (left, top, right, bottom) in (("SPEED", (0.15, 0.1, 0.85, 0.25)), ("LIMIT", (0.18, 0.3, 0.82, 0.45)),
                                             ("30", (0.2, 0.52, 0.8, 0.88))):
        _write(patch, text, (left * width, top * height, right * width, bottom * height), (20, 20, 20))
    return patch


def street_name_patch(rng):
    """A long blue or green plate with a white rim and a street name in white."""
    width, height = round(PATCH * 2.2), round(PATCH * 0.5)
    patch = Image.new("RGBA", (width, height))
    colour = (20, 110, 60) if rng.random() < 0.5 else (25, 60, 150)
    ImageDraw.Draw(patch).rounded_rectangle((0, 0, width - 1, height - 1), radius=10, fill=jitter(rng, colour),
                                            outline=WHITE, width=6)
    name = STREET_NAMES[rng.integers(len(STREET_NAMES))]
    _write(patch, name, (0.1 * width, 0.25 * height, 0.9 * width, 0.75 * height), WHITE)
    return patch


SIGN_PATCHES = {"yield": yield_sign_patch, "speed_limit": speed_limit_patch,
                "no_entry": no_entry_patch, "street_name": street_name_patch}


def _perspective_coefficients(source, target):
    """The 8 numbers of PIL's PERSPECTIVE transform mapping each target corner back to its source corner.

    Hand-written because PIL takes only the coefficients, and torchvision's helper is private."""
    rows, values = [], []
    for (x, y), (u, v) in zip(target, source):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        values += [u, v]
    return np.linalg.solve(np.array(rows, dtype=float), np.array(values, dtype=float)).tolist()


def warp_patch(patch, rng, max_degrees=8.0, max_turn=0.35):
    """The patch seen slightly off-axis: rotated in the picture plane, turned about its pole, corners jittered."""
    w, h = patch.size
    source = np.array([(0, 0), (w, 0), (w, h), (0, h)], dtype=float)
    corners = source - (w / 2, h / 2)
    turn = rng.uniform(-max_turn, max_turn)  # the edge turned towards the camera grows, and the face narrows
    corners[:, 1] *= 1 + turn * np.sign(corners[:, 0]) * 0.3
    corners[:, 0] *= 1 - abs(turn) * 0.5
    angle = math.radians(rng.uniform(-max_degrees, max_degrees))
    corners = corners @ np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    corners += rng.normal(0, 0.015 * w, corners.shape)
    corners -= corners.min(axis=0)
    size = tuple(int(math.ceil(v)) for v in corners.max(axis=0))
    coefficients = _perspective_coefficients(source, corners)
    return patch.transform(size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC)


def place_sign(image, draw, patch, width, rng):
    """Put the patch, width pixels wide, on a pole at a random spot; return its pixel box."""
    size = image.width
    height = width * patch.height / patch.width
    x = rng.uniform(width * 0.55, size - width * 0.55)
    y = rng.uniform(height * 0.55, max(height * 0.55, min(0.65 * size, size - height * 0.55)))
    draw_pole(draw, x, y, y + width * rng.uniform(1.5, 4), max(2, 0.06 * width))
    warped = warp_patch(patch, rng)
    scale = width / patch.width
    shrunk = (max(1, round(warped.width * scale)), max(1, round(warped.height * scale)))
    warped = warped.resize(shrunk, Image.Resampling.LANCZOS)
    left, top = round(x - warped.width / 2), round(y - warped.height / 2)
    image.paste(warped, (left, top), warped)
    return left, top, left + warped.width, top + warped.height


def occlude(draw, box, kind, rng, size):
    """Hide up to about a third of the sign in box behind a tree, a car or a pole; return the one drawn."""
    left, top, right, bottom = box
    width = right - left
    # A car stands on the road near the camera, so it can reach only a sign that is low in the picture.
    car_width = (size * 1.05 - (bottom - 0.35 * (bottom - top))) / 0.75  # roof a third up the sign
    if kind == "car" and car_width > 0.9 * size:
        kind = "tree"
    side = rng.choice([-1, 1])
    edge = right if side > 0 else left
    if kind == "tree":
        draw_canopy(draw, edge + side * 0.15 * width, rng.uniform(top, bottom), 0.4 * width, rng)
    elif kind == "car":
        draw_car(draw, rng.uniform(left, right), size * 1.05, car_width, rng)
    else:
        draw_pole(draw, edge - side * rng.uniform(0.2, 0.35) * width, 0, size, max(2, 0.1 * width))
    return kind


# --- the camera --------------------------------------------------------------------------------------------------
def apply_camera(image, rng):
    """Exposure, white balance, focus blur, sensor noise and an earlier JPEG save, each drawn at random."""
    pixels = np.asarray(image, dtype=np.float32)
    gain = rng.uniform(0.6, 1.2) * rng.uniform(0.9, 1.1, 3)
    pixels = pixels * gain + rng.uniform(-15, 15)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * image.width / 256))
    noise = rng.normal(0, rng.uniform(0, 8), (image.height, image.width, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(30, 85)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image
