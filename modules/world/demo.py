"""``mod-adapter demo``: the shipped world and adapter compose shipped concept images into a few prompts.

Each row of the grid: the concept images with their words, the prompt alone
(the concept words with Δ = 0), and the prompt with the adapter's concepts,
for the same seed. Everything is rendered and generated here on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..token_modulation import TokenConcept
from .scene import Scene, render

# The shipped concept images, named by what they show; the cone (a pose on the left under light from the right) and
# the cup (stripes on grass) are held-out combinations, the others are fresh renders. The adapter carries every kind
# (docs/results.md), so the rows compose objects, surfaces, poses, lighting and backgrounds, up to four at once.
CONCEPT_IMAGES = {
    "green checked ring": Scene("ring", "green", "checks", "centre", "small", "top", "cool", "sky"),
    "blue dotted box": Scene("box", "blue", "dots", "centre", "small", "bottom", "warm", "sky"),
    "yellow checked cone": Scene("cone", "yellow", "checks", "left", "large", "right", "warm", "brick"),
    "orange striped cup": Scene("cup", "orange", "stripes", "centre", "large", "top", "warm", "grass"),
    "large, on the right": Scene("cup", "white", "plain", "right", "large", "left", "warm", "sand"),
    "small, on the left": Scene("ring", "pink", "plain", "left", "small", "top", "cool", "brick"),
    "cool light from the left": Scene("star", "red", "plain", "centre", "small", "left", "cool", "sand"),
    "a brick background": Scene("ball", "green", "stripes", "right", "small", "bottom", "warm", "brick"),
}


@dataclass(frozen=True)
class DemoRow:
    prompt: str
    concepts: Tuple[Tuple[str, str], ...]  # (word, concept image name)
    seed: int


# The seeds are fixed in row order, not chosen for the outcome.
DEMO_ROWS = (
    DemoRow("a ring in a pose, large on the right under cool light from the left on a brick background",
            (("ring", "green checked ring"),), 3),
    DemoRow("a ball with a surface in a pose, large on the right under cool light from the top on a brick background",
            (("surface", "blue dotted box"),), 4),
    DemoRow("a cone in a pose under a lighting on a sky background",
            (("cone", "yellow checked cone"), ("pose", "large, on the right"), ("lighting", "cool light from the left")),
            5),
    DemoRow("a cup in a pose under warm light from the top on a background",
            (("cup", "orange striped cup"), ("pose", "small, on the left"), ("background", "a brick background")), 6),
    DemoRow("a box in a pose under a lighting on a background",
            (("box", "blue dotted box"), ("pose", "large, on the right"), ("lighting", "cool light from the left"),
             ("background", "a brick background")), 7),
)


def label_image(image: np.ndarray, text: str, width: int) -> np.ndarray:
    """``image`` (H, W, 3) uint8 above a white strip with ``text`` wrapped to ``width`` pixels."""
    from PIL import Image, ImageDraw

    font_width = 6  # PIL's default bitmap font
    per_line = max(8, width // font_width)
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    strip = Image.new("RGB", (width, 12 * len(lines) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, text_line in enumerate(lines):
        draw.text((2, 2 + 12 * i), text_line, fill="black")
    return np.concatenate([image, np.asarray(strip)], axis=0)


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in 0..1 -> (H, W, 3) uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def labelled_row(cells: Sequence[np.ndarray], text: str) -> np.ndarray:
    """Cells side by side (padded to one height, 6 px apart) above ``text``."""
    height = max(cell.shape[0] for cell in cells)
    padded = [np.concatenate([cell, np.full((height - cell.shape[0], cell.shape[1], 3), 255, np.uint8)])
              for cell in cells]
    body = np.concatenate([x for cell in padded for x in (cell, np.full((height, 6, 3), 255, np.uint8))], axis=1)
    return label_image(body, text, body.shape[1])


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows one above the other (padded to one width, 10 px apart)."""
    width = max(row.shape[1] for row in rows)
    padded = [np.concatenate([row, np.full((row.shape[0], width - row.shape[1], 3), 255, np.uint8)], axis=1)
              for row in rows]
    return np.concatenate([x for row in padded for x in (row, np.full((10, width, 3), 255, np.uint8))])


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


@torch.no_grad()
def demo_grid(models, predictor, rows: Sequence[DemoRow] = DEMO_ROWS, *, steps: int = 20, cfg: float = 4.0,
              scale: int = 2, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The labelled grid (H, W, 3) uint8: per row, concept images | prompt only | with concepts."""
    from .sampling import generate

    prompts = [row.prompt for row in rows]
    seeds = [row.seed for row in rows]
    concepts: List[List[TokenConcept]] = []
    for row in rows:
        concepts.append([TokenConcept(predictor.delta(CONCEPT_IMAGES[name], word),
                                      models.positions(row.prompt, word), 1.0, name=word)
                         for word, name in row.concepts])
    plain = generate(models.pipe, prompts, seeds, steps=steps, cfg=cfg,
                     progress=(lambda i: progress(1)) if progress else None)
    composed = generate(models.pipe, prompts, seeds, steps=steps, cfg=cfg, concepts=concepts,
                        progress=(lambda i: progress(1)) if progress else None)
    tile = 64 * scale
    max_concepts = max(len(row.concepts) for row in rows)
    lines = []
    for index, row in enumerate(rows):
        cells = [label_image(upscale(render(CONCEPT_IMAGES[name]), scale), f'"{word}": {name}', tile)
                 for word, name in row.concepts]
        cells += [np.full_like(cells[0], 255)] * (max_concepts - len(row.concepts))
        cells.append(label_image(upscale(image_to_uint8(plain[index]), scale), "prompt only", tile))
        cells.append(label_image(upscale(image_to_uint8(composed[index]), scale), "with the concepts", tile))
        lines.append(labelled_row(cells, row.prompt))
    return stack_rows(lines)
