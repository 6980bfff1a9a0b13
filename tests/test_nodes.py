"""The pack's nodes inside a real ComfyUI (COMFYUI_PATH), run in-process on tiny models.

Each node's `execute` is called as ComfyUI's executor calls it; sampling goes
through ComfyUI's own sampler.
"""

import os

import pytest
import torch

from mod_adapter.modules.concept_file import load_concept
from mod_adapter.modules.errors import CheckpointError, ConceptWordNotFoundError, ModAdapterError, ModelMismatchError

from comfy_low_vram import simulate_no_vram


@pytest.fixture(scope="module")
def comfy_env(comfyui, tmp_path_factory):
    import folder_paths

    import mod_adapter.nodes as pack_nodes
    import tiny_comfy

    models = tmp_path_factory.mktemp("models")
    for name in ("mod_adapter", "mod_concepts"):
        (models / name).mkdir()
        folder_paths.add_model_folder_path(name, str(models / name), is_default=True)
    tiny_comfy.tiny_adapter_checkpoint(str(models / "mod_adapter" / "tiny.safetensors"))
    env = dict(
        nodes=pack_nodes, models=models, flux=tiny_comfy.tiny_flux_model(), clip=tiny_comfy.tiny_flux_clip(),
        clip_vision=tiny_comfy.tiny_clip_vision(),
    )
    env["runner"] = pack_nodes.ModAdapterLoader.execute("tiny.safetensors").result[0]
    return env


def result(node_output):
    return node_output.result


def sample(model, positive, seed=0):
    import comfy.sample

    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, [], torch.zeros(1, 16, 16, 16),
                               seed=seed, disable_pbar=True)


def encode(env, word="dog", seed=0, references=1, mask=None, crop="center"):
    image = torch.rand(references, 80, 120, 3, generator=torch.Generator().manual_seed(seed))
    return result(env["nodes"].ModAdapterConceptEncoder.execute(image, word, env["clip_vision"], env["clip"],
                                                                 crop=crop, mask=mask))


def predict(env, embeds, concepts=None, strength=1.0):
    return result(env["nodes"].ModAdapterPredictor.execute(env["runner"], env["flux"], embeds, strength, concepts))[0]


def test_every_node_has_tooltips_and_ids_and_categories_of_the_pack(comfy_env):
    for node in comfy_env["nodes"].NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("ModAdapter") and schema.category.startswith("mod_adapter")
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.display_name} has no tooltip"


def test_learn_concept_keeps_its_seed_and_takes_small_learning_rates(comfy_env):
    schema = comfy_env["nodes"].ModAdapterLearnConcept.define_schema()
    inputs = {inp.id: inp for inp in schema.inputs}
    # The frontend adds "control after generate: randomize" to an INT named seed unless told otherwise.
    assert inputs["seed"].as_dict()["control_after_generate"] is False
    rate = inputs["learning_rate"].as_dict()
    assert rate["min"] <= 1e-6 and rate["step"] <= 1e-6 and rate["round"] <= 1e-6


def test_loader_lists_and_loads_adapters_and_refuses_other_files(comfy_env):
    import folder_paths

    assert "tiny.safetensors" in folder_paths.get_filename_list("mod_adapter")
    runner = comfy_env["runner"]
    assert runner.config.modulation_dim == 128 and runner.patcher.model.adapter is runner.adapter
    not_an_adapter = comfy_env["models"] / "mod_adapter" / "concept.safetensors"
    from mod_adapter.modules.concept import Concept
    from mod_adapter.modules.concept_file import save_concept

    save_concept(not_an_adapter, Concept("dog", torch.zeros(4, 128), num_double_blocks=2))
    with pytest.raises(CheckpointError, match="concept.safetensors"):
        comfy_env["nodes"].ModAdapterLoader.execute("concept.safetensors")
    os.remove(not_an_adapter)


def test_concept_encoder_outputs_embeddings_and_what_the_encoder_saw(comfy_env):
    embeds, preview = encode(comfy_env, references=2)
    assert embeds.image_tokens.shape == (2, 50, 32)
    assert embeds.word_pooled.shape == (1, 64) and embeds.token_mask is None
    assert preview.shape == (2, 224, 224, 3) and 0 <= preview.min() and preview.max() <= 1

    mask = torch.zeros(1, 80, 120)
    mask[:, :, :60] = 1  # the left half of a landscape image; the centre crop keeps its middle
    masked, masked_preview = encode(comfy_env, references=2, mask=mask)
    assert masked.token_mask.shape == (2, 50) and masked.token_mask[:, 0].all()
    grid = masked.token_mask[0, 1:].view(7, 7)
    assert grid[:, 0].all() and not grid[:, -1].any()  # left columns kept, right ones dropped
    assert masked_preview[0, 112, 200].max() < preview[0, 112, 200].max() or preview[0, 112, 200].max() == 0


