"""The modulation math both hosts share: plans, rows, and spreading rows to tokens."""

import pytest
import torch

from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.token_modulation import TokenConcept, build_plan, modulation_rows, rows_to_tokens


def _concepts(delta_a, delta_b):
    return [TokenConcept(delta_a, positions=[1, 2], strength=0.5, name="a"),
            TokenConcept(delta_b, positions=[4], strength=2.0, batch_rows=[2], name="b")]


def _naive(vec, concepts, block, text_len, trailing, eligible, lin):
    """Every token's own modulation input, then the layer per token."""
    batch = vec.shape[0]
    per_token = vec[:, None, :].repeat(1, text_len + trailing, 1)
    for b in range(batch):
        if b not in eligible:
            continue
        for c in concepts:
            if c.batch_rows is not None and b not in c.batch_rows:
                continue
            for p in c.positions:
                per_token[b, p] = vec[b] + c.strength * c.delta[block]
    return lin(per_token)


def test_rows_to_tokens_matches_a_per_token_reference_with_gradients():
    torch.manual_seed(0)
    batch, text_len, trailing, dim, blocks = 3, 6, 5, 8, 4
    lin = torch.nn.Linear(dim, 3 * dim)
    vec = torch.randn(batch, dim)
    deltas = [torch.randn(blocks, dim, requires_grad=True) for _ in range(2)]
    eligible = [0, 2]
    for block, tail in ((1, 0), (3, trailing)):
        plan = build_plan(_concepts(*deltas), batch_size=batch, text_len=text_len, eligible_rows=eligible)
        got = rows_to_tokens(lin(modulation_rows(vec, plan, block)), plan, tail)
        reference_deltas = [d.detach().clone().requires_grad_(True) for d in deltas]
        want = _naive(vec, _concepts(*reference_deltas), block, text_len, tail, eligible, lin)
        assert got.shape == (batch, text_len + tail, 3 * dim)
        torch.testing.assert_close(got, want)
        weights = torch.randn_like(got)
        grads = torch.autograd.grad((got * weights).sum(), deltas)
        want_grads = torch.autograd.grad((want * weights).sum(), reference_deltas)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w)
            assert g[block].abs().sum() > 0 and g[[i for i in range(blocks) if i != block]].abs().sum() == 0


def test_plan_reuses_its_flat_index_and_refuses_a_row_count_it_did_not_plan():
    plan = build_plan([TokenConcept(torch.randn(2, 4), positions=[0], name="a")], batch_size=2, text_len=3)
    first = plan.flat_index(torch.device("cpu"), 2)
    assert plan.flat_index(torch.device("cpu"), 2) is first  # built once per forward, used by every block
    assert first.tolist() == [1, 0, 0, 0, 0, 3, 2, 2, 2, 2]  # batch element b starts at row b·(1 + K)
    with pytest.raises(ModAdapterError, match="Expected 2 modulation rows"):
        rows_to_tokens(torch.randn(2, 3, 4), plan)
