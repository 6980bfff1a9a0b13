"""The fixed split: attribute combinations held out from every model's training, for evaluation only.

A scene belongs to the evaluation split when it contains any held-out pair of
attribute values (a shape in a colour it is never trained in, a pattern on a
background, a pose under a light). Each value on its own is seen in training;
only these combinations are new, so evaluation measures composition, not
recall.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from .scene import ATTRIBUTES, Scene

# About a fifth of all combinations (measured in the tests): enough new ones to evaluate on, few enough
# that training still sees every value in most contexts.
HELD_OUT_PAIRS = (
    ("shape", "colour", {("ball", "green"), ("box", "pink"), ("cone", "purple"), ("star", "orange")}),
    ("pattern", "background", {("stripes", "grass")}),
    ("position", "direction", {("left", "right")}),
)
TRAIN, EVAL = "train", "eval"


def split_of(scene: Scene) -> str:
    """``eval`` for a scene with any held-out pair, else ``train``."""
    for first, second, pairs in HELD_OUT_PAIRS:
        if (getattr(scene, first), getattr(scene, second)) in pairs:
            return EVAL
    return TRAIN


def random_scene(rng: np.random.Generator, split: Optional[str] = None, **fixed) -> Scene:
    """A scene with uniform attributes (``fixed`` ones as given) in ``split`` (None: either)."""
    for _ in range(10_000):
        attributes = {name: fixed.get(name, values[int(rng.integers(len(values)))]) for name, values in ATTRIBUTES.items()}
        scene = Scene(**attributes, seed=int(rng.integers(2**31)))
        if split is None or split_of(scene) == split:
            return scene
    raise ValueError(f"no {split} scene has the attributes {fixed}")


def scenes(seed: int, count: int, split: Optional[str] = None) -> Iterator[Scene]:
    """``count`` scenes drawn from ``seed`` (the same scenes for the same seed, on every machine)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield random_scene(rng, split)
