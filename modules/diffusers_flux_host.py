"""diffusers host of the per-token modulation engine (FluxTransformer2DModel).

Used by training and standalone generation. The math is the shared one in
token_modulation.py; this file only adapts it to diffusers' module layout:
- `transformer_blocks[i].norm1_context` (AdaLayerNormZero of the text stream)
  and `single_transformer_blocks[j].norm` (AdaLayerNormZeroSingle over
  cat(text, image)) are replaced by wrappers that run the layer's own
  `linear(silu(·))` on the distinct rows and normalise each token with its row;
- a forward pre-hook on the transformer records the text length, batch size
  and timestep of each call.

diffusers' blocks read the gates as `gate.unsqueeze(1)` and the MLP shift and
scale as `x[:, None]` (one row per sample). The wrappers hand back
:class:`TokenwiseModulation` objects that answer exactly those two forms with
the per-token (B, L, D) tensor and refuse any other use, so a change in
diffusers' block code fails loudly instead of silently dropping the concepts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from .errors import ModAdapterError
from .flux_layout import FluxLayout
from .token_modulation import (
    ModulationPlan,
    TokenConcept,
    build_plan,
    modulation_rows,
    rows_to_tokens,
)


class TokenwiseModulation:
    """A per-token modulation tensor (B, L, D) in the place of a per-sample (B, D) one."""

    __slots__ = ("per_token",)

    def __init__(self, per_token: torch.Tensor):
        self.per_token = per_token

    def unsqueeze(self, dim: int) -> torch.Tensor:
        if dim == 1:
            return self.per_token
        raise self._unsupported(f"unsqueeze({dim})")

    def __getitem__(self, index) -> torch.Tensor:
        if index == (slice(None), None):
            return self.per_token
        raise self._unsupported(f"[{index!r}]")

    def __getattr__(self, name: str):
        raise self._unsupported(f".{name}")

    @staticmethod
    def _unsupported(use: str) -> ModAdapterError:
        return ModAdapterError(
            f"This diffusers version uses a FLUX modulation output as `{use}`, which Mod-Adapter's diffusers host does "
            f"not know. Install a diffusers version the pack supports (see requirements) or report it."
        )


class _DiffusersHostState:
    def __init__(self) -> None:
        self.concepts: Sequence[TokenConcept] = ()  # what the next forward applies (DiffusersFluxConcepts.using)
        self._forward_concepts: Sequence[TokenConcept] = ()
        self.batch_size = 0
        self.text_len = 0
        self.sigma: Optional[float] = None
        self._plan: Optional[ModulationPlan] = None
        self._planned = False

    def begin_forward(self, batch_size: int, text_len: int, sigma: Optional[float]) -> None:
        # The forward's concepts and plan are kept after it returns: gradient checkpointing runs the blocks again
        # during backward, maybe after the `using` scope, and must see the same plan.
        self.batch_size, self.text_len, self.sigma = batch_size, text_len, sigma
        self._forward_concepts = self.concepts
        self._plan, self._planned = None, False

    def plan(self, device: torch.device) -> Optional[ModulationPlan]:
        if not self._planned:
            self._plan = build_plan(self._forward_concepts, batch_size=self.batch_size, text_len=self.text_len,
                                    sigma=self.sigma, device=device)
            self._planned = True
        return self._plan


class _ConceptNormWrapper(torch.nn.Module):
    """Stands in for an AdaLayerNormZero(-Single); keeps its children's names."""

    def __init__(self, original: torch.nn.Module, state: _DiffusersHostState, block_index: int, single_stream: bool):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a child: state-dict names stay `norm1_context.linear.weight`
        for name, child in original.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "state", state)
        self.block_index = block_index
        self.single_stream = single_stream

    def forward(self, x: torch.Tensor, *args, emb: Optional[torch.Tensor] = None, **kwargs):
        plan = self.state.plan(x.device) if emb is not None and emb.ndim == 2 and not args and not kwargs else None
        if plan is None:
            return self.original(x, *args, emb=emb, **kwargs)
        per_row = self.original.linear(self.original.silu(modulation_rows(emb, plan, self.block_index)))
        per_token = rows_to_tokens(per_row, plan, trailing_len=x.shape[1] - plan.text_len)
        if self.single_stream:
            shift, scale, gate = per_token.chunk(3, dim=-1)
            return self.original.norm(x) * (1 + scale) + shift, TokenwiseModulation(gate)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = per_token.chunk(6, dim=-1)
        normed = self.original.norm(x) * (1 + scale_msa) + shift_msa
        return (normed, TokenwiseModulation(gate_msa), TokenwiseModulation(shift_mlp),
                TokenwiseModulation(scale_mlp), TokenwiseModulation(gate_mlp))


class DiffusersFluxConcepts:
    """Per-token concept modulation installed on a diffusers FLUX.1 transformer.

    Usage::

        with DiffusersFluxConcepts(transformer) as host:
            with host.using([TokenConcept(delta, positions=[3], strength=1.0)]):
                out = transformer(hidden_states=..., encoder_hidden_states=..., ...)
            plain = transformer(...)  # outside `using`, the stock forward

    Each forward may use its own concepts (training gives each sample its own
    concept via `TokenConcept.batch_rows`); the concepts of a forward are
    passed in its scope and cannot leak into the next. Leaving the outer block
    or `remove()` puts the original modules back.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.layout = FluxLayout.from_diffusers(transformer)
        self.num_double_blocks, self.num_single_blocks = self.layout.num_double_blocks, self.layout.num_single_blocks
        self.width = self.layout.hidden_size
        self.transformer = transformer
        self.state = _DiffusersHostState()
        self._installed = []
        for i, block in enumerate(transformer.transformer_blocks):
            self._install(block, "norm1_context", i, single_stream=False)
        for j, block in enumerate(transformer.single_transformer_blocks):
            self._install(block, "norm", self.num_double_blocks + j, single_stream=True)
        self._hook = transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + self.num_single_blocks

    def _install(self, block, attr: str, block_index: int, single_stream: bool) -> None:
        original = getattr(block, attr)
        setattr(block, attr, _ConceptNormWrapper(original, self.state, block_index, single_stream))
        self._installed.append((block, attr, original))

    def _before_forward(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        if hidden is None or text is None:
            raise ModAdapterError("Mod-Adapter's diffusers host needs hidden_states and encoder_hidden_states")
        sigma = float(timestep.max()) if isinstance(timestep, torch.Tensor) and timestep.numel() else None
        self.state.begin_forward(hidden.shape[0], text.shape[1], sigma)
        return None

    @contextlib.contextmanager
    def using(self, concepts: Sequence[TokenConcept]) -> Iterator["DiffusersFluxConcepts"]:
        """The transformer's forwards inside the block apply ``concepts``; after it, none.

        A forward plans its concepts when it starts (the pre-hook), and the plan stays until the next forward:
        gradient checkpointing's recompute during a backward after the block sees the concepts it was run with.
        """
        for c in concepts:
            self.layout.check_delta(c.delta.shape, c.name)
        outer = self.state.concepts
        self.state.concepts = tuple(concepts)
        try:
            yield self
        finally:
            self.state.concepts = outer

    def remove(self) -> None:
        for block, attr, original in reversed(self._installed):
            setattr(block, attr, original)
        self._installed.clear()
        self._hook.remove()

    def __enter__(self) -> "DiffusersFluxConcepts":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
