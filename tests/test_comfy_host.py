"""The per-token modulation engine inside a real ComfyUI (COMFYUI_PATH), on a tiny random FLUX.1.

Every test samples through ComfyUI's own sampler or calls ComfyUI's own FLUX
module; the test is skipped, with the reason, when COMFYUI_PATH is not set.
"""

import inspect

import pytest
import torch

from mod_adapter.modules.comfy_flux_host import (
    ComfyConcept,
    PerTokenModulation,
    apply_concepts,
    prompt_fingerprint,
)
from mod_adapter.modules.errors import ModAdapterError, ModelMismatchError

from tiny_flux import (
    COMFY_REAL_WIDTH_SIZES,
    COMFY_TINY_BLOCKS as NUM_BLOCKS,
    COMFY_TINY_WIDTH as WIDTH,
    comfy_conditioning,
    comfy_sample,
    tiny_comfy_flux,
)


def random_delta(seed, scale=0.5):
    return torch.randn(NUM_BLOCKS, WIDTH, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def flux(comfyui):
    return tiny_comfy_flux()


# --- a naive reference: every block recomputed with a full per-token vec -------------------------

def _reference_double(block, img, txt, vec, vec_txt, pe):
    from comfy.ldm.flux.math import attention

    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec_txt)  # ComfyUI's Modulation accepts (B, L, D): one row per token

    def qkv(attn, x):
        q, k, v = attn.qkv(x).view(x.shape[0], x.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.norm(q, k, v)
        return q, k, v

    img_q, img_k, img_v = qkv(block.img_attn, block.img_norm1(img) * (1 + img_mod1.scale) + img_mod1.shift)
    txt_q, txt_k, txt_v = qkv(block.txt_attn, block.txt_norm1(txt) * (1 + txt_mod1.scale) + txt_mod1.shift)
    attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe=pe)
    txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
    img = img + img_mod1.gate * block.img_attn.proj(img_attn)
    img = img + img_mod2.gate * block.img_mlp(block.img_norm2(img) * (1 + img_mod2.scale) + img_mod2.shift)
    txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
    txt = txt + txt_mod2.gate * block.txt_mlp(block.txt_norm2(txt) * (1 + txt_mod2.scale) + txt_mod2.shift)
    return img, txt


def _reference_single(block, x, vec_tokens, pe):
    from comfy.ldm.flux.math import attention

    mod, _ = block.modulation(vec_tokens)
    qkv, mlp = torch.split(block.linear1(block.pre_norm(x) * (1 + mod.scale) + mod.shift),
                           [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe)
    return x + mod.gate * block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))


class NaiveReference:
    """Installed as dit block replacements on an unpatched clone: recomputes every
    block with `vec + s·Δ_i` for the concept tokens of the positive rows."""

    def __init__(self, concepts, text_offset=0, img_len=64):
        self.concepts = concepts
        self.text_offset = text_offset
        self.img_len = img_len  # image tokens after the text: 16×16 latent in 2×2 patches, plus any references
        self.seen_cond_or_uncond = []

    def vec_per_text_token(self, vec, text_len, block_index, options):
        cond_or_uncond = options["cond_or_uncond"]
        self.seen_cond_or_uncond.append(tuple(cond_or_uncond))
        chunk = vec.shape[0] // len(cond_or_uncond)
        per_token = vec[:, None, :].repeat(1, text_len, 1)
        for c in self.concepts:
            for k, kind in enumerate(cond_or_uncond):
                if kind == 0:
                    for b in range(k * chunk, (k + 1) * chunk):
                        for p in c.positions:
                            per_token[b, p + self.text_offset] = vec[b] + c.strength * c.delta[block_index]
        return per_token

    def install(self, model_patcher, num_double):
        dm = model_patcher.get_model_object("diffusion_model")
        for i, block in enumerate(dm.double_blocks):
            def double(args, extra, block=block, i=i):
                vec_txt = self.vec_per_text_token(args["vec"], args["txt"].shape[1], i, args["transformer_options"])
                img, txt = _reference_double(block, args["img"], args["txt"], args["vec"], vec_txt, args["pe"])
                return {"img": img, "txt": txt}
            model_patcher.set_model_patch_replace(double, "dit", "double_block", i)
        for j, block in enumerate(dm.single_blocks):
            def single(args, extra, block=block, j=j):
                x, vec = args["img"], args["vec"]
                text_len = x.shape[1] - self.img_len
                vec_txt = self.vec_per_text_token(vec, text_len, num_double + j, args["transformer_options"])
                vec_tokens = torch.cat([vec_txt, vec[:, None, :].expand(-1, self.img_len, -1)], dim=1)
                return {"img": _reference_single(block, x, vec_tokens, args["pe"])}
            model_patcher.set_model_patch_replace(single, "dit", "single_block", j)


