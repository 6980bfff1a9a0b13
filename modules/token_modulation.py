"""Per-token modulation: the math both hosts (ComfyUI, diffusers) share.

FLUX.1 feeds one vector `vec` (B, D) to the modulation layer of every block.
Mod-Adapter gives the text tokens of a concept word `vec + s·Δ_i` in block i
instead. A prompt with C active concepts therefore has at most 1 + C distinct
modulation inputs per batch element: the base row `vec` and one row per
concept. We run the block's own modulation layer (`lin(silu(·))`) on those
rows only and then give every token the output of its row, so the cost does
not grow with the number of tokens.

A :class:`ModulationPlan` says, for one forward pass, which row each text
token uses. Hosts build one per forward (the text length, batch layout and
timestep are only known then) and call :func:`modulation_rows` before and
:func:`rows_to_tokens` after the block's modulation layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ModAdapterError


@dataclass
class TokenConcept:
    """One concept as the engine applies it.

    delta: (num_blocks, modulation_dim), rows in block order (double-stream
        blocks first, then single-stream blocks). May require grad (training).
    positions: indices of the concept word's tokens in the prompt's text
        sequence as the text encoder produced it (before any tokens that other
        patches prepend).
    strength: s in `vec + s·Δ_i`.
    sigma_start, sigma_end: the concept is active while
        sigma_end <= sigma <= sigma_start (sigma falls during sampling, so
        sigma_start is the earlier, larger value).
    batch_rows: which batch elements carry this concept's prompt; None means
        every row the host marks as eligible (ComfyUI: the positive prompt).
    """

    delta: torch.Tensor
    positions: Sequence[int]
    strength: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = -math.inf
    batch_rows: Optional[Sequence[int]] = None
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.delta, torch.Tensor) or self.delta.ndim != 2:
            raise ModAdapterError(
                f"Concept {self.name!r}: Δ must be a 2-D tensor (num_blocks, modulation_dim), "
                f"got {getattr(self.delta, 'shape', type(self.delta).__name__)}"
            )
        if len(self.positions) == 0:
            raise ModAdapterError(f"Concept {self.name!r} has no token positions: its word was not found in the prompt")
        if any(int(p) < 0 for p in self.positions):
            raise ModAdapterError(f"Concept {self.name!r} has negative token positions {list(self.positions)}")
        if not math.isfinite(float(self.strength)):
            raise ModAdapterError(f"Concept {self.name!r}: strength must be a finite number, got {self.strength!r}")

    def is_active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


@dataclass
class ModulationPlan:
    """Which modulation row each text token uses in one forward pass.

    row_index: (B, L_txt) long; 0 = the base row `vec`, k = concept k.
    deltas: (K, num_blocks, D), already multiplied by the concepts' strengths.
    """

    row_index: torch.Tensor
    deltas: torch.Tensor
    concept_names: List[str] = field(default_factory=list)
    # (device, trailing_len) -> flat row index; built once per forward, used by every block.
    _flat_index: Dict[Tuple[torch.device, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def flat_index(self, device: torch.device, trailing_len: int = 0) -> torch.Tensor:
        """(B·(L_txt + trailing_len),) indices into the rows flattened to (B·(1 + K), F).

        Token t of batch element b reads row ``b·(1 + K) + row_index[b, t]``;
        trailing (image) tokens read the base row ``b·(1 + K)``.
        """
        key = (torch.device(device), int(trailing_len))
        index = self._flat_index.get(key)
        if index is None:
            batch = self.row_index.shape[0]
            rows = self.row_index.to(device)
            if trailing_len:
                rows = torch.cat([rows, rows.new_zeros(batch, trailing_len)], dim=1)
            starts = torch.arange(batch, device=rows.device)[:, None] * self.num_rows
            index = self._flat_index[key] = (rows + starts).reshape(-1)
        return index

    @property
    def num_rows(self) -> int:
        return 1 + self.deltas.shape[0]

    @property
    def text_len(self) -> int:
        return self.row_index.shape[1]


def build_plan(
    concepts: Sequence[TokenConcept],
    *,
    batch_size: int,
    text_len: int,
    text_offset: int = 0,
    eligible_rows: Optional[Sequence[int]] = None,
    sigma: Optional[float] = None,
    device: Optional[torch.device] = None,
) -> Optional[ModulationPlan]:
    """Plan one forward pass; None when no concept applies to any token.

    text_offset: tokens other patches put in front of the prompt's text, so a
        concept position p sits at p + text_offset in the sequence the blocks see.
    eligible_rows: batch elements that may receive concepts (e.g. the positive
        prompt's rows); None means all.
    sigma: the current noise level; None applies every concept regardless of
        its schedule (training, tests).
    """
    eligible = set(range(batch_size)) if eligible_rows is None else {int(b) for b in eligible_rows}
    active = [c for c in concepts if sigma is None or c.is_active(sigma)]
    if not active or not eligible:
        return None

    row_index = torch.zeros((batch_size, text_len), dtype=torch.long)
    used: List[TokenConcept] = []
    for concept in active:
        rows = eligible if concept.batch_rows is None else eligible.intersection(int(b) for b in concept.batch_rows)
        if not rows:
            continue
        positions = torch.as_tensor([int(p) + text_offset for p in concept.positions], dtype=torch.long)
        if int(positions.max()) >= text_len:
            raise ModAdapterError(
                f"Concept {concept.name!r} sits at text positions {list(concept.positions)} but the model received only "
                f"{text_len - text_offset} prompt tokens. The conditioning given to the sampler is not the prompt the "
                f"concept was located in: connect the CONDITIONING output of the node that applied the concepts."
            )
        used.append(concept)
        row_ids = torch.as_tensor(sorted(rows), dtype=torch.long)
        row_index[row_ids[:, None], positions[None, :]] = len(used)
    if not used:
        return None

    deltas = torch.stack([c.delta * c.strength for c in used])
    if device is not None:
        # Once per forward, so that the blocks do not copy Δ to the device 57 times.
        row_index = row_index.to(device)
        deltas = deltas.to(device)
    return ModulationPlan(row_index=row_index, deltas=deltas, concept_names=[c.name for c in used])


def modulation_rows(vec: torch.Tensor, plan: ModulationPlan, block_index: int) -> torch.Tensor:
    """The distinct modulation inputs of block `block_index`: (B, 1 + K, D).

    Row 0 is `vec` itself, row k is `vec + s_k·Δ_k[block_index]`.
    """
    if vec.ndim != 2:
        raise ModAdapterError(f"Expected the shared modulation vector as (batch, dim), got shape {tuple(vec.shape)}")
    deltas = plan.deltas[:, block_index].to(device=vec.device, dtype=vec.dtype)  # (K, D)
    offsets = torch.cat([deltas.new_zeros(1, deltas.shape[-1]), deltas])  # (1 + K, D)
    return vec[:, None, :] + offsets[None]


def rows_to_tokens(per_row: torch.Tensor, plan: ModulationPlan, trailing_len: int = 0) -> torch.Tensor:
    """Give each token the output of its row.

    per_row: (B, 1 + K, F), the modulation layer's output for the rows.
    trailing_len: tokens after the text (the image tokens of a single-stream
        block); they use the base row.
    Returns (B, L_txt + trailing_len, F).

    One ``index_select`` over the flattened rows writes the whole result in a
    single allocation: much faster than ``gather`` with an index expanded to
    every feature, and no ``cat`` copy for the image tokens.
    """
    batch, rows, features = per_row.shape
    if rows != plan.num_rows:
        raise ModAdapterError(f"Expected {plan.num_rows} modulation rows per batch element, got {rows}")
    index = plan.flat_index(per_row.device, trailing_len)
    spread = per_row.reshape(batch * rows, features).index_select(0, index)
    return spread.view(batch, plan.text_len + trailing_len, features)
