"""Node logic that needs no ComfyUI: concept lists, batched resolution, image/mask checks, file naming."""

import os

import pytest
import torch

from mod_adapter.modules.adapter import ModAdapter
from mod_adapter.modules.concept import Concept
from mod_adapter.modules.concept_file import load_concept, new_concept_path, save_concept
from mod_adapter.modules.concept_images import check_image_batch, fit_mask_to_images, preview_with_mask, vit_grid_size
from mod_adapter.modules.concept_set import (
    ConceptEmbeds,
    ConceptList,
    PredictionRequest,
    chain,
    check_unique_words,
    resolve_concepts,
)
from mod_adapter.modules.config import ModAdapterConfig
from mod_adapter.modules.errors import ConceptFileError, ModAdapterError

CONFIG = ModAdapterConfig.preset("tiny")


class CountingRunner:
    """An AdapterRunner around a real tiny adapter that counts its calls."""

    name = "tiny.safetensors"
    num_double_blocks = CONFIG.num_double_blocks

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.adapter = ModAdapter(CONFIG).eval()
        with torch.no_grad():
            for p in self.adapter.parameters():
                if p.ndim > 1 and p.abs().sum() == 0:
                    p.normal_(0, 0.3)
        self.calls = []

    def predict(self, neutral, image_tokens, key_mask):
        self.calls.append(neutral.shape[0])
        return self.adapter(neutral, image_tokens, key_mask)