# --- tests --------------------------------------------------------------------------------------

@torch.no_grad()
def test_zero_delta_gives_the_unpatched_output(flux):
    positive = comfy_conditioning(1)
    expected = comfy_sample(flux, positive)
    patched = apply_concepts(flux, [ComfyConcept(torch.zeros(NUM_BLOCKS, WIDTH), positions=[3, 4], name="dog")])
    torch.testing.assert_close(comfy_sample(patched, positive), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("num_concepts", [1, 2, 3])
def test_matches_naive_reference_with_positive_and_negative_batched(flux, num_concepts):
    spans, strengths = [[2], [5, 6], [9]], [1.0, 0.6, 1.4]
    concepts = [ComfyConcept(random_delta(20 + k), positions=spans[k], strength=strengths[k], name=f"c{k}")
                for k in range(num_concepts)]
    positive, negative = comfy_conditioning(1), comfy_conditioning(2)

    reference_model = flux.clone()
    reference = NaiveReference(concepts)
    reference.install(reference_model, num_double=2)
    expected = comfy_sample(reference_model, positive, negative, cfg=2.0)
    assert any(set(s) == {0, 1} for s in reference.seen_cond_or_uncond), "positive and negative were not batched"

    patched = apply_concepts(flux, concepts)
    result = comfy_sample(patched, positive, negative, cfg=2.0)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    assert (result - comfy_sample(flux, positive, negative, cfg=2.0)).abs().max() > 1e-2


@torch.no_grad()
def test_only_concept_tokens_of_the_positive_rows_change(flux):
    concept = ComfyConcept(random_delta(7), positions=[4, 5], name="dog")
    patched = apply_concepts(flux, [concept])
    captured = {}
    double_mod = patched.object_patches["diffusion_model.double_blocks.1.txt_mod"]
    single_mod = patched.object_patches["diffusion_model.single_blocks.2.modulation"]
    assert isinstance(double_mod, PerTokenModulation)

    def capture(name):
        def hook(module, args, output):
            captured.setdefault(name, (args[0], output))  # returns None: the output is left as it is
        return hook

    hooks = [double_mod.register_forward_hook(capture("double")), single_mod.register_forward_hook(capture("single"))]
    try:
        comfy_sample(patched, comfy_conditioning(1), comfy_conditioning(2), cfg=2.0, steps=1)
    finally:
        for h in hooks:
            h.remove()

    vec, (mod1, mod2) = captured["double"]
    base1, base2 = double_mod.original(vec)  # (B, 1, D) per sample
    assert mod1.shift.shape == (vec.shape[0], 256, WIDTH)
    # Positive is one chunk, negative the other; find the positive row by where the concept landed.
    changed_rows = [b for b in range(vec.shape[0]) if not torch.allclose(mod2.gate[b, 4], base2.gate[b, 0])]
    assert len(changed_rows) == 1
    for b in range(vec.shape[0]):
        outside = [t for t in range(256) if b != changed_rows[0] or t not in (4, 5)]
        for field in ("shift", "scale", "gate"):
            torch.testing.assert_close(getattr(mod1, field)[b, outside], getattr(base1, field)[b].expand(len(outside), -1))

    vec, (mod, _) = captured["single"]
    base, _ = single_mod.original(vec)
    assert mod.scale.shape == (vec.shape[0], 256 + 64, WIDTH)
    image_tokens = mod.scale[:, 256:]
    torch.testing.assert_close(image_tokens, base.scale.expand(-1, 64, -1))


@torch.no_grad()
def test_same_weights_in_comfyui_and_diffusers_layout_give_the_same_patched_output(comfyui):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts
    from mod_adapter.modules.token_modulation import TokenConcept

    import comfy.sd

    # One FLUX.1 file (BFL layout, as checkpoints are published: QK norms are `*_norm.scale`), loaded by
    # ComfyUI's own loader and converted by diffusers' own converter.
    random_model = tiny_comfy_flux(sizes=COMFY_REAL_WIDTH_SIZES).get_model_object("diffusion_model")
    checkpoint = {(k[:-len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v
                  for k, v in random_model.state_dict().items()}
    del random_model
    flux = comfy.sd.load_diffusion_model_state_dict(dict(checkpoint))
    comfy_dm = flux.get_model_object("diffusion_model")
    assert comfy_dm.dtype == torch.float32
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()
    transformer.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint)), strict=True)

    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 20, 4096, generator=g)
    pooled = torch.randn(2, 768, generator=g)
    sigma = torch.full((2,), 0.6)
    guidance = torch.full((2,), 3.5)
    delta = torch.randn(2, 3072, generator=g) * 0.5

    def comfy_forward(model_patcher):
        model_patcher.patch_model()
        try:
            wrappers = {k: list(v) for k, v in model_patcher.wrappers.get("diffusion_model", {}).items()}
            options = {"wrappers": {"diffusion_model": wrappers}, "cond_or_uncond": [0], "sigmas": sigma}
            out = comfy_dm(latent, sigma, context, y=pooled, guidance=guidance, transformer_options=options)
        finally:
            model_patcher.unpatch_model()
        # diffusers works on the latent packed into 2×2 patches, (B, h·w, c·2·2).
        return out.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)

    comfy_plain = comfy_forward(flux)
    comfy_patched = comfy_forward(apply_concepts(flux, [ComfyConcept(delta, positions=[3, 4], strength=0.8, name="dog")]))

    packed = latent.view(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1] = torch.arange(4).repeat_interleave(4)
    img_ids[:, 2] = torch.arange(4).repeat(4)
    inputs = dict(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma,
                  guidance=guidance, img_ids=img_ids, txt_ids=torch.zeros(20, 3), return_dict=False)
    diffusers_plain = transformer(**inputs)[0]
    with DiffusersFluxConcepts(transformer) as host, host.using([TokenConcept(delta, positions=[3, 4], strength=0.8)]):
        diffusers_patched = transformer(**inputs)[0]

    torch.testing.assert_close(diffusers_plain, comfy_plain, rtol=1e-4, atol=1e-4)  # the conversion itself
    torch.testing.assert_close(diffusers_patched, comfy_patched, rtol=1e-4, atol=1e-4)
    assert (diffusers_patched - diffusers_plain).abs().max() > 1e-2


