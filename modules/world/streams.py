"""The world's random streams, numbered in one place: each kind of draw (the VAE's scenes, CLIP's, FLUX.1's scenes
and captions, the adapter's pairs, the table's cases) comes from its own stream, so that one never shifts another.

A stream is ``numpy.random.default_rng([*keys, number])``: the numbers are part of every trained model and test set
of the world (changing one changes what the shipped files were trained or measured on), so they never change.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    VAE_SCENES = 1  # modules/world/vae.py: the VAE's training scenes
    CLIP = 2  # modules/world/clip.py: CLIP's training scenes and their captions
    FLUX_SCENES = 3  # modules/world/transformer.py: FLUX.1's training scenes
    FLUX_CAPTIONS = 4  # modules/world/transformer.py: a new caption each time a scene comes back
    PAIRS = 5  # modules/world/pairs.py: the adapter's training pairs
    TABLE_CASES = 6  # modules/world/table.py: the table's test cases


def world_rng(stream: Stream, *keys: int) -> np.random.Generator:
    """The generator of ``stream`` for ``keys`` (a seed, then indices)."""
    return np.random.default_rng([*keys, int(stream)])
