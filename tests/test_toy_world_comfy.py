"""The shipped toy world inside ComfyUI: the loader node builds ComfyUI's own MODEL/CLIP/VAE/CLIP_VISION, and
the ComfyUI path and the diffusers path give the same image for the same seed and prompt, with and without a
concept's modulation."""

import os

import pytest
import torch

PROMPT = "a ball whose surface is blue dots in a pose, small on the left under warm light from the left on a brick background"


@pytest.fixture(scope="module")
def world(comfyui):
    from mod_adapter.modules.world.paths import WORLD_FOLDER
    from mod_adapter.nodes.toy_world import load_toy_world

    model, clip, vae, clip_vision = load_toy_world(WORLD_FOLDER)
    return dict(folder=WORLD_FOLDER, model=model, clip=clip, vae=vae, clip_vision=clip_vision)


def encode(clip, text):
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return [[cond, out]]


def comfy_image(world, model, prompt, seed, steps=5, cfg=4.0):
    """What KSampler (euler, simple) and VAEDecode give on a 64×64 EmptySD3LatentImage."""
    import comfy.sample

    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", encode(world["clip"], prompt),
                                  encode(world["clip"], ""), latent, denoise=1.0, seed=seed, disable_pbar=True)
    return world["vae"].decode(samples)


def diffusers_pipeline(world):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(os.path.join(world["folder"], "flux"), torch_dtype=torch.float32,
                                        local_files_only=True)


def diffusers_image(pipe, prompt, seed, steps=5, cfg=4.0):
    out = pipe(prompt=prompt, negative_prompt="", true_cfg_scale=cfg, height=64, width=64, num_inference_steps=steps,
               max_sequence_length=48, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return out.permute(0, 2, 3, 1)


def test_the_loader_gives_comfyuis_own_models(world):
    import comfy.clip_vision
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd

    assert isinstance(world["model"], comfy.model_patcher.ModelPatcher)
    assert isinstance(world["model"].model, comfy.model_base.Flux)
    assert isinstance(world["clip"], comfy.sd.CLIP) and isinstance(world["vae"], comfy.sd.VAE)
    assert isinstance(world["clip_vision"], comfy.clip_vision.ClipVisionModel)
    tokens = encode(world["clip"], PROMPT)
    assert tokens[0][0].shape == (1, 48, 64) and tokens[0][1]["pooled_output"].shape == (1, 64)
    image = torch.rand(1, 64, 64, 3)
    assert world["vae"].encode(image).shape == (1, 16, 8, 8)
    assert world["clip_vision"].encode_image(image)["penultimate_hidden_states"].shape == (1, 65, 128)


def test_the_text_encoders_give_the_same_embeddings_in_both_hosts(world):
    pipe = diffusers_pipeline(world)
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=PROMPT, max_sequence_length=48)
    cond = encode(world["clip"], PROMPT)
    torch.testing.assert_close(cond[0][0], prompt_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond[0][1]["pooled_output"], pooled, atol=1e-5, rtol=1e-5)


def test_comfyui_and_diffusers_give_the_same_image(world):
    pipe = diffusers_pipeline(world)
    comfy_out = comfy_image(world, world["model"], PROMPT, seed=7)
    diffusers_out = diffusers_image(pipe, PROMPT, seed=7)
    torch.testing.assert_close(comfy_out, diffusers_out, atol=1e-4, rtol=0)
    other = comfy_image(world, world["model"], PROMPT, seed=8)
    assert (other - comfy_out).abs().max() > 1e-2  # the comparison can fail: another seed is another image


def test_the_packs_world_sampler_equals_flux_pipeline_without_concepts(world):
    from mod_adapter.modules.world.sampling import generate

    pipe = diffusers_pipeline(world)
    ours = generate(pipe, [PROMPT, "a cone"], [7, 3], steps=5, cfg=4.0).permute(0, 2, 3, 1)
    # a batch of two against two single runs: float32 sums in another order, far below a pixel step (1/255)
    torch.testing.assert_close(ours[:1], diffusers_image(pipe, PROMPT, seed=7), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1:], diffusers_image(pipe, "a cone", seed=3), atol=1e-4, rtol=0)
    assert (ours[:1] - ours[1:]).abs().max() > 1e-2


def test_a_concept_modulates_both_hosts_alike(world):
    """The same Δ on the word "surface": the pack's ComfyUI patch under KSampler, and its diffusers host in the
    world sampler; in both, the empty prompt of classifier-free guidance is not modulated."""
    from mod_adapter.modules.comfy_flux_host import ComfyConcept, apply_concepts
    from mod_adapter.modules.token_modulation import TokenConcept
    from mod_adapter.modules.world.sampling import generate

    pipe = diffusers_pipeline(world)
    delta = torch.randn(9, 128, generator=torch.Generator().manual_seed(0)) * 2.0
    positions = [8]  # "surface" in the T5 tokens of PROMPT
    patched = apply_concepts(world["model"], [ComfyConcept(delta, positions, strength=1.0, name="surface")])
    comfy_out = comfy_image(world, patched, PROMPT, seed=7)
    ours = generate(pipe, [PROMPT], [7], steps=5, cfg=4.0,
                    concepts=[[TokenConcept(delta, positions, 1.0, name="surface")]]).permute(0, 2, 3, 1)
    torch.testing.assert_close(comfy_out, ours, atol=1e-4, rtol=0)
    plain = comfy_image(world, world["model"], PROMPT, seed=7)
    assert (comfy_out - plain).abs().max() > 1e-3  # the concept acts


def test_the_scene_node_shows_its_rendered_scene_on_the_node(world, tmp_path, monkeypatch):
    """As Load Image shows its picture: the node's UI output is the scene, drawn 4× larger pixel for pixel."""
    import folder_paths
    import numpy as np
    from PIL import Image

    import mod_adapter.nodes as pack_nodes

    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path))
    output = pack_nodes.ModAdapterToyWorldScene.execute(0, shape="cone", colour="yellow", pattern="checks",
                                                        position="left", size="large", direction="right",
                                                        tint="warm", background="brick")
    image, caption = output.result
    assert image.shape == (1, 64, 64, 3) and "cone" in caption
    (shown,) = output.ui.as_dict()["images"]
    assert shown["type"] == "temp"
    with Image.open(tmp_path / shown.get("subfolder", "") / shown["filename"]) as preview:
        assert preview.size == (256, 256)
        pixels = torch.from_numpy(np.asarray(preview.convert("RGB"))).float() / 255.0
    torch.testing.assert_close(pixels[::4, ::4], image[0], atol=1 / 255, rtol=0)