@pytest.mark.parametrize("image, message", [
    (torch.zeros(0, 64, 64, 3), "empty"),
    (torch.full((1, 64, 64, 3), float("nan")), "NaN"),
])
def test_concept_encoder_refuses_bad_images(comfy_env, image, message):
    with pytest.raises(ModAdapterError, match=message):
        comfy_env["nodes"].ModAdapterConceptEncoder.execute(image, "dog", comfy_env["clip_vision"], comfy_env["clip"])
    with pytest.raises(ModAdapterError, match="concept word is empty"):
        comfy_env["nodes"].ModAdapterConceptEncoder.execute(torch.rand(1, 64, 64, 3), "  ", comfy_env["clip_vision"],
                                                            comfy_env["clip"])


def test_predictor_checks_the_model_and_the_image_encoder(comfy_env):
    embeds, _ = encode(comfy_env)
    from tiny_flux import tiny_comfy_flux  # width 256: not what the adapter was trained for

    with pytest.raises(ModelMismatchError, match="width 128, but this MODEL has 2\\+4 blocks of width 256"):
        result(comfy_env["nodes"].ModAdapterPredictor.execute(comfy_env["runner"], tiny_comfy_flux(), embeds, 1.0))
    wrong_width = type(embeds)(word="dog", image_tokens=torch.randn(1, 50, 48), word_pooled=embeds.word_pooled)
    with pytest.raises(ModelMismatchError, match="48-wide image tokens.*tiny-clip-vision"):
        predict(comfy_env, wrong_width)


def test_apply_patches_a_clone_and_only_the_concept_changes_the_image(comfy_env):
    nodes, flux, clip = comfy_env["nodes"], comfy_env["flux"], comfy_env["clip"]
    dog, _ = encode(comfy_env, "dog", seed=1)
    concepts = predict(comfy_env, dog)
    text = "a photo of a dog on the grass"
    patched, conditioning = result(nodes.ModAdapterModulationApply.execute(flux, clip, text, concepts))
    assert patched is not flux and not flux.object_patches
    plain_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    torch.testing.assert_close(conditioning[0][0], plain_conditioning[0][0])
    before = sample(flux, conditioning)
    with_concept = sample(patched, conditioning)
    assert (with_concept - before).abs().max() > 1e-3
    assert torch.equal(sample(flux, conditioning), before)  # the input MODEL is untouched


def test_apply_names_a_missing_word_and_shows_the_prompt_tokens(comfy_env):
    embeds, _ = encode(comfy_env, "giraffe")
    concepts = predict(comfy_env, embeds)
    with pytest.raises(ConceptWordNotFoundError, match="giraffe") as error:
        comfy_env["nodes"].ModAdapterModulationApply.execute(comfy_env["flux"], comfy_env["clip"],
                                                             "a photo of a dog", concepts)
    assert "dog" in str(error.value)  # the tokenized prompt is shown


def test_apply_passes_a_matching_conditioning_through_and_refuses_another(comfy_env):
    nodes, flux, clip = comfy_env["nodes"], comfy_env["flux"], comfy_env["clip"]
    concepts = predict(comfy_env, encode(comfy_env, "dog")[0])
    text = "a dog in the snow"
    given = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    _, passed = result(nodes.ModAdapterModulationApply.execute(flux, clip, text, concepts, conditioning=given))
    assert passed is given
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a dog on a beach at night"))
    with pytest.raises(ModAdapterError, match="not the encoding of its text"):
        nodes.ModAdapterModulationApply.execute(flux, clip, text, concepts, conditioning=other)
    with pytest.raises(ModAdapterError, match="start_percent"):
        nodes.ModAdapterModulationApplyAdvanced.execute(flux, clip, text, concepts, 0.8, 0.2, 0)


def test_advanced_apply_with_an_empty_schedule_is_the_plain_model(comfy_env):
    nodes, flux, clip = comfy_env["nodes"], comfy_env["flux"], comfy_env["clip"]
    concepts = predict(comfy_env, encode(comfy_env, "dog")[0])
    text = "a dog and another dog"
    never, conditioning = result(nodes.ModAdapterModulationApplyAdvanced.execute(flux, clip, text, concepts, 1.0, 1.0, 0))
    torch.testing.assert_close(sample(never, conditioning), sample(flux, conditioning))
    second_only, _ = result(nodes.ModAdapterModulationApplyAdvanced.execute(flux, clip, text, concepts, 0.0, 1.0, 2))
    every, _ = result(nodes.ModAdapterModulationApplyAdvanced.execute(flux, clip, text, concepts, 0.0, 1.0, 0))
    assert not torch.allclose(sample(second_only, conditioning), sample(every, conditioning))


