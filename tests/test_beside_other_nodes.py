"""The engine beside what else an artist's FLUX.1 graph holds (issue #27), in a real ComfyUI, on a tiny FLUX.1.

Each test compares against a reference built without the pack (the independent NaiveReference of
test_comfy_host.py, or the same weights loaded the plain way) and checks that the concepts act, so that it
can fail: fp8 weights, ComfyUI's low-VRAM partial loading, a latent batch, two prompts combined with their
own concepts, Redux image tokens appended to the T5 context, and a prompt longer than 256 tokens.
"""

from types import SimpleNamespace

import pytest
import torch

from mod_adapter.modules.comfy_flux_host import ComfyConcept, PerTokenModulation, apply_concepts, prompt_fingerprint

from comfy_low_vram import simulate_no_vram
from test_comfy_host import NaiveReference, random_delta
from tiny_flux import COMFY_TINY_SIZES, comfy_conditioning, comfy_sample, tiny_comfy_flux


@pytest.fixture
def flux(comfyui):
    return tiny_comfy_flux()


def same_weights_stored_in(flux, weight_dtype, upcast: bool):
    """The tiny FLUX.1's weights rounded to ``weight_dtype``: stored in it and cast per layer (Load Diffusion
    Model's weight_dtype fp8_*), or with ``upcast`` stored in float32 (the reference)."""
    import comfy.model_patcher

    from mod_adapter.nodes.comfy_flux_config import flux_unet_config

    from tiny_comfy import flux_model_holding

    model = flux_model_holding(flux_unet_config(**COMFY_TINY_SIZES), flux.model.diffusion_model.state_dict(),
                               weight_dtype, upcast)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@torch.no_grad()
@pytest.mark.parametrize("weight_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_concepts_on_fp8_weights_equal_the_same_weights_upcast(flux, weight_dtype):
    dtype = getattr(torch, weight_dtype)
    fp8, upcast = (same_weights_stored_in(flux, dtype, upcast) for upcast in (False, True))
    assert {p.dtype for p in fp8.model.diffusion_model.parameters()} == {dtype}
    concepts = [ComfyConcept(random_delta(11), positions=[2, 3], name="dog")]
    positive = comfy_conditioning(1)
    result = comfy_sample(apply_concepts(fp8, concepts), positive)
    # The same float32 arithmetic on the same rounded values: equal up to summation order.
    torch.testing.assert_close(result, comfy_sample(apply_concepts(upcast, concepts), positive), rtol=1e-4, atol=1e-4)
    assert (result - comfy_sample(fp8, positive)).abs().max() > 1e-2  # the concept acts on the fp8 model


@torch.no_grad()
def test_concepts_on_a_partially_loaded_model_equal_the_fully_loaded_run(flux, monkeypatch):
    import comfy.model_management as mm

    concepts = [ComfyConcept(random_delta(12), positions=[4], name="dog")]
    positive = comfy_conditioning(1)
    patched = apply_concepts(flux, concepts)
    fully_loaded = comfy_sample(patched, positive)
    bare = comfy_sample(flux, positive)
    mm.unload_all_models()
    simulate_no_vram(monkeypatch)
    seen_lowvram = []
    result = comfy_sample(patched, positive,
                          callback=lambda *args: seen_lowvram.append(patched.model.model_lowvram))
    mm.unload_all_models()  # no low-VRAM model stays loaded for the next test
    assert seen_lowvram and all(seen_lowvram)  # sampled with weights cast per layer
    torch.testing.assert_close(result, fully_loaded, rtol=1e-5, atol=1e-5)
    assert (result - bare).abs().max() > 1e-2


@torch.no_grad()
def test_every_image_of_a_latent_batch_gets_the_concepts(flux):
    import comfy.sample

    concepts = [ComfyConcept(random_delta(13, scale=1.0), positions=[2], name="dog")]
    positive = comfy_conditioning(1)
    patched = apply_concepts(flux, concepts)
    reference_model = flux.clone()
    NaiveReference(concepts).install(reference_model, num_double=2)
    noise = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(3))

    def sample(model):
        return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, [], torch.zeros_like(noise),
                                   seed=0, disable_pbar=True)

    batch, expected, bare = sample(patched), sample(reference_model), sample(flux)
    torch.testing.assert_close(batch, expected, rtol=1e-4, atol=1e-4)
    for row in range(4):
        assert (batch[row] - bare[row]).abs().max() > 1e-2, f"image {row} of the batch did not get the concept"


