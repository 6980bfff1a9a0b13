"""The Mod-Adapter network: shapes, initial Δ, batching, masks, references, routing, gradients."""

import pytest
import torch

from mod_adapter.modules.adapter import ModAdapter, image_mask_to_token_mask, pack_image_tokens
from mod_adapter.modules.config import ModAdapterConfig
from mod_adapter.modules.errors import ModAdapterError

CFG = ModAdapterConfig.preset("tiny")  # 6 blocks, modulation 64, image tokens 32 wide, 3 experts
TOL = dict(atol=1e-5, rtol=1e-4)


def _trained_like_adapter(seed=0):
    """A tiny adapter with non-zero expert outputs and centroids that separate concepts."""
    torch.manual_seed(seed)
    adapter = ModAdapter(CFG)
    with torch.no_grad():
        for expert in adapter.experts:
            torch.nn.init.normal_(expert.fc2.weight, std=0.2)
            torch.nn.init.normal_(expert.fc2.bias, std=0.2)
    centroids = torch.randn(CFG.num_experts, CFG.modulation_dim, generator=torch.Generator().manual_seed(99)) * 5.0
    adapter.set_router_centroids(centroids)
    return adapter.eval()


def _neutral_near(adapter, experts, seed=1):
    """Neutral features that lie close to the centroids of the given experts."""
    generator = torch.Generator().manual_seed(seed)
    centroids = adapter.router_centroids[torch.tensor(experts)]
    return centroids + 0.3 * torch.randn(centroids.shape, generator=generator)