@torch.no_grad()
def test_unpatched_model_is_bit_identical_before_and_after_a_patched_run(flux):
    positive = comfy_conditioning(1)
    before = comfy_sample(flux, positive)
    patched = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[2], name="dog")])
    assert not torch.equal(comfy_sample(patched, positive), before)
    assert torch.equal(comfy_sample(flux, positive), before)
    assert not any(isinstance(m, PerTokenModulation) for m in flux.get_model_object("diffusion_model").modules())


@torch.no_grad()
def test_two_clones_do_not_see_each_others_concepts(flux):
    positive = comfy_conditioning(1)
    clone_a = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[2], name="a")])
    clone_b = apply_concepts(flux, [ComfyConcept(random_delta(2), positions=[7], name="b")])
    a1 = comfy_sample(clone_a, positive)
    b = comfy_sample(clone_b, positive)
    a2 = comfy_sample(clone_a, positive)
    assert torch.equal(a1, a2)
    assert not torch.allclose(a1, b)
    # A later clone of a patched model (e.g. by a LoRA loader) keeps the concepts.
    assert torch.equal(comfy_sample(clone_a.clone(), positive), a1)


@torch.no_grad()
def test_another_packs_dit_block_replacement_keeps_working(flux):
    positive = comfy_conditioning(1)
    calls = []

    def other_pack(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        out["img"] = out["img"] * 0.9
        return out

    concept = ComfyConcept(random_delta(1), positions=[2], name="dog")
    with_other = flux.clone()
    with_other.set_model_patch_replace(other_pack, "dit", "double_block", 0)
    other_only = comfy_sample(with_other, positive)
    both = comfy_sample(apply_concepts(with_other, [concept]), positive)
    ours_only = comfy_sample(apply_concepts(flux, [concept]), positive)
    assert calls, "the other pack's replacement was not called"
    assert not torch.allclose(both, other_only)  # our concept still acts
    assert not torch.allclose(both, ours_only)  # and so does theirs
    zero = ComfyConcept(torch.zeros(NUM_BLOCKS, WIDTH), positions=[2])
    torch.testing.assert_close(comfy_sample(apply_concepts(with_other, [zero]), positive), other_only, rtol=1e-5, atol=1e-5)


class PrependTokens:
    """A post_input patch like ComfyUI's USO style reference: puts tokens before the text."""

    def __init__(self, count):
        self.tokens = torch.randn(1, count, 256, generator=torch.Generator().manual_seed(5))

    def __call__(self, args):
        txt, txt_ids = args["txt"], args["txt_ids"]
        extra = self.tokens.to(txt).expand(txt.shape[0], -1, -1)
        args["txt"] = torch.cat([extra, txt], dim=1)
        args["txt_ids"] = torch.cat([torch.zeros(txt_ids.shape[0], extra.shape[1], 3, dtype=txt_ids.dtype), txt_ids], dim=1)
        return args


@torch.no_grad()
def test_text_positions_stay_right_when_a_post_input_patch_prepends_tokens(flux):
    concept = ComfyConcept(random_delta(4), positions=[3], name="dog")
    with_prefix = flux.clone()
    with_prefix.set_model_post_input_patch(PrependTokens(5))
    positive = comfy_conditioning(1)

    reference_model = with_prefix.clone()
    NaiveReference([concept], text_offset=5).install(reference_model, num_double=2)
    expected = comfy_sample(reference_model, positive)
    result = comfy_sample(apply_concepts(with_prefix, [concept]), positive)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_start_and_end_percent_limit_the_concept_to_part_of_the_schedule(flux):
    positive = comfy_conditioning(1)

    def denoised_per_step(model):
        seen = []
        comfy_sample(model, positive, steps=4, callback=lambda step, x0, x, total: seen.append(x0.clone()))
        return seen

    plain = denoised_per_step(flux)
    late = denoised_per_step(apply_concepts(flux, [ComfyConcept(random_delta(6), positions=[2], start_percent=0.5)]))
    torch.testing.assert_close(late[0], plain[0])  # step 0 is at 0 %: concept not yet active
    assert not torch.allclose(late[-1], plain[-1])
    never = apply_concepts(flux, [ComfyConcept(random_delta(6), positions=[2], start_percent=1.0, end_percent=1.0)])
    torch.testing.assert_close(comfy_sample(never, positive, steps=4), comfy_sample(flux, positive, steps=4))


@torch.no_grad()
def test_prompt_fingerprint_applies_concepts_only_to_their_own_prompt(flux):
    ours, other = comfy_conditioning(1), comfy_conditioning(2)
    concept = ComfyConcept(random_delta(3), positions=[2], name="dog")
    matched = apply_concepts(flux, [concept], prompt_fingerprint=prompt_fingerprint(ours[0][0]))
    assert not torch.allclose(comfy_sample(matched, ours), comfy_sample(flux, ours))
    torch.testing.assert_close(comfy_sample(matched, other), comfy_sample(flux, other))


@torch.no_grad()
def test_applying_twice_merges_concepts_into_one_patch(flux):
    positive = comfy_conditioning(1)
    a = ComfyConcept(random_delta(1), positions=[2], name="a")
    b = ComfyConcept(random_delta(2), positions=[6], name="b")
    stacked = apply_concepts(apply_concepts(flux, [a]), [b])
    together = apply_concepts(flux, [a, b])
    assert len(stacked.wrappers["diffusion_model"]["mod_adapter.token_modulation"]) == 1
    torch.testing.assert_close(comfy_sample(stacked, positive), comfy_sample(together, positive))


def test_wrong_models_are_refused_at_patch_time(comfyui, flux):
    import comfy.model_patcher

    cpu = torch.device("cpu")

    class NotFlux(torch.nn.Module):  # what an SD1.5/SDXL MODEL looks like from here: a UNet, no FLUX blocks
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))

    with pytest.raises(ModelMismatchError, match="needs a FLUX.1 model"):
        apply_concepts(comfy.model_patcher.ModelPatcher(NotFlux(), cpu, cpu),
                       [ComfyConcept(random_delta(1), positions=[1])])

    class ChromaLike(torch.nn.Module):  # FLUX-like blocks with no per-block modulation layer
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Module()
            self.diffusion_model.double_blocks = torch.nn.ModuleList([torch.nn.Module()])
            self.diffusion_model.single_blocks = torch.nn.ModuleList([torch.nn.Module()])

    with pytest.raises(ModelMismatchError, match="no per-block text modulation"):
        apply_concepts(comfy.model_patcher.ModelPatcher(ChromaLike(), cpu, cpu),
                       [ComfyConcept(random_delta(1), positions=[1])])

    with pytest.raises(ModelMismatchError, match=r"57×3072.*2\+4 = 6 blocks of width 256"):
        apply_concepts(flux, [ComfyConcept(torch.zeros(57, 3072), positions=[1], name="dog")])


