"""Concept regions: a concept's word attends to, and is attended by, only the image tokens inside its MASK.

The bias is checked against one built by hand, in pure torch and as FLUX.1's blocks receive it in a real ComfyUI;
then what it does to an image: a mask over everything changes nothing, and outside the region the image is the
bare-word image up to the leakage through the other text tokens, with that leakage measured.
"""

import pytest
import torch

from mod_adapter.modules.concept_regions import (
    RegionalTokens,
    check_region_mask,
    combine_attention_masks,
    region_attention_bias,
    region_tokens,
)
from mod_adapter.modules.errors import ModAdapterError


def left_half(height=64, width=64):
    mask = torch.zeros(height, width)
    mask[:, : width // 2] = 1.0
    return mask


def test_region_tokens_follow_flux_token_order_and_half_of_a_token_counts():
    inside = region_tokens(left_half(), 4, 4).reshape(4, 4)
    assert inside[:, :2].all() and not inside[:, 2:].any()
    mask = torch.zeros(8, 8)
    mask[:4, :3] = 1  # the token (0, 1) covers columns 2-3: half inside
    assert region_tokens(mask, 2, 4).reshape(2, 4).tolist() == [[True, True, False, False], [False] * 4]


def test_the_bias_masks_the_word_and_the_image_outside_both_ways_and_nothing_else():
    inside = torch.tensor([True, False, True, False])
    bias = region_attention_bias([RegionalTokens(positions=[1], batch_rows=[1], inside=inside)], batch=2,
                                 text_len=3, image_len=6)  # 4 generated image tokens + 2 Kontext references
    expected = torch.zeros(2, 9, 9)
    for image_token in (3 + 1, 3 + 3):
        expected[1, 1, image_token] = expected[1, image_token, 1] = float("-inf")
    for other_text in (0, 2):  # the other text tokens may not read the word; the word still reads them
        expected[1, other_text, 1] = float("-inf")
    torch.testing.assert_close(bias, expected)


def test_a_region_over_the_whole_image_or_without_rows_gives_no_bias():
    everywhere = RegionalTokens(positions=[0], batch_rows=[0], inside=torch.ones(4, dtype=torch.bool))
    no_rows = RegionalTokens(positions=[0], batch_rows=[], inside=torch.zeros(4, dtype=torch.bool))
    assert region_attention_bias([everywhere, no_rows], batch=1, text_len=2, image_len=4) is None


def test_the_bias_adds_to_a_mask_already_on_the_conditioning():
    bias = torch.zeros(1, 3, 3)
    bias[0, 0, 2] = float("-inf")
    existing = torch.ones(1, 3, 3, dtype=torch.bool)
    existing[0, 1, 2] = False
    combined = combine_attention_masks(existing, bias)
    assert torch.isinf(combined[0, 0, 2]) and torch.isinf(combined[0, 1, 2]) and combined[0, 2, 2] == 0
    with pytest.raises(ModAdapterError, match="cannot be combined"):
        combine_attention_masks(torch.zeros(1, 4, 4), bias)


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(8, 8), "is empty"),
    (torch.ones(2, 8, 8), "one MASK"),
    (torch.full((8, 8), float("nan")), "NaN"),
])
def test_bad_region_masks_are_refused_with_a_clear_error(mask, message):
    with pytest.raises(ModAdapterError, match=message):
        check_region_mask(mask, "dog")


# --- in ComfyUI ---------------------------------------------------------------------------------------------


@pytest.fixture
def flux(comfyui):
    from tiny_flux import tiny_comfy_flux

    return tiny_comfy_flux()


def dog(region=None, seed=21, positions=(2, 3)):
    from mod_adapter.modules.comfy_flux_host import ComfyConcept

    from test_comfy_host import random_delta

    return ComfyConcept(random_delta(seed, scale=1.5), positions=list(positions), name="dog", region=region)


@torch.no_grad()
def test_every_block_receives_the_bias_built_by_hand(flux):
    from mod_adapter.modules.comfy_flux_host import apply_concepts

    from tiny_flux import comfy_conditioning, comfy_sample

    patched = apply_concepts(flux, [dog(left_half())])
    seen = []

    def recording_block(kind):
        def block(args, extra):
            seen.append((kind, args.get("attn_mask")))
            return extra["original_block"](args)
        return block

    patched.set_model_patch_replace(recording_block("double"), "dit", "double_block", 1)
    patched.set_model_patch_replace(recording_block("single"), "dit", "single_block", 3)
    comfy_sample(patched, comfy_conditioning(1), comfy_conditioning(2), cfg=2.0, steps=1)
    # By hand: a 16×16 latent is 8×8 tokens after the 256 text tokens; the right half's columns are outside.
    outside = torch.tensor([256 + row * 8 + column for row in range(8) for column in range(4, 8)])
    assert {kind for kind, _ in seen} == {"double", "single"}
    for kind, attn_mask in seen:
        assert attn_mask is not None and attn_mask.shape[-2:] == (256 + 64, 256 + 64)
        rows_masked = [b for b in range(attn_mask.shape[0]) if torch.isinf(attn_mask[b]).any()]
        assert len(rows_masked) == 1, "only the positive prompt's row carries the region"
        expected = torch.zeros(256 + 64, 256 + 64)
        other_text = torch.tensor([t for t in range(256) if t not in (2, 3)])
        for word in (2, 3):
            expected[word, outside] = expected[outside, word] = expected[other_text, word] = float("-inf")
        torch.testing.assert_close(attn_mask[rows_masked[0]].float(), expected)