def _tokens(count, length=9, seed=2):
    return torch.randn(count, length, CFG.image_token_dim, generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_dtype():
    adapter = _trained_like_adapter()
    delta = adapter(_neutral_near(adapter, [0, 1]), _tokens(2))
    assert delta.shape == (2, CFG.num_blocks, CFG.modulation_dim)
    assert delta.dtype == torch.float32
    assert delta.abs().max() > 0


def test_initial_delta_is_exactly_zero():
    torch.manual_seed(0)
    adapter = ModAdapter(CFG)
    delta = adapter(torch.randn(4, CFG.modulation_dim), _tokens(4), experts=torch.tensor([0, 1, 2, 0]))
    assert torch.equal(delta, torch.zeros_like(delta))


def test_num_parameters_and_paper_count():
    adapter = ModAdapter(CFG)
    assert adapter.num_parameters() == sum(p.numel() for p in adapter.parameters())
    assert "router_centroids" in adapter.state_dict()
    with torch.device("meta"):
        paper = ModAdapter(ModAdapterConfig.preset("paper"))
    assert paper.num_parameters() == 1_672_463_360  # paper: 1.67B


def test_batch_equals_one_at_a_time_across_experts():
    adapter = _trained_like_adapter()
    experts = [0, 1, 2, 0, 1]
    neutral = _neutral_near(adapter, experts)
    assert adapter.route(neutral).tolist() == experts
    # Different references and token counts per concept: padding must not leak.
    per_concept = [torch.randn(1 + (c % 2), 5 + c, CFG.image_token_dim, generator=torch.Generator().manual_seed(c)) for c in range(5)]
    tokens, key_mask = pack_image_tokens(per_concept)
    batched = adapter(neutral, tokens, key_mask)
    for c in range(5):
        single_tokens, single_mask = pack_image_tokens([per_concept[c]])
        single = adapter(neutral[c : c + 1], single_tokens, single_mask)
        assert torch.allclose(batched[c : c + 1], single, **TOL), f"concept {c} differs when batched"


def test_masked_token_does_not_change_delta():
    adapter = _trained_like_adapter()
    neutral = _neutral_near(adapter, [1])
    tokens = _tokens(1)
    key_mask = torch.ones(1, tokens.shape[1], dtype=torch.bool)
    key_mask[0, 4] = False
    base = adapter(neutral, tokens, key_mask)
    changed = tokens.clone()
    changed[0, 4] += 100.0
    assert torch.allclose(adapter(neutral, changed, key_mask), base, atol=1e-6)
    # Control: the same change to a kept token does change Δ.
    assert not torch.allclose(adapter(neutral, changed, None), base, atol=1e-3)
    # Masking a token is the same as leaving it out.
    dropped = torch.cat([tokens[:, :4], tokens[:, 5:]], dim=1)
    assert torch.allclose(adapter(neutral, dropped), base, **TOL)


def test_multiple_references_concatenate_tokens():
    adapter = _trained_like_adapter()
    neutral = _neutral_near(adapter, [2])
    first, second = _tokens(1, seed=10)[0], _tokens(1, seed=11)[0]
    tokens, key_mask = pack_image_tokens([torch.stack([first, second])])
    assert tokens.shape == (1, 2 * first.shape[0], CFG.image_token_dim)
    assert torch.equal(tokens[0], torch.cat([first, second]))
    assert key_mask.all()
    both = adapter(neutral, tokens, key_mask)
    # Softmax over the union of tokens: the same reference twice equals it once...
    twice = adapter(neutral, *pack_image_tokens([torch.stack([first, first])]))
    once = adapter(neutral, first[None])
    assert torch.allclose(twice, once, **TOL)
    # ...and two different references give something that is neither alone.
    assert not torch.allclose(both, once, atol=1e-3)
    assert not torch.allclose(both, adapter(neutral, second[None]), atol=1e-3)


def test_pack_image_tokens_pads_and_masks():
    a = torch.randn(2, 3, 4)
    b = torch.randn(1, 5, 4)
    mask_a = torch.tensor([[True, False, True], [True, True, False]])
    tokens, key_mask = pack_image_tokens([a, b], [mask_a, None])
    assert tokens.shape == (2, 6, 4) and key_mask.shape == (2, 6)
    assert key_mask[0].tolist() == [True, False, True, True, True, False]
    assert key_mask[1].tolist() == [True] * 5 + [False]
    assert torch.equal(tokens[1, 5], torch.zeros(4))
    with pytest.raises(ModAdapterError, match=r"reference\(s\) \[1\] keeps no token"):
        pack_image_tokens([a], [torch.tensor([[True, False, False], [False, False, False]])])
    with pytest.raises(ModAdapterError, match="width 5 but concept 0 has width 4"):
        pack_image_tokens([a, torch.randn(1, 3, 5)])
    with pytest.raises(ModAdapterError, match=r"\(references, tokens, width\)"):
        pack_image_tokens([torch.randn(3, 4)])


def test_image_mask_to_token_mask():
    mask = torch.zeros(1, 224, 224)
    mask[:, :, :112] = 1.0  # left half
    token_mask = image_mask_to_token_mask(mask)
    assert token_mask.shape == (1, 257) and token_mask.dtype == torch.bool
    assert token_mask[0, 0]  # CLS always kept
    grid = token_mask[0, 1:].view(16, 16)
    assert grid[:, :8].all() and not grid[:, 8:].any()
    # Threshold 0.5 on the area average: a patch 3/4 covered is kept, 1/4 is not.
    for covered_pixels, kept_columns in ((7, 2), (5, 1)):  # 4-px patches: column 1 covered 3/4, then 1/4
        partial = torch.zeros(1, 64, 64)
        partial[:, :, :covered_pixels] = 1.0
        partial_grid = image_mask_to_token_mask(partial, grid_size=16)[0, 1:].view(16, 16)
        assert partial_grid[:, :kept_columns].all() and not partial_grid[:, kept_columns:].any()
    # Centre crop of a wide mask: only the central square counts.
    wide = torch.zeros(1, 224, 448)
    wide[:, :, 112:336] = 1.0
    assert image_mask_to_token_mask(wide).all()
    assert image_mask_to_token_mask(wide, center_crop=False)[0, 1:].view(16, 16)[:, 4:12].all()
    with pytest.raises(ModAdapterError, match=r"reference\(s\) \[1\] covers no"):
        image_mask_to_token_mask(torch.stack([mask[0], torch.zeros(224, 224)]))


def test_routing_follows_nearest_centroid_and_grouping_matches_per_concept_experts():
    adapter = _trained_like_adapter()
    neutral = torch.randn(12, CFG.modulation_dim, generator=torch.Generator().manual_seed(5)) * 5.0
    experts = adapter.route(neutral)
    assert torch.equal(experts, torch.cdist(neutral, adapter.router_centroids).argmin(dim=1))
    assert experts.unique().numel() > 1  # the test needs more than one expert in play
    tokens = _tokens(12)
    delta = adapter(neutral, tokens)
    features = adapter.block_features(neutral, tokens, None)
    for c in range(12):
        expected = adapter.experts[int(experts[c])](features[c])
        assert torch.allclose(delta[c], expected, **TOL)
    # An explicit expert choice overrides routing.
    forced = adapter(neutral, tokens, experts=torch.full((12,), 2, dtype=torch.long))
    assert torch.allclose(forced, adapter.experts[2](features), **TOL)


def test_single_expert_needs_no_router():
    config = ModAdapterConfig(**{**CFG.to_dict(), "num_experts": 1})
    adapter = ModAdapter(config)
    assert adapter.route(torch.randn(4, CFG.modulation_dim)).tolist() == [0, 0, 0, 0]


def test_gradient_reaches_used_experts_only():
    adapter = _trained_like_adapter().train()
    neutral = _neutral_near(adapter, [0, 2, 0])
    adapter(neutral, _tokens(3)).pow(2).sum().backward()
    for index in (0, 2):
        for name, parameter in adapter.experts[index].named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"expert {index} {name} got no gradient"
    assert all(p.grad is None for p in adapter.experts[1].parameters())
    for name, parameter in adapter.named_parameters():
        if not name.startswith("experts."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} got no gradient"


def test_zero_init_still_trains_last_layer():
    adapter = ModAdapter(CFG).train()
    neutral = torch.randn(2, CFG.modulation_dim)
    adapter(neutral, _tokens(2), experts=torch.tensor([1, 1])).sum().backward()
    assert adapter.experts[1].fc2.weight.grad.abs().sum() > 0


def test_routing_is_unchanged_in_bfloat16():
    adapter = _trained_like_adapter()
    neutral = torch.randn(16, CFG.modulation_dim, generator=torch.Generator().manual_seed(8)) * 5.0
    experts = adapter.route(neutral)
    adapter_bf16 = adapter.to(torch.bfloat16)
    assert adapter_bf16.router_centroids.dtype == torch.float32
    assert torch.equal(adapter_bf16.route(neutral), experts)
    delta = adapter_bf16(neutral, _tokens(16))
    assert delta.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "neutral_shape, tokens_shape, message",
    [
        ((2, 63), (2, 9, 32), r"neutral features must have shape \(concepts, 64\)"),
        ((2, 64), (2, 9, 31), r"image tokens have width 31 but this adapter expects 32"),
        ((2, 64), (3, 9, 32), r"got 2 neutral features but image tokens for 3 concepts"),
        ((2, 64), (2, 32), r"image tokens must have shape \(concepts, tokens, 32\)"),
        ((0, 64), (0, 9, 32), r"no concepts given"),
    ],
)
def test_shape_errors(neutral_shape, tokens_shape, message):
    adapter = ModAdapter(CFG)
    with pytest.raises(ModAdapterError, match=message):
        adapter(torch.randn(neutral_shape), torch.randn(tokens_shape))


