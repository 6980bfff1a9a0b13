"""The per-token modulation engine on diffusers' FluxTransformer2DModel (CPU, tiny random model)."""

import pytest
import torch
import torch.nn.functional as F

from mod_adapter.modules.diffusers_flux_host import DiffusersFluxConcepts
from mod_adapter.modules.errors import ModAdapterError, ModelMismatchError
from mod_adapter.modules.token_modulation import TokenConcept

from tiny_flux import diffusers_inputs, tiny_diffusers_flux

NUM_BLOCKS = 6
WIDTH = 128


def random_delta(seed, scale=0.5):
    return torch.randn(NUM_BLOCKS, WIDTH, generator=torch.Generator().manual_seed(seed)) * scale


def reference_forward(tr, inputs, token_offsets):
    """FLUX.1 forward written out step by step with a full per-token modulation
    input for every text token: text token t of sample b uses
    `temb[b] + token_offsets[b, t, block]` in each block, everything else `temb[b]`.

    token_offsets: (B, L_txt, num_blocks, D).
    """
    h = tr.x_embedder(inputs["hidden_states"])
    temb = tr.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
    e = tr.context_embedder(inputs["encoder_hidden_states"])
    rot = tr.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
    batch, text_len = e.shape[:2]
    nd = len(tr.transformer_blocks)
    for i, blk in enumerate(tr.transformer_blocks):
        vec_txt = temb[:, None, :] + token_offsets[:, :, i]
        nh, g_msa, sh_mlp, sc_mlp, g_mlp = blk.norm1(h, emb=temb)
        mod = blk.norm1_context.linear(F.silu(vec_txt))
        c_sh_msa, c_sc_msa, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = mod.chunk(6, dim=-1)
        ne = blk.norm1_context.norm(e) * (1 + c_sc_msa) + c_sh_msa
        attn_out, ctx_attn = blk.attn(hidden_states=nh, encoder_hidden_states=ne, image_rotary_emb=rot)
        h = h + g_msa[:, None] * attn_out
        h = h + g_mlp[:, None] * blk.ff(blk.norm2(h) * (1 + sc_mlp[:, None]) + sh_mlp[:, None])
        e = e + c_g_msa * ctx_attn
        e = e + c_g_mlp * blk.ff_context(blk.norm2_context(e) * (1 + c_sc_mlp) + c_sh_mlp)
    for j, blk in enumerate(tr.single_transformer_blocks):
        x = torch.cat([e, h], dim=1)
        vec_tokens = torch.cat([temb[:, None, :] + token_offsets[:, :, nd + j],
                                temb[:, None, :].expand(batch, h.shape[1], -1)], dim=1)
        sh, sc, g = blk.norm.linear(F.silu(vec_tokens)).chunk(3, dim=-1)
        nx = blk.norm.norm(x) * (1 + sc) + sh
        mlp = blk.act_mlp(blk.proj_mlp(nx))
        attn = blk.attn(hidden_states=nx, image_rotary_emb=rot)
        x = x + g * blk.proj_out(torch.cat([attn, mlp], dim=2))
        e, h = x[:, :text_len], x[:, text_len:]
    return tr.proj_out(tr.norm_out(h, temb))


def offsets_for(concepts, batch, text_len):
    offsets = torch.zeros(batch, text_len, NUM_BLOCKS, WIDTH)
    for c in concepts:
        rows = range(batch) if c.batch_rows is None else c.batch_rows
        for b in rows:
            for p in c.positions:
                offsets[b, p] = c.strength * c.delta
    return offsets


@pytest.fixture(scope="module")
def model():
    return tiny_diffusers_flux()


@torch.no_grad()
def test_zero_delta_gives_the_unpatched_output(model):
    inputs = diffusers_inputs(model)
    expected = model(**inputs)[0]
    with DiffusersFluxConcepts(model) as host:
        with host.using([TokenConcept(torch.zeros(NUM_BLOCKS, WIDTH), positions=[1, 2], name="dog")]):
            patched = model(**inputs)[0]
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("num_concepts", [1, 2, 3])
def test_matches_a_naive_per_token_reference(model, num_concepts):
    inputs = diffusers_inputs(model, batch=2, text_len=9)
    spans = [[1], [3, 4], [6]]
    strengths = [1.0, 0.7, 1.3]
    # Row 0 is the positive prompt (all concepts); row 1 gets only the first concept.
    concepts = [
        TokenConcept(random_delta(10 + k), positions=spans[k], strength=strengths[k],
                     batch_rows=None if k == 0 else [0], name=f"c{k}")
        for k in range(num_concepts)
    ]
    expected = reference_forward(model, inputs, offsets_for(concepts, 2, 9))
    unpatched = model(**inputs)[0]
    with DiffusersFluxConcepts(model) as host, host.using(concepts):
        patched = model(**inputs)[0]
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-5)
    assert (patched - unpatched).abs().max() > 1e-3  # the concepts did something


