"""Training pairs for the Mod-Adapter from the world: a concept image, its word, and a target that shares only the
concept.

For a concept kind, the target scene keeps the concept image's values of the
kind's attributes (an object concept: shape and surface) and differs from it
in every other attribute, so that the only thing the two images share is the
concept. The target's caption contains the concept word and states every
other group; the concept's own values are not in it (an object concept: its
surface is left out; an abstract one: named by its word only), so the
adapter has to bring them. p+ (``attribute_caption``) is the generator's
exact description of the concept in the concept image. The records are the
pack's training manifest (``mod-adapter validate``, ``fit-router``,
``pretrain``, ``train`` read it unchanged).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from .captions import ABSENT, GROUPS, STATED, WORD_ONLY, caption, describe
from .scene import CONCEPT_ATTRIBUTES, Scene, render
from .split import TRAIN, random_scene
from .streams import Stream, world_rng

CONCEPT_KINDS = ("object", "surface", "pose", "lighting", "background")


def concept_word(kind: str, scene: Scene) -> str:
    """The word a concept is named by: the object's shape word, or the group's word."""
    return scene.shape if kind == "object" else kind


def concept_caption(scene: Scene, kind: str) -> str:
    """``scene``'s caption with the concept's own values left to the concept: the prompt of a target."""
    if kind == "object":
        return caption(scene, {group: (ABSENT if group == "surface" else STATED) for group in GROUPS})
    return caption(scene, {group: (WORD_ONLY if group == kind else STATED) for group in GROUPS})


def target_for(concept: Scene, kind: str, rng: np.random.Generator, split: Optional[str] = TRAIN) -> Scene:
    """A scene with ``concept``'s values of ``kind`` and a different value of every other attribute."""
    kept = CONCEPT_ATTRIBUTES[kind]
    fixed = {name: getattr(concept, name) for name in kept}
    for _ in range(10_000):
        target = random_scene(rng, split, **fixed)
        if all(getattr(target, name) != getattr(concept, name) for name in concept.attributes() if name not in kept):
            return target
    raise ValueError(f"no {split} scene shares only the {kind} of {concept}")


@dataclass(frozen=True)
class Pair:
    kind: str
    concept: Scene
    target: Scene

    @property
    def word(self) -> str:
        return concept_word(self.kind, self.concept)

    @property
    def caption(self) -> str:
        return concept_caption(self.target, self.kind)

    @property
    def attribute_caption(self) -> str:
        return describe(self.concept, self.kind)


def pairs(seed: int, count: int, split: Optional[str] = TRAIN,
          kinds: Tuple[str, ...] = CONCEPT_KINDS) -> Iterator[Pair]:
    """``count`` pairs, the kinds in turn, both scenes in ``split``; the same for the same seed."""
    for index in range(count):
        rng = world_rng(Stream.PAIRS, seed, index)
        kind = kinds[index % len(kinds)]
        concept = random_scene(rng, split)
        yield Pair(kind, concept, target_for(concept, kind, rng, split))


def write_pairs(out_dir: str, seed: int, count: int, split: Optional[str] = TRAIN, progress=None) -> Dict[str, int]:
    """Render ``count`` pairs into ``out_dir``/images and write ``out_dir``/manifest.jsonl (paths relative to it)."""
    from PIL import Image

    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    counts: Dict[str, int] = {}
    with open(os.path.join(out_dir, "manifest.jsonl"), "w") as manifest:
        for index, pair in enumerate(pairs(seed, count, split)):
            names = {}
            for role, scene in (("concept", pair.concept), ("target", pair.target)):
                names[role] = f"images/{index:07d}-{role}.png"
                Image.fromarray(render(scene)).save(os.path.join(out_dir, names[role]))
            manifest.write(json.dumps({"concept_image": names["concept"], "concept_word": pair.word,
                                       "caption": pair.caption, "target_image": names["target"],
                                       "attribute_caption": pair.attribute_caption}) + "\n")
            counts[pair.kind] = counts.get(pair.kind, 0) + 1
            if progress is not None:
                progress(1)
    return counts
