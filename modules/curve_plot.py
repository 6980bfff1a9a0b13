"""Line plots of training curves with PIL only (ComfyUI does not ship matplotlib).

Used for the loss-curve IMAGE of Learn Concept and the PNG next to training
checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

Colour = Tuple[int, int, int]
LIGHT = (170, 190, 230)
DARK = (20, 60, 160)


@dataclass
class Panel:
    label: str
    xs: Sequence[float]
    series: Sequence[Sequence[float]]
    colours: Sequence[Colour]


def ema(values: Sequence[float], decay: float = 0.9) -> List[float]:
    smoothed, running = [], None
    for v in values:
        running = v if running is None else decay * running + (1 - decay) * v
        smoothed.append(running)
    return smoothed


def render_panels(panels: Sequence[Panel], title: str, width: int = 900, panel_height: int = 310):
    """A PIL RGB image with one framed panel per entry, stacked vertically."""
    from PIL import Image, ImageDraw, ImageFont

    height = 50 + len(panels) * (panel_height + 50)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((12, 8), title, fill="black", font=font)
    for index, panel in enumerate(panels):
        top = 50 + index * (panel_height + 50)
        _draw_panel(draw, font, (80, top, width - 20, top + panel_height), panel)
    draw.text((width // 2 - 20, height - 20), "step", fill="black", font=font)
    return image


def _draw_panel(draw, font, box, panel: Panel) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left, top - 18), panel.label, fill="black", font=font)
    xs = list(panel.xs)
    values = [v for s in panel.series for v in s if math.isfinite(v)]
    if not xs or not values:
        draw.text((left + 10, top + 10), "no data yet", fill="gray", font=font)
        return
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(values), max(values)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1.0), y_hi + 0.5 * (abs(y_hi) or 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for i in range(5):  # grid and tick labels
        y = y_lo + (y_hi - y_lo) * i / 4
        _, py = to_px(x_lo, y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((6, py - 7), f"{y:.3g}", fill="black", font=font)
        x = x_lo + (x_hi - x_lo) * i / 4
        px, _ = to_px(x, y_lo)
        draw.text((px - 10, bottom + 4), f"{x:.0f}", fill="black", font=font)
    for series, colour in zip(panel.series, panel.colours):
        points = [to_px(x, y) for x, y in zip(xs, series) if math.isfinite(y)]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=1 if colour == LIGHT else 2)


def loss_panel(steps: Sequence[float], losses: Sequence[float]) -> Panel:
    return Panel("loss per step (light) and smoothed (EMA 0.9, dark)", steps, [losses, ema(losses)], [LIGHT, DARK])
