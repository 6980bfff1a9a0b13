"""The toy world's scenes: one object with a shape, a surface, a pose and a lighting, on a background.

Every attribute is a small closed vocabulary, so a classifier can read each one
back from an image and every number measured on the world has exact ground
truth. A scene renders deterministically (numpy + PIL, no randomness beyond
the scene's own ``seed``, which only varies the background texture's grain)
to an RGB image, 64×64 by default:

- shape (the object's word): ball, box, cone, star, ring, cup;
- surface: a colour (8) × a pattern (plain, stripes, dots, checks), drawn
  inside the shape;
- pose: a position (left, centre, right) × a size (small, large);
- lighting: a direction (left, right, top, bottom) × a tint (warm, cool): a
  brightness gradient over the whole scene from the light's side, a colour
  cast, and the object's shadow cast away from the light;
- background: sand, grass, brick, sky (a colour and a texture each).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterator, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ModAdapterError

SHAPES = ("ball", "box", "cone", "star", "ring", "cup")
COLOURS = {  # name -> RGB; far apart in hue and brightness so that lighting cannot turn one into another
    "red": (200, 30, 30), "orange": (235, 130, 20), "yellow": (235, 215, 40), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (130, 50, 180), "pink": (240, 120, 190), "white": (235, 235, 235),
}
PATTERNS = ("plain", "stripes", "dots", "checks")
POSITIONS = ("left", "centre", "right")
SIZES = ("small", "large")
DIRECTIONS = ("left", "right", "top", "bottom")
TINTS = ("warm", "cool")
BACKGROUNDS = ("sand", "grass", "brick", "sky")

# The attributes of a scene, each with its values: what the classifier reads back.
ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "position": POSITIONS, "size": SIZES,
    "direction": DIRECTIONS, "tint": TINTS, "background": BACKGROUNDS,
}
# The concept kinds of the method: an object concept (its word is the shape) carries shape and surface;
# each abstract concept carries one group of attributes.
CONCEPT_ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    "object": ("shape", "colour", "pattern"), "surface": ("colour", "pattern"), "pose": ("position", "size"),
    "lighting": ("direction", "tint"), "background": ("background",),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    pattern: str
    position: str
    size: str
    direction: str
    tint: str
    background: str
    seed: int = 0  # the grain of the background texture only

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ModAdapterError(f"unknown {name} {getattr(self, name)!r}; the world has {', '.join(values)}")

    def attributes(self) -> Dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seed"}

    def replace(self, **changes) -> "Scene":
        return Scene(**{**asdict(self), **changes})


def attribute_sheet(base: "Scene", size: int = 64) -> np.ndarray:
    """One row per attribute: ``base`` with each of the attribute's values in turn (an overview of the world)."""
    width = max(len(values) for values in ATTRIBUTES.values())
    rows = []
    for name, values in ATTRIBUTES.items():
        tiles = [render(base.replace(**{name: value}), size) for value in values]
        tiles += [np.full((size, size, 3), 24, np.uint8)] * (width - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def all_attribute_combinations() -> Iterator[Dict[str, str]]:
    """Every combination of attribute values (6·8·4·3·2·4·2·4 = 36,864)."""
    names = list(ATTRIBUTES)

    def walk(index: int, chosen: Dict[str, str]):
        if index == len(names):
            yield dict(chosen)
            return
        for value in ATTRIBUTES[names[index]]:
            chosen[names[index]] = value
            yield from walk(index + 1, chosen)

    yield from walk(0, {})


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grain = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    if kind == "sand":  # warm beige, fine grain
        base = np.array([205, 180, 130], np.float32)
        image = base + 14 * grain[..., None]
    elif kind == "grass":  # green with vertical blades
        base = np.array([70, 130, 55], np.float32)
        blades = np.sin(x * size * 1.7 + 2 * grain) * 18
        image = base + blades[..., None] * np.array([0.4, 1.0, 0.3], np.float32)
    elif kind == "brick":  # red-brown bricks with light mortar lines
        base = np.array([150, 70, 50], np.float32)
        rows = (y * size // 8).astype(int)
        mortar = ((y * size) % 8 < 1.2) | (((x * size + 8 * (rows % 2)) % 16) < 1.2)
        image = np.where(mortar[..., None], np.array([200, 190, 175], np.float32), base + 8 * grain[..., None])
    else:  # sky: blue, lighter towards the horizon
        image = np.stack([90 + 90 * y, 150 + 70 * y, 235 + 0 * y], axis=-1) + 3 * grain[..., None]
    return image


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """A soft (anti-aliased) mask in 0..1 of the object's outline."""
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    s = supersample
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "ball":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "box":
        k = r * 0.85
        draw.rectangle((cx - k, cy - k, cx + k, cy + k), fill=255)
    elif shape == "cone":
        draw.polygon([(cx, cy - r), (cx + r * 0.9, cy + r), (cx - r * 0.9, cy + r)], fill=255)
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        hole = r * 0.5
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    else:  # cup: a tapered body with a handle on the right
        top, bottom = cy - r * 0.8, cy + r * 0.8
        draw.polygon([(cx - r * 0.75, top), (cx + r * 0.45, top), (cx + r * 0.3, bottom), (cx - r * 0.6, bottom)], fill=255)
        handle = r * 0.42
        draw.ellipse((cx + r * 0.2, cy - handle, cx + r * 0.2 + 2 * handle, cy + handle), outline=255, width=max(1, int(r * 0.2)))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _surface(colour: str, pattern: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """The object's colour with its pattern (a darker shade), over the whole image; the mask cuts it out."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (x - cx) / max(r, 1.0), (y - cy) / max(r, 1.0)  # pattern in the object's own frame: scales with size
    if pattern == "stripes":
        marked = np.sin(u * math.pi * 2.5) > 0.2
    elif pattern == "dots":
        marked = (np.sin(u * math.pi * 2.2) * np.sin(v * math.pi * 2.2)) > 0.45
    elif pattern == "checks":
        marked = (np.floor(u * 2.0) + np.floor(v * 2.0)) % 2 == 0
    else:
        marked = np.zeros((size, size), bool)
    base = np.array(COLOURS[colour], np.float32)
    shade = base * 0.35 if colour != "white" else np.array([90, 90, 90], np.float32)
    return np.where(marked[..., None], shade, base)


def object_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """Where the object is in :func:`render`'s image: a soft mask (size, size) in 0..1."""
    cx, cy, r = _placement(scene, size)
    return _shape_mask(scene.shape, cx, cy, r, size)


def _placement(scene: Scene, size: int) -> Tuple[float, float, float]:
    cx = {"left": 0.27, "centre": 0.5, "right": 0.73}[scene.position] * size
    r = {"small": 0.14, "large": 0.23}[scene.size] * size
    return cx, 0.55 * size, r


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an RGB image (size, size, 3), uint8."""
    if size < 32 or size % 16:
        raise ModAdapterError(f"the world renders at 32, 48, 64, ... pixels (a multiple of 16 from 32), not {size}")
    rng = np.random.default_rng(scene.seed)
    image = _background(scene.background, size, rng)
    cx, cy, r = _placement(scene, size)

    # The shadow falls away from the light, on the background.
    dx, dy = {"left": (1, 0), "right": (-1, 0), "top": (0, 1), "bottom": (0, -1)}[scene.direction]
    shadow = _shape_mask(scene.shape, cx + dx * r * 0.45, cy + dy * r * 0.45, r, size)
    image = image * (1.0 - 0.55 * shadow[..., None])

    mask = _shape_mask(scene.shape, cx, cy, r, size)[..., None]
    image = image * (1.0 - mask) + _surface(scene.colour, scene.pattern, cx, cy, r, size) * mask

    # Light: brighter on the light's side, a warm or cool cast over everything.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    towards = {"left": 1 - x, "right": x, "top": 1 - y, "bottom": y}[scene.direction]
    image = image * (0.55 + 0.75 * towards)[..., None]
    cast = np.array([1.12, 1.0, 0.8] if scene.tint == "warm" else [0.82, 0.95, 1.15], np.float32)
    image = image * cast
    return np.clip(image, 0, 255).astype(np.uint8)