@torch.no_grad()
def test_positions_past_the_prompt_fail_with_a_clear_message(flux):
    patched = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[300], name="dog")])
    with pytest.raises(ModAdapterError, match="received only 256 prompt tokens"):
        comfy_sample(patched, comfy_conditioning(1))


# --- current ComfyUI: Kontext references, wrappers, memory management, hosts we cannot patch ------

def kontext_conditioning(seed, method):
    """A prompt with one FLUX.1 Kontext reference image (what ReferenceLatent and
    FluxKontextMultiReferenceLatentMethod put into the conditioning)."""
    positive = comfy_conditioning(seed)
    positive[0][1]["reference_latents"] = [torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed + 50))]
    positive[0][1]["reference_latents_method"] = method
    return positive


@torch.no_grad()
@pytest.mark.parametrize("method", ["offset", "index", "uxo"])
def test_kontext_reference_tokens_keep_their_modulation(flux, method):
    concepts = [ComfyConcept(random_delta(31), positions=[2, 3], strength=1.2, name="dog")]
    positive = kontext_conditioning(1, method)
    reference_model = flux.clone()
    NaiveReference(concepts, img_len=64 + 16).install(reference_model, num_double=2)  # 16×16 + 8×8 reference
    expected = comfy_sample(reference_model, positive)
    result = comfy_sample(apply_concepts(flux, concepts), positive)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    plain = comfy_sample(flux, positive)
    assert (result - plain).abs().max() > 1e-2
    assert (plain - comfy_sample(flux, comfy_conditioning(1))).abs().max() > 1e-3, "the reference image was not used"


