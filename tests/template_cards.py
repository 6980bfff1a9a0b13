"""Cards for the template browser of the FLUX.1 templates, which cannot run here (no FLUX.1 weights).

ComfyUI's template browser shows `workflows/<name>.jpg` beside each workflow.
The toy-world templates' cards are what they make (tests/test_toy_world_server.py);
a FLUX.1 template's card shows only the graph's idea, never an image passed off
as its output: its concept images (the pack's example images, example_inputs/)
with their words, an arrow to a box "your FLUX.1 image", and what it needs.

Everything is read from the workflow itself: the concept words and the image
each Load Image gives them, the saved concept files' words, the Learn Concept
resolution and weight dtype (for its estimated time, read from the table in
docs/learn_concept.md; no time is given when the table has no such row).

    write_card("One concept from one photo.json", path)

`MOD_ADAPTER_WRITE_THUMBNAILS=1 python -m pytest -q tests/test_template_cards.py`
rewrites the four cards; the plain run checks them. Each card carries, as its
JPEG comment, a fingerprint of what it shows (words, image bytes, text, layout),
so a card left stale by a changed workflow is found without comparing pixels
(fonts differ between machines). PIL only; DejaVu fonts where the system has
them, PIL's own font otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from test_workflows import CONCEPT_FILE, WORKFLOWS_DIR, input_source, load_workflow

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_INPUTS = REPO / "example_inputs"
LEARN_DOC = REPO / "docs" / "learn_concept.md"

CARD_LAYOUT = 1  # raise it when the drawing changes: every card's fingerprint then changes
SIZE = 512  # square: the template browser fits each card into a square (256 px in frontend 1.27)
MARGIN = 18
BACKGROUND, PANEL, TEXT, DIM = (30, 31, 36), (52, 54, 62), (236, 236, 240), (176, 178, 188)
ACCENT, WARN, GOOD = (122, 178, 255), (255, 196, 92), (140, 214, 150)

ADAPTER_NEEDS = [("Needs: FLUX.1 dev (fp8 ok), ae,", TEXT), ("CLIP-L + T5, CLIP vision ViT-L/14", TEXT),
                 ("and a FLUX.1 Mod-Adapter: none", WARN), ("is published yet. Use Learn Concept.", WARN)]
SAVED_NEEDS = [("Needs: FLUX.1 dev (fp8 ok), ae,", TEXT), ("CLIP-L + T5, and concept files", TEXT),
               ("in models/mod_concepts.", TEXT), ("No adapter, no photo.", GOOD)]

# workflow -> what its arrow says and what it needs (Learn Concept's needs are built from its graph)
FLUX_TEMPLATES = {
    "One concept from one photo.json": ("Mod-Adapter", ADAPTER_NEEDS),
    "Three concepts in one image - cat pose lighting.json": ("Mod-Adapter", ADAPTER_NEEDS),
    "Learn a concept from one photo - FLUX.1.json": ("Learn Concept", None),
    "Reuse saved concepts - no adapter needed.json": ("Load Concept", SAVED_NEEDS),
}


# --- what the workflow says ---------------------------------------------------------------------

def concept_inputs(workflow) -> list:
    """(word, image path or None, kind) per concept, top to bottom on the canvas.

    kind is "photo" (a Load Image gives it; the path is the pack's example image of that file name, else of that
    word, else None) or "file" (a saved concept file).
    """
    found = []
    for node in workflow["nodes"]:
        if node["type"] in ("ModAdapterConceptEncoder", "ModAdapterLearnConcept"):
            words = [node["widgets_values"][0]] if node["type"] == "ModAdapterConceptEncoder" else \
                [w.strip() for w in node["widgets_values"][1].split(",") if w.strip()]
            source = input_source(workflow, node, "image")
            filename = source[0]["widgets_values"][0] if source and source[0]["type"] == "LoadImage" else None
            for word in words:
                found.append((node["pos"][1], word, example_image(filename, word), "photo"))
        elif node["type"] == "ModAdapterLoadConcept":
            match = CONCEPT_FILE.match(node["widgets_values"][0])
            found.append((node["pos"][1], match["word"] if match else node["widgets_values"][0], None, "file"))
    return [item[1:] for item in sorted(found, key=lambda item: item[0])]


def example_image(filename, word):
    for name in (filename, f"mod_adapter_example_{word}.jpg"):
        if name and (EXAMPLE_INPUTS / name).is_file():
            return EXAMPLE_INPUTS / name
    return None


def learn_minutes(resolution: int, weight_dtype: str):
    """The estimated minutes of docs/learn_concept.md for a 24 GB GPU at this resolution and dtype, or None."""
    row = re.search(rf"^\| 24 GB \| {re.escape(weight_dtype)} \| {resolution}² \|.*\| (?P<gpu>[^|]*?) (?P<minutes>\d+) min \|$",
                    LEARN_DOC.read_text(encoding="utf-8"), re.M)
    return (int(row["minutes"]), row["gpu"].strip()) if row else None


def learn_needs(workflow) -> list:
    learn = next(n for n in workflow["nodes"] if n["type"] == "ModAdapterLearnConcept")
    unet = next(n for n in workflow["nodes"] if n["type"] == "UNETLoader")
    dtype = unet["widgets_values"][1]
    # the first widget value that is one of the node's resolutions (steps 1,400 and stage 1's 800 are not)
    resolution = next(v for v in learn["widgets_values"] if isinstance(v, int) and v in (512, 640, 768, 896, 1024))
    fp8 = " (fp8)" if dtype.startswith("fp8") else ""
    needs = [(f"Needs: FLUX.1 dev{fp8}, ae,", TEXT), ("CLIP-L + T5. No adapter.", TEXT)]
    estimate = learn_minutes(resolution, dtype)
    if estimate:
        minutes, gpu = estimate
        needs += [(f"About {minutes} min on a 24 GB GPU", DIM), (f"({gpu}, an estimate)", DIM)]
    return needs


# --- drawing ------------------------------------------------------------------------------------

def font(size: int, bold: bool = False):
    from PIL import ImageFont

    for name in (("DejaVuSans-Bold.ttf",) if bold else ("DejaVuSans.ttf",)):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)  # Pillow 10.1+
    except TypeError:
        return ImageFont.load_default()


def text_width(draw, text, text_font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=text_font)
    return right - left


def wrap(draw, text, text_font, width) -> list:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and text_width(draw, candidate, text_font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def centred_text(draw, centre_x, top, text, text_font, fill):
    draw.text((centre_x - text_width(draw, text, text_font) / 2, top), text, font=text_font, fill=fill)


def dashed_rectangle(draw, box, fill, dash=12, width=3):
    x0, y0, x1, y1 = box
    for x in range(x0, x1, 2 * dash):
        draw.line([(x, y0), (min(x + dash, x1), y0)], fill=fill, width=width)
        draw.line([(x, y1), (min(x + dash, x1), y1)], fill=fill, width=width)
    for y in range(y0, y1, 2 * dash):
        draw.line([(x0, y), (x0, min(y + dash, y1))], fill=fill, width=width)
        draw.line([(x1, y), (x1, min(y + dash, y1))], fill=fill, width=width)


def draw_tile(card, draw, x, y, side, word, image_path, kind):
    from PIL import Image, ImageOps

    if image_path is not None:
        with Image.open(image_path) as image:
            card.paste(ImageOps.fit(image.convert("RGB"), (side, side), Image.LANCZOS), (x, y))
    elif kind == "file":  # a saved concept file: a page with a folded corner
        fold = side // 4
        page = [(x + side // 8, y), (x + side - side // 8 - fold, y), (x + side - side // 8, y + fold),
                (x + side - side // 8, y + side), (x + side // 8, y + side)]
        draw.polygon(page, fill=PANEL, outline=DIM)
        draw.polygon([(x + side - side // 8 - fold, y), (x + side - side // 8 - fold, y + fold),
                      (x + side - side // 8, y + fold)], fill=DIM)
        centred_text(draw, x + side / 2, y + side * 0.55, ".safetensors", font(max(14, side // 9)), DIM)
    else:  # no shipped image: the artist's own photo
        draw.rectangle([x, y, x + side, y + side], fill=PANEL)
        dashed_rectangle(draw, (x, y, x + side, y + side), DIM)
        centred_text(draw, x + side / 2, y + side / 2 - 14, "your photo", font(max(16, side // 8)), DIM)
    centred_text(draw, x + side / 2, y + side + 6, word, font(30, bold=True), TEXT)


def draw_arrow_down(draw, centre_x, top, bottom, label):
    draw.line([(centre_x, top), (centre_x, bottom - 12)], fill=ACCENT, width=6)
    draw.polygon([(centre_x - 14, bottom - 16), (centre_x + 14, bottom - 16), (centre_x, bottom)], fill=ACCENT)
    label_font = font(24, bold=True)
    draw.text((centre_x + 22, (top + bottom) / 2 - 14), label, font=label_font, fill=ACCENT)


def card_content(workflow_name: str, workflow=None) -> dict:
    """What the card of a FLUX.1 template shows, read from the workflow (its file in workflows/, or `workflow`)."""
    arrow_label, needs = FLUX_TEMPLATES[workflow_name]
    workflow = workflow or load_workflow(WORKFLOWS_DIR / workflow_name)
    inputs = concept_inputs(workflow)
    assert 1 <= len(inputs) <= 3, f"{workflow_name}: {len(inputs)} concepts, the card has room for 1 to 3"
    return {"inputs": inputs, "arrow": arrow_label, "needs": needs or learn_needs(workflow)}


def fingerprint(content: dict) -> str:
    """Changes when what the card shows changes (a word, an image's bytes, a line of text, the layout)."""
    described = {"layout": CARD_LAYOUT, "arrow": content["arrow"], "needs": content["needs"],
                 "inputs": [(word, kind, path.name if path else None,
                             hashlib.sha256(path.read_bytes()).hexdigest() if path else None)
                            for word, path, kind in content["inputs"]]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def card_comment(workflow_name: str, workflow=None) -> str:
    """The JPEG comment a card carries, so that a stale card is found without comparing pixels (fonts differ)."""
    return f"Mod-Adapter template card {fingerprint(card_content(workflow_name, workflow))}"


def render_card(workflow_name: str, workflow=None):
    """The card of one FLUX.1 template, as a PIL image (SIZE × SIZE)."""
    from PIL import Image, ImageDraw

    content = card_content(workflow_name, workflow)
    inputs = content["inputs"]
    card = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(card)
    side = {1: 176, 2: 164, 3: 146}[len(inputs)]
    gap = min(48, (SIZE - 2 * MARGIN - len(inputs) * side) // max(len(inputs) - 1, 1))
    x = (SIZE - len(inputs) * side - (len(inputs) - 1) * gap) // 2
    for word, image_path, kind in inputs:
        draw_tile(card, draw, x, MARGIN, side, word, image_path, kind)
        x += side + gap
    y = MARGIN + side + 44
    draw_arrow_down(draw, SIZE // 2, y, y + 46, content["arrow"])
    y += 54
    box = (MARGIN + 40, y, SIZE - MARGIN - 40, y + 62)
    draw.rounded_rectangle(box, radius=10, fill=PANEL)
    dashed_rectangle(draw, box, ACCENT)
    centred_text(draw, SIZE / 2, y + 14, "your FLUX.1 image", font(30, bold=True), TEXT)
    y = box[3] + 14

    needs_font = font(25)
    line_height = 31
    for text, colour in content["needs"]:
        for line in wrap(draw, text, needs_font, SIZE - 2 * MARGIN):
            draw.text((MARGIN, y), line, font=needs_font, fill=colour)
            y += line_height
    assert y <= SIZE - 4, f"{workflow_name}: the card's text runs {y - SIZE} px past its bottom"
    return card


def write_card(workflow_name: str, path) -> None:
    """Writes the card of `workflow_name` (a file in workflows/) to `path` as JPEG, with its fingerprint."""
    render_card(workflow_name).save(path, "JPEG", quality=90, optimize=True, comment=card_comment(workflow_name))


if __name__ == "__main__":
    for name in FLUX_TEMPLATES:
        write_card(name, WORKFLOWS_DIR / name.replace(".json", ".jpg"))
        print("wrote", name.replace(".json", ".jpg"))
