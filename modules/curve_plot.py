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


MARKER = (200, 80, 40)


@dataclass
class Panel:
    label: str
    xs: Sequence[float]
    series: Sequence[Sequence[float]]
    colours: Sequence[Colour]
    markers: Sequence[Tuple[float, str]] = ()  # (x, label): a vertical line, e.g. where stage 2 starts
    robust_range: bool = False  # y range from the 1st to the 99th percentile: a few spikes do not flatten the rest


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """The mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """About ``count`` round tick values (1, 2 or 5 × 10^k apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10)), key=lambda candidate: abs(math.log(candidate / raw)))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    while first + len(ticks) * step <= high + 1e-9 * step:
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


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
    y_lo, y_hi = (_percentile(values, 0.01), _percentile(values, 0.99)) if panel.robust_range else \
        (min(values), max(values))
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1.0), y_hi + 0.5 * (abs(y_hi) or 1.0)
    if x_hi == x_lo:
        x_hi = x_lo + 1

    def to_px(x, y):
        y = min(max(y, y_lo), y_hi)  # outside the robust range: drawn at the frame
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for y in nice_ticks(y_lo, y_hi):  # grid and round tick labels
        _, py = to_px(x_lo, y)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((6, py - 7), f"{y:g}", fill="black", font=font)
    for x in nice_ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        draw.text((px - 10, bottom + 4), f"{x:g}", fill="black", font=font)
    for x, label in panel.markers:
        if x_lo <= x <= x_hi:
            px, _ = to_px(x, y_lo)
            for y in range(int(top), int(bottom), 8):  # dashed
                draw.line([(px, y), (px, min(y + 4, bottom))], fill=MARKER, width=2)
            draw.text((px + 4, top + 4), label, fill=MARKER, font=font)
    for series, colour in zip(panel.series, panel.colours):
        points = [to_px(x, y) for x, y in zip(xs, series) if math.isfinite(y)]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=1 if colour == LIGHT else 2)


def loss_panel(steps: Sequence[float], losses: Sequence[float], markers: Sequence[Tuple[float, str]] = ()) -> Panel:
    """The raw loss per step (light) and its moving average over a 20th of the run (dark, at least 10 steps): a
    flow-matching loss depends on the σ each step draws, so only the average shows the trend."""
    window = max(10, len(losses) // 20)
    return Panel(f"loss per step (light) and its moving average over {window} steps (dark)", steps,
                 [losses, moving_average(list(losses), window)], [LIGHT, DARK], markers=markers, robust_range=True)