def test_saved_concepts_reload_and_give_the_same_image(comfy_env):
    nodes, flux, clip = comfy_env["nodes"], comfy_env["flux"], comfy_env["clip"]
    chained = predict(comfy_env, encode(comfy_env, "lighting", seed=3)[0],
                      concepts=predict(comfy_env, encode(comfy_env, "dog", seed=2)[0]))
    output = nodes.ModAdapterSaveConcept.execute(chained, "test/pets")
    (saved,) = result(output)
    folder = comfy_env["models"] / "mod_concepts" / "test"
    files = sorted(os.listdir(folder))
    assert files == ["pets_dog_00001.safetensors", "pets_lighting_00001.safetensors"]
    assert output.ui == {"text": ["test/pets_dog_00001.safetensors", "test/pets_lighting_00001.safetensors"]}
    torch.testing.assert_close(load_concept(folder / files[0]).delta, saved.items[0].delta, rtol=1e-2, atol=1e-2)

    import folder_paths

    assert "test/pets_dog_00001.safetensors" in folder_paths.get_filename_list("mod_concepts")
    (loaded,) = result(nodes.ModAdapterLoadConcept.execute("test/pets_dog_00001.safetensors", 1.0, None))
    (loaded,) = result(nodes.ModAdapterLoadConcept.execute("test/pets_lighting_00001.safetensors", 0.5, loaded))
    assert [c.word for c in loaded.items] == ["dog", "lighting"] and loaded.items[1].strength == 0.5

    text = "a dog under soft lighting"
    from_files, conditioning = result(nodes.ModAdapterModulationApply.execute(flux, clip, text, loaded))
    full_strength, _ = result(nodes.ModAdapterModulationApply.execute(
        flux, clip, text, result(nodes.ModAdapterLoadConcept.execute("test/pets_lighting_00001.safetensors", 1.0,
                                                                     result(nodes.ModAdapterLoadConcept.execute(
                                                                         "test/pets_dog_00001.safetensors", 1.0,
                                                                         None))[0]))[0]))
    predicted, _ = result(nodes.ModAdapterModulationApply.execute(flux, clip, text, saved))
    # bf16 storage: the image from files matches the predicted one closely, not bit for bit.
    torch.testing.assert_close(sample(full_strength, conditioning), sample(predicted, conditioning),
                               rtol=1e-2, atol=1e-2)
    assert not torch.allclose(sample(from_files, conditioning), sample(full_strength, conditioning))


def test_the_adapter_loads_offloads_and_reloads_through_comfyui_model_management(comfy_env):
    """ComfyUI may unload any model between two runs (low VRAM, dynamic VRAM): the adapter comes back intact."""
    import comfy.model_management as mm

    runner = comfy_env["runner"]
    embeds = encode(comfy_env, seed=3)[0]

    def concept_delta():
        from mod_adapter.modules.concept_set import resolve_concepts

        return resolve_concepts(predict(comfy_env, embeds))[0].delta

    first = concept_delta()
    assert any(loaded.model is runner.patcher for loaded in mm.current_loaded_models)
    mm.unload_all_models()
    assert not any(loaded.model is runner.patcher for loaded in mm.current_loaded_models)
    assert all(p.device == runner.patcher.offload_device for p in runner.adapter.parameters())
    torch.testing.assert_close(concept_delta(), first, rtol=0, atol=0)


def test_a_partially_loaded_adapter_predicts_the_same_delta(comfy_env, monkeypatch):
    """ComfyUI's low-VRAM loading (a simulated --novram GPU): the adapter's comfy.ops layers cast their weights per
    call instead of holding them on the device, and the prediction does not change."""
    import comfy.model_management as mm

    from mod_adapter.modules.concept_set import resolve_concepts

    runner = comfy_env["runner"]
    embeds = encode(comfy_env, seed=4)[0]
    fully_loaded = resolve_concepts(predict(comfy_env, embeds))[0].delta
    assert not runner.patcher.model.model_lowvram
    mm.unload_all_models()
    simulate_no_vram(monkeypatch)
    try:
        partially_loaded = resolve_concepts(predict(comfy_env, embeds))[0].delta
        assert runner.patcher.model.model_lowvram
    finally:
        mm.unload_all_models()  # no low-VRAM adapter stays loaded for the next test
    torch.testing.assert_close(partially_loaded, fully_loaded, rtol=1e-5, atol=1e-6)