@torch.no_grad()
def test_reference_without_offsets_is_the_stock_model(model):
    # Guards the reference itself: with no offsets it must be diffusers' forward.
    inputs = diffusers_inputs(model)
    torch.testing.assert_close(reference_forward(model, inputs, torch.zeros(2, 7, NUM_BLOCKS, WIDTH)),
                               model(**inputs)[0], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_only_concept_tokens_get_a_different_modulation(model):
    inputs = diffusers_inputs(model, batch=2, text_len=7)
    captured = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            captured[name] = output
        return hook

    concept = TokenConcept(random_delta(3), positions=[2, 3], batch_rows=[0], name="dog")
    with DiffusersFluxConcepts(model) as host, host.using([concept]):
        hooks = [model.transformer_blocks[0].norm1_context.register_forward_hook(capture("double"), with_kwargs=True),
                 model.single_transformer_blocks[1].norm.register_forward_hook(capture("single"), with_kwargs=True),
                 model.transformer_blocks[0].norm1.register_forward_hook(capture("image"), with_kwargs=True)]
        model(**inputs)
        for h in hooks:
            h.remove()

    # What the stock layers give the same inputs, for comparison.
    temb = model.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
    base_double = model.transformer_blocks[0].norm1_context.linear(F.silu(temb))  # (B, 6D)
    gate_msa = captured["double"][1].unsqueeze(1)  # (B, L, D) per token
    base_gate = base_double.chunk(6, dim=-1)[2]
    outside = [0, 1, 4, 5, 6]
    torch.testing.assert_close(gate_msa[0, outside], base_gate[0].expand(len(outside), -1))
    torch.testing.assert_close(gate_msa[1], base_gate[1].expand(7, -1))  # row 1 carries no concept
    assert (gate_msa[0, [2, 3]] - base_gate[0]).abs().max() > 1e-3

    single_gate = captured["single"][1].unsqueeze(1)  # (B, L_txt + L_img, D)
    base_single = model.single_transformer_blocks[1].norm.linear(F.silu(temb)).chunk(3, dim=-1)[2]
    keep = [t for t in range(single_gate.shape[1]) if t not in (2, 3)]
    torch.testing.assert_close(single_gate[0, keep], base_single[0].expand(len(keep), -1))
    assert (single_gate[0, [2, 3]] - base_single[0]).abs().max() > 1e-3
    # The image stream of double blocks is never touched: its gate stays per sample.
    assert captured["image"][1].shape == (2, WIDTH)


@torch.no_grad()
def test_schedule_limits_when_a_concept_applies(model):
    inputs = diffusers_inputs(model)  # timestep (= sigma) 0.7
    unpatched = model(**inputs)[0]
    with DiffusersFluxConcepts(model) as host:
        with host.using([TokenConcept(random_delta(4), positions=[1], sigma_start=0.5, sigma_end=0.0)]):
            torch.testing.assert_close(model(**inputs)[0], unpatched)
        with host.using([TokenConcept(random_delta(4), positions=[1], sigma_start=1.0, sigma_end=0.5)]):
            assert (model(**inputs)[0] - unpatched).abs().max() > 1e-3


def frozen_checkpointed_model():
    """The tiny transformer as Learn Concept runs it: train mode, gradient checkpointing, weights frozen."""
    model = tiny_diffusers_flux()
    model.enable_gradient_checkpointing()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_gradients_reach_delta_with_gradient_checkpointing():
    model = frozen_checkpointed_model()
    inputs = diffusers_inputs(model)
    delta = random_delta(5).requires_grad_(True)
    with DiffusersFluxConcepts(model) as host, host.using([TokenConcept(delta, positions=[1, 2])]):
        model(**inputs)[0].square().mean().backward()
    grad_checkpointed = delta.grad.clone()

    model.disable_gradient_checkpointing()
    delta.grad = None
    with DiffusersFluxConcepts(model) as host, host.using([TokenConcept(delta, positions=[1, 2])]):
        model(**inputs)[0].square().mean().backward()
    assert grad_checkpointed.abs().sum() > 0
    assert grad_checkpointed[:, :].ne(0).any(dim=1).all(), "every block's Δ row must receive gradient"
    torch.testing.assert_close(grad_checkpointed, delta.grad, rtol=1e-4, atol=1e-7)


def test_concepts_act_only_inside_their_scope_and_a_later_backward_keeps_them():
    # the concepts of one forward cannot leak into the next (the unconditional pass needs no reset), and gradient
    # checkpointing's recompute during a backward after the scope still applies them
    model = frozen_checkpointed_model()
    inputs = diffusers_inputs(model)
    with torch.no_grad():
        unpatched = model(**inputs)[0]
    delta = random_delta(6).requires_grad_(True)
    with DiffusersFluxConcepts(model) as host:
        with host.using([TokenConcept(delta, positions=[1, 2])]):
            patched = model(**inputs)[0]
        patched.square().mean().backward()  # outside the scope
        with torch.no_grad():
            after = model(**inputs)[0]
    assert (patched.detach() - unpatched).abs().max() > 1e-3
    torch.testing.assert_close(after, unpatched)
    assert delta.grad is not None and delta.grad.ne(0).any(dim=1).all(), "every block's Δ row must receive gradient"


@torch.no_grad()
def test_remove_restores_the_original_modules_and_state_dict_names(model):
    keys_before = list(model.state_dict().keys())
    originals = [b.norm1_context for b in model.transformer_blocks]
    host = DiffusersFluxConcepts(model)
    assert list(model.state_dict().keys()) == keys_before
    host.remove()
    assert [b.norm1_context for b in model.transformer_blocks] == originals


def test_wrong_delta_shape_and_wrong_model_are_refused(model):
    with DiffusersFluxConcepts(model) as host:
        with pytest.raises(ModelMismatchError, match=r"needs \(6, 128\)"):
            with host.using([TokenConcept(torch.zeros(57, 3072), positions=[0], name="dog")]):
                pass
    with pytest.raises(ModelMismatchError, match="FluxTransformer2DModel"):
        DiffusersFluxConcepts(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_positions_past_the_prompt_are_a_clear_error(model):
    inputs = diffusers_inputs(model, text_len=5)
    with DiffusersFluxConcepts(model) as host, host.using([TokenConcept(random_delta(1), positions=[9], name="dog")]):
        with pytest.raises(ModAdapterError, match="only 5 prompt tokens"):
            model(**inputs)