@torch.no_grad()
def test_kontext_timestep_zero_references_are_refused_with_a_clear_error(flux):
    if "index_timestep_zero" not in inspect.getsource(type(flux.get_model_object("diffusion_model"))._forward):
        positive = comfy_conditioning(1)  # ComfyUI 0.3.64 has no such method: a stacked vec is forced below
        patched = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[2], name="dog")])
        module = patched.object_patches["diffusion_model.double_blocks.0.txt_mod"]

        def stacked_vec(args, extra):  # what 'index_timestep_zero' hands the blocks: two timesteps per prompt
            module(torch.cat([args["vec"], args["vec"]]))
        patched.set_model_patch_replace(stacked_vec, "dit", "double_block", 0)
    else:
        positive = kontext_conditioning(1, "index_timestep_zero")
        patched = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[2], name="dog")])
        # ComfyUI's own FLUX.1 blocks cannot run this method either (it is FLUX.2's): measured, not assumed.
        with pytest.raises(RuntimeError, match="broadcast"):
            comfy_sample(flux, positive)
    with pytest.raises(ModAdapterError, match=r"index_timestep_zero.*'offset' or 'index'"):
        comfy_sample(patched, positive)


@torch.no_grad()
def test_a_modulation_vector_the_engine_cannot_handle_is_an_error(flux):
    patched = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[2], name="dog")])
    block = flux.get_model_object("diffusion_model").double_blocks[0]

    def per_token_vec(args, extra):  # another pack that hands the block a (B, L, D) vec
        img, txt = block(img=args["img"], txt=args["txt"], vec=args["vec"][:, None], pe=args["pe"],
                         transformer_options=args["transformer_options"])
        return {"img": img, "txt": txt}
    patched.set_model_patch_replace(per_token_vec, "dit", "double_block", 0)
    with pytest.raises(ModAdapterError, match=r"block 0 was given a modulation vector of shape \(1, 1, 256\)"):
        comfy_sample(patched, comfy_conditioning(1))