def test_save_concept_refuses_two_concepts_with_one_word_and_writes_nothing(comfy_env):
    nodes = comfy_env["nodes"]
    twice = predict(comfy_env, encode(comfy_env, "Dog", seed=5)[0], concepts=predict(comfy_env, encode(comfy_env, "dog")[0]))
    before = sorted(os.listdir(comfy_env["models"] / "mod_concepts"))
    with pytest.raises(ModAdapterError, match="Two concepts use the word 'Dog'"):
        nodes.ModAdapterSaveConcept.execute(twice, "twice")
    assert sorted(os.listdir(comfy_env["models"] / "mod_concepts")) == before


def test_missing_adapter_and_concept_files_fail_validation_before_anything_runs(comfy_env):
    nodes = comfy_env["nodes"]
    assert nodes.ModAdapterLoader.validate_inputs(adapter_name="tiny.safetensors") is True
    message = nodes.ModAdapterLoader.validate_inputs(adapter_name="gone.safetensors")
    assert isinstance(message, str) and "'gone.safetensors' is not in models/mod_adapter" in message
    assert "No public Mod-Adapter for FLUX.1 exists yet" in message and "Learn Concept" in message
    message = nodes.ModAdapterLoadConcept.validate_inputs(concept_name="gone_dog_00001.safetensors")
    assert isinstance(message, str) and "is not in models/mod_concepts" in message


def test_the_pack_creates_its_model_folders(comfyui, tmp_path, monkeypatch):
    import folder_paths

    from mod_adapter.nodes.model_folders import register_model_folders

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", dict(folder_paths.folder_names_and_paths))
    register_model_folders()
    assert (tmp_path / "models" / "mod_adapter").is_dir() and (tmp_path / "models" / "mod_concepts").is_dir()


def test_the_adapter_is_built_from_comfyui_operations_and_predicts_as_the_plain_one(comfy_env):
    """ComfyUI can only cast and partially load layers built from comfy.ops (as its own models are)."""
    from mod_adapter.modules.checkpoint import load_adapter_checkpoint

    runner = comfy_env["runner"]
    linears = [m for m in runner.adapter.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(hasattr(m, "comfy_cast_weights") for m in linears)
    plain = load_adapter_checkpoint(comfy_env["models"] / "mod_adapter" / "tiny.safetensors",
                                    dtype=next(runner.adapter.parameters()).dtype).adapter
    assert not any(hasattr(m, "comfy_cast_weights") for m in plain.modules())
    g = torch.Generator().manual_seed(0)
    neutral = torch.randn(2, runner.config.modulation_dim, generator=g)
    tokens = torch.randn(2, 5, runner.config.image_token_dim, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(runner.predict(neutral, tokens, mask), plain(neutral, tokens, mask).float())


def test_a_bf16_adapter_stays_bf16_and_computes_in_comfyuis_dtype(comfy_env):
    """Weights stay as saved (half the memory of float32 for the paper's 1.67B parameters); comfy.ops cast them."""
    import comfy.model_management as mm

    from mod_adapter.modules.checkpoint import load_adapter_checkpoint, save_adapter_checkpoint

    folder = comfy_env["models"] / "mod_adapter"
    plain = load_adapter_checkpoint(folder / "tiny.safetensors").adapter
    save_adapter_checkpoint(folder / "tiny_bf16.safetensors", plain.to(torch.bfloat16), base_model="tiny-flux-test",
                            image_encoder=comfy_env["runner"].metadata["image_encoder"])
    try:
        runner = comfy_env["nodes"].ModAdapterLoader.execute("tiny_bf16.safetensors").result[0]
        assert {p.dtype for p in runner.adapter.parameters()} == {torch.bfloat16}
        assert runner.compute_dtype == (torch.bfloat16 if mm.should_use_bf16(mm.get_torch_device()) else torch.float32)
        g = torch.Generator().manual_seed(1)
        neutral = torch.randn(2, runner.config.modulation_dim, generator=g)
        tokens = torch.randn(2, 5, runner.config.image_token_dim, generator=g)
        mask = torch.ones(2, 5, dtype=torch.bool)
        expected = plain.to(runner.compute_dtype)(neutral.to(runner.compute_dtype), tokens.to(runner.compute_dtype), mask)
        torch.testing.assert_close(runner.predict(neutral, tokens, mask), expected.float(), rtol=2e-2, atol=2e-2)
    finally:
        os.remove(folder / "tiny_bf16.safetensors")


def test_the_loader_also_lists_the_toy_worlds_adapter_folder(comfy_env):
    import folder_paths

    from mod_adapter.modules.world.paths import WORLD_ADAPTER_FOLDER

    paths = folder_paths.get_folder_paths("mod_adapter")
    assert WORLD_ADAPTER_FOLDER in paths and paths[0] != WORLD_ADAPTER_FOLDER  # new files go to the user's folder
