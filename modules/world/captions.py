"""Captions of world scenes, and the exact descriptions p+ of their attributes.

A caption always names the object (its shape word) and states any subset of
the other attribute groups. The words "surface", "pose", "lighting" and
"background" appear both with their values ("whose surface is blue dots")
and without them ("with a surface"), so the base model learns them as words,
as FLUX.1 knows "surface" (docs/results.md, "The world").
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .scene import Scene

GROUPS = ("surface", "pose", "lighting", "background")
POSITION_PHRASES = {"left": "on the left", "centre": "in the centre", "right": "on the right"}
STATED, WORD_ONLY, ABSENT = "stated", "word", "absent"


def describe(scene: Scene, concept: str) -> str:
    """The exact description p+ of one concept of the scene (what a VLM caption would say of it)."""
    if concept == "object":
        return f"{scene.colour} {scene.pattern} {scene.shape}"
    if concept == "surface":
        return f"{scene.colour} {scene.pattern}"
    if concept == "pose":
        return f"{scene.size} {POSITION_PHRASES[scene.position]}"
    if concept == "lighting":
        return f"{scene.tint} light from the {scene.direction}"
    if concept == "background":
        return scene.background
    raise ValueError(f"unknown concept kind {concept!r}; the world has object, {', '.join(GROUPS)}")


_CLAUSES = {  # group -> (stated templates, word-only templates)
    "surface": (["whose surface is {surface}", "with a {surface} surface"], ["with a surface", "with its surface"]),
    "pose": (["in a pose, {pose}", "posed {pose}"], ["in a pose", "in its pose"]),
    "lighting": (["under {lighting}", "in a lighting of {lighting}"], ["under a lighting", "in its lighting"]),
    "background": (["on a {background} background", "in front of a {background} background"],
                   ["on a background", "in front of its background"]),
}


def caption(scene: Scene, modes: Dict[str, str], rng: Optional[np.random.Generator] = None) -> str:
    """A caption naming the object and, per group, stating it (``stated``), naming only the group's word
    (``word``) or leaving it out (``absent``). ``rng`` picks among equivalent phrasings (None: the first)."""
    values = {group: describe(scene, group) for group in GROUPS}
    parts = [f"a {scene.shape}"]
    for group in GROUPS:
        mode = modes.get(group, ABSENT)
        if mode == ABSENT:
            continue
        if mode not in (STATED, WORD_ONLY):
            raise ValueError(f"caption mode for {group} must be stated, word or absent, got {mode!r}")
        templates = _CLAUSES[group][0 if mode == STATED else 1]
        template = templates[int(rng.integers(len(templates)))] if rng is not None else templates[0]
        parts.append(template.format(**values))
    return " ".join(parts)


def full_caption(scene: Scene) -> str:
    """Every attribute stated: the text oracle's prompt."""
    return caption(scene, {group: STATED for group in GROUPS})


def random_modes(rng: np.random.Generator) -> Dict[str, str]:
    """A training caption's choice per group: stated (1/2), named by its word only (1/4) or left out (1/4)."""
    return {group: (STATED, STATED, WORD_ONLY, ABSENT)[int(rng.integers(4))] for group in GROUPS}


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption (:func:`random_modes`, then a random phrasing of each clause)."""
    return caption(scene, random_modes(rng), rng)


def consistent(scene: Scene, modes: Dict[str, str], other: Scene) -> bool:
    """Whether the caption of ``scene`` with ``modes`` is also true of ``other`` (same object, same stated values)."""
    if other.shape != scene.shape:
        return False
    return all(describe(other, group) == describe(scene, group) for group in GROUPS if modes.get(group) == STATED)