@torch.no_grad()
def test_the_modulation_patch_without_its_forward_wrapper_is_an_error(flux):
    patched = apply_concepts(flux, [ComfyConcept(random_delta(1), positions=[2], name="dog")])
    patched.remove_wrappers_with_key("diffusion_model", "mod_adapter.token_modulation")
    with pytest.raises(ModAdapterError, match="outside its FLUX forward wrapper"):
        comfy_sample(patched, comfy_conditioning(1))


@torch.no_grad()
def test_forward_arguments_are_bound_by_name_against_the_real_signature(flux):
    from mod_adapter.modules.comfy_flux_host import FluxTokenModulationPatch

    concepts = [ComfyConcept(random_delta(3), positions=[2, 3], name="dog")]
    patched = apply_concepts(flux, concepts)
    dm = flux.get_model_object("diffusion_model")
    g = torch.Generator().manual_seed(0)
    x, context, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 256, 4096, generator=g), torch.randn(1, 768, generator=g)
    t, guidance = torch.full((1,), 0.5), torch.full((1,), 3.5)
    wrappers = {"diffusion_model": {k: list(v) for k, v in patched.wrappers["diffusion_model"].items()}}
    patched.patch_model()
    try:
        options = {"wrappers": wrappers, "cond_or_uncond": [0], "sigmas": t}
        positional = dm(x, t, context, y, guidance, None, None, dict(options))
        by_name = dm(x=x, timestep=t, context=context, y=y, guidance=guidance, transformer_options=dict(options))
    finally:
        patched.unpatch_model()
    plain = dm(x, t, context, y, guidance, transformer_options={"cond_or_uncond": [0], "sigmas": t})
    torch.testing.assert_close(by_name, positional)
    assert (positional - plain).abs().max() > 1e-3

    class ForwardWithoutContext:  # a future FLUX forward that renamed its text input
        @staticmethod
        def original(x, timestep, txt, transformer_options={}, **kwargs):
            return x

    patch = FluxTokenModulationPatch([])
    with pytest.raises(ModAdapterError, match="has no context parameter"):
        patch(ForwardWithoutContext(), x, t, context)