def test_nan_and_mask_errors():
    adapter = ModAdapter(CFG)
    neutral, tokens = torch.randn(2, 64), _tokens(2)
    bad_neutral = neutral.clone()
    bad_neutral[1, 0] = float("nan")
    with pytest.raises(ModAdapterError, match="neutral features contain NaN"):
        adapter(bad_neutral, tokens)
    bad_tokens = tokens.clone()
    bad_tokens[0, 3, 3] = float("inf")
    with pytest.raises(ModAdapterError, match="image tokens contain NaN or Inf"):
        adapter(neutral, bad_tokens)
    empty_row = torch.ones(2, tokens.shape[1], dtype=torch.bool)
    empty_row[1] = False
    with pytest.raises(ModAdapterError, match=r"keeps no image token for concept\(s\) \[1\]"):
        adapter(neutral, tokens, empty_row)
    with pytest.raises(ModAdapterError, match="key_mask must be a bool tensor"):
        adapter(neutral, tokens, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ModAdapterError, match=r"expert indices must lie in 0..2"):
        adapter(neutral, tokens, experts=torch.tensor([0, 3]))
    with pytest.raises(ModAdapterError, match=r"router centroids must have shape \(3, 64\)"):
        adapter.set_router_centroids(torch.randn(2, 64))


# --- the ablations of the paper's Table 3 -------------------------------------------------------

def _ablation(**changes):
    import dataclasses

    torch.manual_seed(0)
    adapter = ModAdapter(dataclasses.replace(CFG, **changes))
    with torch.no_grad():
        for expert in adapter.experts:
            torch.nn.init.normal_(expert.fc2.weight, std=0.2)
    return adapter.eval()


def test_a_linear_router_mixes_every_expert_by_a_learned_gate():
    adapter = _ablation(router="linear")
    neutral = torch.randn(3, CFG.modulation_dim)
    delta = adapter(neutral, _tokens(3))
    features = adapter.block_features(neutral, _tokens(3), None)
    weights = adapter.gate_weights(neutral)
    expected = sum(weights[:, e, None, None] * expert(features) for e, expert in enumerate(adapter.experts))
    torch.testing.assert_close(delta, expected, **TOL)
    assert torch.equal(adapter.route(neutral), weights.argmax(dim=-1))
    delta.square().sum().backward()
    assert adapter.router_gate.weight.grad.abs().sum() > 0  # the gate learns; k-means centroids never do
    assert ModAdapter(dataclasses_replace(CFG, router="linear"))(neutral, _tokens(3)).abs().max() == 0  # Δ = 0 at init


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_pooled_image_reading_sees_only_the_mean_of_the_kept_tokens():
    adapter = _ablation(image_reading="pooled")
    assert not any(".to_q." in name for name, _ in adapter.named_parameters())  # no attention at all
    neutral = torch.randn(2, CFG.modulation_dim)
    tokens = _tokens(2, length=9)
    delta = adapter(neutral, tokens, experts=torch.tensor([0, 1]))
    permuted = tokens[:, torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    torch.testing.assert_close(adapter(neutral, permuted, experts=torch.tensor([0, 1])), delta, **TOL)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 5:] = False
    changed = tokens.clone()
    changed[:, 5:] += 10.0
    torch.testing.assert_close(adapter(neutral, changed, mask, experts=torch.tensor([0, 1])),
                               adapter(neutral, tokens, mask, experts=torch.tensor([0, 1])), **TOL)


def test_configs_written_before_the_ablation_switches_load_as_the_paper_design():
    old = {k: v for k, v in CFG.to_dict().items() if k not in ("router", "image_reading")}
    config = ModAdapterConfig.from_dict(old)
    assert (config.router, config.image_reading) == ("kmeans", "cross_attention")
    with pytest.raises(Exception, match="router must be one of"):
        dataclasses_replace(CFG, router="random")