@torch.no_grad()
def test_two_combined_prompts_each_get_only_their_own_concepts(flux):
    """ConditioningCombine of two prompts, each through its own Modulation Apply: a model row that computes one
    prompt gets that prompt's concept at its positions and never the other's."""
    first, second = comfy_conditioning(1), comfy_conditioning(2)
    dog = ComfyConcept(random_delta(14), positions=[2], name="dog")
    cat = ComfyConcept(random_delta(15), positions=[5], name="cat")
    patched = apply_concepts(apply_concepts(flux, [dog], prompt_fingerprint(first[0][0])),
                             [cat], prompt_fingerprint(second[0][0]))
    modulation = patched.object_patches["diffusion_model.double_blocks.0.txt_mod"]
    assert isinstance(modulation, PerTokenModulation)
    contexts, modulations = [], []

    def record_context(apply_model, args):
        contexts.append(args["c"]["c_crossattn"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(record_context)
    hook = modulation.register_forward_hook(lambda module, args, output: modulations.append((args[0], output)))
    try:
        comfy_sample(patched, first + second, steps=1)  # ConditioningCombine concatenates the two lists
    finally:
        hook.remove()
    assert len(contexts) == len(modulations) >= 1
    rows = {"first": 0, "second": 0}
    for context, (vec, (mod1, _)) in zip(contexts, modulations):
        base, _ = modulation.original(vec)
        for row in range(context.shape[0]):
            prompt = "first" if torch.equal(context[row], first[0][0][0]) else "second"
            assert prompt == "first" or torch.equal(context[row], second[0][0][0])
            rows[prompt] += 1
            own, other = (2, 5) if prompt == "first" else (5, 2)
            assert not torch.allclose(mod1.shift[row, own], base.shift[row, 0]), f"{prompt} prompt lost its concept"
            torch.testing.assert_close(mod1.shift[row, other], base.shift[row, 0])  # never the other prompt's
    assert rows["first"] and rows["second"]


def tiny_redux():
    """ComfyUI's own Redux image encoder (what StyleModelApply runs), small: SigLIP tokens of width 32."""
    import comfy.ldm.flux.redux
    import comfy.sd

    encoder = comfy.ldm.flux.redux.ReduxImageEncoder(redux_dim=32, txt_in_features=4096)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return comfy.sd.StyleModel(encoder)


@torch.no_grad()
def test_redux_image_tokens_appended_to_the_context_stay_unmodulated(flux):
    import nodes

    positive = comfy_conditioning(1)
    vision = SimpleNamespace(last_hidden_state=torch.randn(1, 81, 32, generator=torch.Generator().manual_seed(7)))
    (with_redux,) = nodes.StyleModelApply().apply_stylemodel(positive, tiny_redux(), vision, 1.0, "multiply")
    assert with_redux[0][0].shape[1] == 256 + 81  # the image tokens come after the prompt's 256
    concepts = [ComfyConcept(random_delta(16), positions=[3, 4], name="dog")]
    reference_model = flux.clone()
    NaiveReference(concepts).install(reference_model, num_double=2)  # modulates the listed positions only
    result = comfy_sample(apply_concepts(flux, concepts), with_redux)
    torch.testing.assert_close(result, comfy_sample(reference_model, with_redux), rtol=1e-4, atol=1e-4)
    assert (result - comfy_sample(flux, with_redux)).abs().max() > 1e-2
    assert (comfy_sample(flux, with_redux) - comfy_sample(flux, positive)).abs().max() > 1e-2  # Redux acts too


@torch.no_grad()
def test_a_prompt_longer_than_256_tokens_keeps_its_positions(flux):
    """FLUX.1 prompts pad to 256 T5 tokens; a longer one runs longer: a word past token 256 is still found."""
    positive = comfy_conditioning(1, text_len=320)
    concepts = [ComfyConcept(random_delta(17), positions=[3], name="dog"),
                ComfyConcept(random_delta(18), positions=[290, 291], name="lighting")]
    reference_model = flux.clone()
    NaiveReference(concepts).install(reference_model, num_double=2)
    result = comfy_sample(apply_concepts(flux, concepts), positive)
    torch.testing.assert_close(result, comfy_sample(reference_model, positive), rtol=1e-4, atol=1e-4)
    only_first = comfy_sample(apply_concepts(flux, concepts[:1]), positive)
    assert (result - only_first).abs().max() > 1e-2  # the concept past token 256 acts


def forward_orig_of_a_pulid_style_pack(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                                       transformer_options={}, attn_mask=None, **kwargs):
    """What packs such as PuLID-Flux put in place of FLUX.1's forward_orig (on the shared model, by instance
    attribute): their own copy of an older one, which runs the dit block replacements but no post_input patches and
    hands the blocks no transformer_options. FLUX.1's arithmetic, so a faithful copy gives ComfyUI's own output."""
    from comfy.ldm.flux.layers import timestep_embedding

    blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
    img = self.img_in(img)
    vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
    if self.params.guidance_embed and guidance is not None:
        vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
    vec = vec + self.vector_in(y[:, :self.params.vec_in_dim])
    txt = self.txt_in(txt)
    pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
    for i, block in enumerate(self.double_blocks):
        def run_double(args, block=block):
            img, txt = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                             attn_mask=args.get("attn_mask"))
            return {"img": img, "txt": txt}
        args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask}
        replace = blocks_replace.get(("double_block", i))
        out = replace(args, {"original_block": run_double, "transformer_options": transformer_options}) if replace \
            else run_double(args)
        img, txt = out["img"], out["txt"]
    img = torch.cat((txt, img), 1)
    for i, block in enumerate(self.single_blocks):
        img = block(img, vec=vec, pe=pe, attn_mask=attn_mask)
    return self.final_layer(img[:, txt.shape[1]:, ...], vec)


@torch.no_grad()
def test_concepts_coexist_with_a_pack_that_replaces_fluxs_forward(comfyui):
    """PuLID-style packs swap FLUX.1's forward_orig for their own copy: ComfyUI's wrappers and the blocks' text
    modulation still run, so the concepts act exactly as with ComfyUI's own forward; only the post_input patch that
    counts the image tokens does not, and the engine counts them from the latent instead."""
    import types

    plain, replaced = tiny_comfy_flux(), tiny_comfy_flux()
    diffusion_model = replaced.model.diffusion_model
    diffusion_model.forward_orig = types.MethodType(forward_orig_of_a_pulid_style_pack, diffusion_model)
    positive = comfy_conditioning(1)
    torch.testing.assert_close(comfy_sample(replaced, positive), comfy_sample(plain, positive))  # a faithful copy
    concepts = [ComfyConcept(random_delta(19), positions=[2, 3], name="dog")]
    result = comfy_sample(apply_concepts(replaced, concepts), positive)
    torch.testing.assert_close(result, comfy_sample(apply_concepts(plain, concepts), positive), rtol=1e-5, atol=1e-5)
    assert (result - comfy_sample(replaced, positive)).abs().max() > 1e-2