@torch.no_grad()
@pytest.mark.parametrize("position", [0, 1, 100, 255])
def test_an_active_concept_always_changes_the_positive_output(flux, position):
    positive = comfy_conditioning(4)
    plain = comfy_sample(flux, positive, steps=1)
    patched = apply_concepts(flux, [ComfyConcept(random_delta(position), positions=[position], name="dog")])
    assert (comfy_sample(patched, positive, steps=1) - plain).abs().max() > 1e-3


@torch.no_grad()
def test_concepts_survive_comfyui_unloading_and_reloading_the_model(flux):
    import comfy.model_management as mm

    positive = comfy_conditioning(1)
    patched = apply_concepts(flux, [ComfyConcept(random_delta(5), positions=[2, 3], name="dog")])
    first = comfy_sample(patched, positive)
    assert any(loaded.model is patched for loaded in mm.current_loaded_models)
    mm.unload_all_models()
    assert not any(loaded.model is patched for loaded in mm.current_loaded_models)
    second = comfy_sample(patched, positive)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert (first - comfy_sample(flux, positive)).abs().max() > 1e-2
    mm.unload_all_models()


def _real_unsupported_models():
    """Chroma (both versions) and FLUX.2 (where this ComfyUI knows it), built as ComfyUI's loader would
    build them from their checkpoints' keys, at a small width."""
    import comfy.model_detection

    from tiny_comfy import comfy_flux_model

    def meta(*shape):
        return torch.empty(shape, device="meta")

    def detect(**keys):
        keys = {"double_blocks.0.img_attn.norm.key_norm.scale": meta(128),
                "single_blocks.0.norm.key_norm.scale": meta(128), **{k.replace("__", "."): v for k, v in keys.items()}}
        return comfy.model_detection.detect_unet_config(keys, "")

    small = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64)
    chroma = detect(distilled_guidance_layer__norms__0__scale=meta(5120), img_in__weight=meta(3072, 64))
    models = {"Chroma": comfy_flux_model({**chroma, **small, "out_dim": 256, "hidden_dim": 64, "n_layers": 1})}
    flux2 = detect(double_stream_modulation_img__lin__weight=meta(6 * 3072, 3072), img_in__weight=meta(3072, 128))
    if flux2.get("image_model") == "flux2":
        models["FLUX.2"] = comfy_flux_model({**flux2, **small})
    return models


def test_real_chroma_and_flux2_models_are_refused_naming_what_was_found(comfyui):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    models = _real_unsupported_models()
    for name, model in models.items():
        with pytest.raises(ModelMismatchError, match=rf"{type(model.diffusion_model).__name__}.*no per-block text modulation"):
            apply_concepts(comfy.model_patcher.ModelPatcher(model, cpu, cpu), [ComfyConcept(random_delta(1), positions=[1])])


def test_a_wrapper_model_without_flux_blocks_is_refused_naming_what_was_found(comfyui, flux):
    import comfy.model_patcher

    class ThirdPartyFlux(torch.nn.Module):  # e.g. an engine wrapper that runs FLUX.1 in its own kernels
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(4, 4)

    base = flux.model
    original = base.diffusion_model
    base.diffusion_model = ThirdPartyFlux()
    try:
        wrapped = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
        with pytest.raises(ModelMismatchError, match=r"this MODEL is ThirdPartyFlux \(Flux\).*no FLUX double/single"):
            apply_concepts(wrapped, [ComfyConcept(random_delta(1), positions=[1])])
    finally:
        base.diffusion_model = original