def embeds(word, references=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConceptEmbeds(word=word, image_tokens=torch.randn(references, 5, CONFIG.image_token_dim, generator=g),
                         word_pooled=torch.randn(1, 768, generator=g))


def request(runner, word, seed, strength=1.0, references=1):
    neutral = torch.randn(CONFIG.modulation_dim, generator=torch.Generator().manual_seed(100 + seed))
    return PredictionRequest(runner=runner, embeds=embeds(word, references, seed), neutral=neutral, strength=strength)


def test_chained_predictions_run_in_one_adapter_call_and_match_single_predictions():
    runner = CountingRunner()
    items = [request(runner, "dog", 1), request(runner, "pose", 2, strength=0.5, references=2),
             request(runner, "lighting", 3)]
    concepts = None
    for item in items:
        concepts = chain(concepts, item)
    resolved = resolve_concepts(concepts)
    assert runner.calls == [3]
    assert [c.word for c in resolved] == ["dog", "pose", "lighting"]
    assert [c.strength for c in resolved] == [1.0, 0.5, 1.0]
    assert resolved[1].source == {"kind": "predicted", "adapter": "tiny.safetensors", "references": 2}
    assert resolved[0].num_double_blocks == CONFIG.num_double_blocks
    for item, concept in zip(items, resolved):
        alone = resolve_concepts(ConceptList((item,)))[0]
        torch.testing.assert_close(concept.delta, alone.delta, rtol=1e-4, atol=1e-5)
    assert resolved[0].delta.abs().max() > 0


def test_loaded_concepts_pass_through_in_order_and_two_adapters_run_once_each():
    first, second = CountingRunner(0), CountingRunner(1)
    loaded = Concept("style", torch.ones(CONFIG.num_blocks, CONFIG.modulation_dim))
    concepts = chain(None, request(first, "dog", 1), loaded, request(second, "cat", 2), request(first, "hat", 3))
    resolved = resolve_concepts(concepts)
    assert [c.word for c in resolved] == ["dog", "style", "cat", "hat"]
    assert resolved[1] is loaded
    assert first.calls == [2] and second.calls == [1]
    assert len(concepts) == 4 and concepts.words == ["dog", "style", "cat", "hat"]


def test_chaining_never_changes_the_incoming_list():
    runner = CountingRunner()
    base = chain(None, request(runner, "dog", 1))
    longer = chain(base, request(runner, "cat", 2))
    assert len(base) == 1 and len(longer) == 2


def test_bad_embeds_and_duplicate_words_are_refused():
    with pytest.raises(ModAdapterError, match="concept word is empty"):
        ConceptEmbeds(word=" ", image_tokens=torch.zeros(1, 5, 4), word_pooled=torch.zeros(1, 768))
    with pytest.raises(ModAdapterError, match="NaN"):
        ConceptEmbeds(word="dog", image_tokens=torch.full((1, 5, 4), float("nan")), word_pooled=torch.zeros(1, 768))
    with pytest.raises(ModAdapterError, match="token mask"):
        ConceptEmbeds(word="dog", image_tokens=torch.zeros(1, 5, 4), word_pooled=torch.zeros(1, 768),
                      token_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ModAdapterError, match="Two concepts use the word 'Dog'"):
        check_unique_words(["dog", "cat", "Dog"])
    with pytest.raises(ModAdapterError, match="Expected CONCEPTS"):
        resolve_concepts([1, 2])


def test_image_checks_give_one_clear_error_each():
    with pytest.raises(ModAdapterError, match="empty"):
        check_image_batch(torch.zeros(0, 64, 64, 3))
    with pytest.raises(ModAdapterError, match="empty"):
        check_image_batch(torch.zeros(1, 0, 64, 3))
    with pytest.raises(ModAdapterError, match=r"\(batch, height, width, channels\)"):
        check_image_batch(torch.zeros(64, 64, 3))
    with pytest.raises(ModAdapterError, match="NaN"):
        check_image_batch(torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(ModAdapterError, match="2 channels"):
        check_image_batch(torch.zeros(1, 8, 8, 2))
    rgba = torch.rand(2, 9, 13, 4)  # odd sizes are fine, alpha is dropped
    assert check_image_batch(rgba).shape == (2, 9, 13, 3)
    assert check_image_batch(torch.rand(1, 8, 8, 1)).shape == (1, 8, 8, 3)


def test_masks_are_shared_resized_or_refused():
    images = torch.rand(3, 40, 60, 3)
    shared = fit_mask_to_images(torch.ones(1, 40, 60), images)
    assert shared.shape == (3, 40, 60)
    resized = fit_mask_to_images(torch.ones(3, 20, 30), images)
    assert resized.shape == (3, 40, 60) and torch.allclose(resized, torch.ones_like(resized))
    with pytest.raises(ModAdapterError, match="2 masks for 3 reference images"):
        fit_mask_to_images(torch.ones(2, 40, 60), images)
    with pytest.raises(ModAdapterError, match="NaN"):
        fit_mask_to_images(torch.full((1, 40, 60), float("nan")), images)
    assert vit_grid_size(257) == 16 and vit_grid_size(50) == 7
    with pytest.raises(ModAdapterError, match="square"):
        vit_grid_size(256)
    seen = torch.ones(1, 4, 4, 3)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    preview = preview_with_mask(seen, mask)
    assert preview[0, 0, 0, 0] == 1.0 and preview[0, 3, 0, 0] == pytest.approx(0.25)


def test_new_concept_paths_count_up_and_stay_inside_the_folder(tmp_path):
    first = new_concept_path(tmp_path, "pets/rex", "golden dog")
    assert first == os.path.join(tmp_path, "pets", "rex_golden_dog_00001.safetensors")
    save_concept(first, Concept("golden dog", torch.zeros(57, 3072)))
    assert new_concept_path(tmp_path, "pets/rex", "golden dog").endswith("rex_golden_dog_00002.safetensors")
    for bad in ("../escape", "/abs/path", "a/../../b"):
        with pytest.raises(ConceptFileError, match="must stay inside"):
            new_concept_path(tmp_path, bad, "dog")


def test_saved_concept_keeps_its_block_split(tmp_path):
    concept = Concept("dog", torch.randn(6, 64) * 0.1, num_double_blocks=2)
    path = tmp_path / "dog.safetensors"
    save_concept(path, concept)
    assert load_concept(path).num_double_blocks == 2