@torch.no_grad()
def test_a_mask_over_the_whole_image_changes_nothing(flux):
    from mod_adapter.modules.comfy_flux_host import apply_concepts

    from tiny_flux import comfy_conditioning, comfy_sample

    positive = comfy_conditioning(1)
    unrestricted = comfy_sample(apply_concepts(flux, [dog()]), positive)
    everywhere = comfy_sample(apply_concepts(flux, [dog(torch.ones(64, 64))]), positive)
    torch.testing.assert_close(everywhere, unrestricted, rtol=0, atol=0)


def first_block_image(model, positive):
    """The image tokens after the first double block, in the first step's positive forward."""
    from tiny_flux import comfy_sample

    seen = []

    def recording_block(args, extra):
        out = extra["original_block"](args)
        seen.append(out["img"].clone())
        return out

    model = model.clone()
    model.set_model_patch_replace(recording_block, "dit", "double_block", 0)
    comfy_sample(model, positive, steps=1)
    return seen[0]


@torch.no_grad()
def test_outside_its_region_the_image_is_the_bare_word_image_up_to_leakage(flux):
    """No attention path joins the word and the image outside the region: after the first block the tokens outside
    are exactly those of the same region with Δ = 0. Later blocks let them read the image inside, which the concept changed: that
    leakage is measured on the sampled image, as the concept's effect outside the region against its effect
    there without a region (on this tiny random model attention spreads evenly over the image, so the leakage
    is large; docs/results.md measures it on the toy world)."""
    from mod_adapter.modules.comfy_flux_host import apply_concepts

    from tiny_flux import comfy_conditioning, comfy_sample

    positive = comfy_conditioning(1)
    # The same region with Δ = 0: the word hidden from the image outside, no concept.
    hidden_word = dog(left_half())
    hidden_word.delta = torch.zeros_like(hidden_word.delta)
    tokens = {name: first_block_image(model, positive).reshape(1, 8, 8, -1) for name, model in
              (("hidden word", apply_concepts(flux, [hidden_word])),
               ("regional", apply_concepts(flux, [dog(left_half())])))}
    torch.testing.assert_close(tokens["regional"][:, :, 4:], tokens["hidden word"][:, :, 4:], rtol=0, atol=1e-6)
    assert (tokens["regional"][:, :, :4] - tokens["hidden word"][:, :, :4]).abs().max() > 1e-3  # it acts inside

    bare = comfy_sample(flux, positive, steps=4)
    regional = comfy_sample(apply_concepts(flux, [dog(left_half())]), positive, steps=4) - bare
    unrestricted = comfy_sample(apply_concepts(flux, [dog()]), positive, steps=4) - bare
    inside, outside = (..., slice(0, 8)), (..., slice(8, 16))  # the 16-wide latent's columns
    leakage = regional[outside].abs().mean() / unrestricted[outside].abs().mean()
    kept = regional[inside].abs().mean() / unrestricted[inside].abs().mean()
    print(f"tiny FLUX.1, 4 steps: the concept's effect outside the region {leakage:.2f}× its effect there "
          f"without a region; inside {kept:.2f}×")
    assert leakage < 0.9 and kept > 0.8


def test_the_concept_region_node_restricts_the_concepts_modulation_apply_gets(comfyui):
    import torch

    import mod_adapter.nodes as pack_nodes
    from mod_adapter.modules.concept import Concept
    from mod_adapter.modules.concept_set import ConceptList

    delta = torch.randn(4, 128) * 0.5
    concepts = ConceptList((Concept("dog", delta), Concept("beach", delta.flip(0))))
    (dog_only,) = pack_nodes.ModAdapterConceptRegion.execute(concepts, left_half()[None], "Dog").result
    assert dog_only.regions[0] is not None and dog_only.regions[1] is None
    (rest,) = pack_nodes.ModAdapterConceptRegion.execute(dog_only, torch.ones(1, 8, 8), "").result
    torch.testing.assert_close(rest.regions[0], left_half())  # the dog keeps its own region
    assert rest.regions[1].shape == (8, 8)
    chained = rest.plus(Concept("cat", delta))
    assert chained.regions[2] is None and chained.regions[0] is not None
    with pytest.raises(ModAdapterError, match="no concept with the word"):
        pack_nodes.ModAdapterConceptRegion.execute(concepts, left_half(), "cat")
    with pytest.raises(ModAdapterError, match="is empty"):
        pack_nodes.ModAdapterConceptRegion.execute(concepts, torch.zeros(8, 8), "")
