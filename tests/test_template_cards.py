"""The template browser's cards of the FLUX.1 templates (tests/template_cards.py): the graph's idea and what it
needs, never an image passed off as FLUX.1 output (nothing here can run FLUX.1).

`MOD_ADAPTER_WRITE_THUMBNAILS=1 python -m pytest -q tests/test_template_cards.py` rewrites the four cards in
workflows/; the plain run checks they are there, JPEG, large enough, and up to date with their workflows.
"""

from __future__ import annotations

import os

import pytest

import template_cards
from test_workflows import WORKFLOW_FILES, WORKFLOWS_DIR, concept_words, load_workflow

WRITE = bool(os.environ.get("MOD_ADAPTER_WRITE_THUMBNAILS"))
REGENERATE = "MOD_ADAPTER_WRITE_THUMBNAILS=1 python -m pytest -q tests/test_template_cards.py"


def test_every_flux_template_has_a_card_and_every_other_template_is_a_toy_world_one():
    names = {p.name for p in WORKFLOW_FILES}
    assert set(template_cards.FLUX_TEMPLATES) <= names
    assert all(n.startswith("Toy world - ") for n in names - set(template_cards.FLUX_TEMPLATES)), names


@pytest.mark.parametrize("name", sorted(template_cards.FLUX_TEMPLATES))
def test_the_card_is_a_jpeg_up_to_date_with_its_workflow(name, tmp_path):
    from PIL import Image

    card = WORKFLOWS_DIR / name.replace(".json", ".jpg")
    if WRITE:
        template_cards.write_card(name, card)
    with Image.open(card) as image:
        assert image.format == "JPEG" and image.width >= 320 and image.height >= 160
        size, comment = image.size, image.info.get("comment", b"").decode(errors="replace")
    assert comment == template_cards.card_comment(name), \
        f"{card.name} no longer shows what {name} has (its words, images or needs changed): {REGENERATE}"
    regenerated = tmp_path / card.name
    template_cards.write_card(name, regenerated)
    with Image.open(regenerated) as image:
        assert image.format == "JPEG" and image.size == size


@pytest.mark.parametrize("name", sorted(template_cards.FLUX_TEMPLATES))
def test_the_card_shows_the_workflows_words_and_only_the_packs_example_images(name):
    workflow = load_workflow(WORKFLOWS_DIR / name)
    content = template_cards.card_content(name)
    assert sorted(word for word, _, _ in content["inputs"]) == sorted(concept_words(workflow))
    for word, path, kind in content["inputs"]:
        assert path is None or path.parent == template_cards.EXAMPLE_INPUTS, (word, path)  # never a rendered output
        assert (kind == "file") == ("ModAdapterLoadConcept" in {n["type"] for n in workflow["nodes"]})


@pytest.mark.parametrize("name", sorted(template_cards.FLUX_TEMPLATES))
def test_the_cards_needs_match_the_graphs_loaders(name):
    workflow = load_workflow(WORKFLOWS_DIR / name)
    types = {n["type"] for n in workflow["nodes"]}
    needs = " ".join(text for text, _ in template_cards.card_content(name)["needs"])
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader"} <= types
    assert "FLUX.1 dev" in needs and "CLIP-L + T5" in needs and ", ae" in needs
    has_adapter = "ModAdapterLoader" in types
    assert ("Mod-Adapter" in needs and "none" in needs and "Learn Concept" in needs) == has_adapter, needs
    assert ("CLIP vision" in needs) == ("CLIPVisionLoader" in types), needs
    if has_adapter:  # the Notes say so too
        notes = " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote"))
        assert "none has been published yet" in notes
    if "ModAdapterLearnConcept" in types:
        assert "No adapter" in needs and " min on a 24 GB GPU" in needs  # docs/learn_concept.md's estimate
