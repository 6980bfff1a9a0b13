"""The Mod-Adapter network: (concept word, concept images) -> one Δ per DiT block.

Inputs (all computed outside the adapter):

* ``neutral`` (C, modulation_dim): the neutral feature ``n = vector_in(CLIP-L
  pooled(bare concept word))`` of each of C concepts.
* ``image_tokens`` (C, T, image_token_dim): the CLIP vision penultimate-layer
  tokens of each concept's reference image(s), padded to a common length T,
  with ``key_mask`` (C, T) bool (True = a real token the queries may attend to).

Output: Δ (C, num_blocks, modulation_dim) = F+ − n, row i for DiT block i
(double-stream blocks first, then single-stream blocks).

Architecture (paper, with our choices noted):

1. Queries: ``n`` is layer-normalised and a linear layer maps it to
   ``num_blocks`` queries of width ``hidden_dim``; fixed sinusoidal encodings
   of the block index are added so each query belongs to one block.
   (LayerNorm on n is our choice: vector_in outputs are large and unnormalised.)
2. Keys/values: image tokens are layer-normalised and projected to hidden_dim.
3. ``num_cross_attention_blocks`` pre-norm blocks: queries cross-attend to the
   image tokens (residual), then an MLP (residual). There is no self-attention
   among the queries: each block's query reads the image on its own, which
   keeps the blocks' directions independent and the network simple.
4. Mixture of experts, routed parameter-free: a concept goes to the expert of
   the k-means centroid (buffer ``router_centroids``) nearest to its raw
   neutral feature. Concepts are grouped by expert so each used expert runs
   once per forward. Each expert is an MLP hidden_dim -> expert_hidden_dim ->
   modulation_dim predicting a residual r, and F+ = n + r, so Δ = r.

Ablations (config ``router="linear"``, ``image_reading="pooled"``, ``num_experts=1``): a learned softmax
gate over all experts instead of the k-means routing; one mean image feature added to every query and
feed-forward blocks without attention instead of the cross-attention; a single expert.

Initialisation: the last linear layer of every expert is zero, so the initial
F+ equals n and the initial Δ is exactly 0 (the DiT starts unchanged). A zero
F+ instead would make the initial Δ = −n, which erases the word's modulation.

Several references and masks: the tokens of all R reference images of a
concept are concatenated into one key sequence (:func:`pack_image_tokens`).
Attention then averages over all references' tokens at once, softmax-weighted:
a reference contributes in proportion to how well its tokens match a query,
not a fixed 1/R share, so a reference showing the concept more clearly can
dominate. A spatial mask removes patch tokens outside the concept
(:func:`image_mask_to_token_mask`); the CLS token of each reference is always
kept, so a concept never has zero keys.

The centroids stay float32 whatever dtype the module is cast to, so routing is
the same for a float32 and a bfloat16 adapter.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModAdapterConfig
from .errors import ModAdapterError
from .router import assign_experts

ROUTER_BUFFER = "router_centroids"


# ---------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------


def pack_image_tokens(
    per_concept: Sequence[torch.Tensor],
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each concept's reference tokens and pad concepts to one length.

    per_concept: C tensors (R_c, T_c, D), the tokens of the R_c reference images
    of concept c. masks: None or C entries, each None (keep every token) or an
    (R_c, T_c) bool tensor (True = keep). Returns ``tokens`` (C, T_max, D) and
    ``key_mask`` (C, T_max) bool, where T_max = max_c R_c * T_c; padding is
    zero and masked out.
    """
    if len(per_concept) == 0:
        raise ModAdapterError("pack_image_tokens needs at least one concept")
    if masks is None:
        masks = [None] * len(per_concept)
    if len(masks) != len(per_concept):
        raise ModAdapterError(f"got {len(per_concept)} concepts but {len(masks)} masks; pass one mask (or None) per concept")
    width = None
    flat_tokens: List[torch.Tensor] = []
    flat_masks: List[torch.Tensor] = []
    for index, (tokens, mask) in enumerate(zip(per_concept, masks)):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ModAdapterError(
                f"concept {index}: image tokens must be a (references, tokens, width) tensor, got {shape}; "
                "for a single image add a leading dimension of 1"
            )
        refs, count, dim = tokens.shape
        if refs == 0 or count == 0:
            raise ModAdapterError(f"concept {index}: image tokens are empty (shape {tuple(tokens.shape)}); give at least one reference image")
        if width is None:
            width = dim
        elif dim != width:
            raise ModAdapterError(
                f"concept {index}: image tokens have width {dim} but concept 0 has width {width}; "
                "encode every reference with the same image encoder"
            )
        if mask is None:
            mask = torch.ones(refs, count, dtype=torch.bool, device=tokens.device)
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (refs, count):
                got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ModAdapterError(
                    f"concept {index}: token mask must be a bool tensor of shape {(refs, count)}, got {got}"
                )
            mask = mask.to(tokens.device)
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ModAdapterError(
                    f"concept {index}: the mask of reference(s) {empty} keeps no token; "
                    "keep at least the CLS token (image_mask_to_token_mask does)"
                )
        flat_tokens.append(tokens.reshape(refs * count, dim))
        flat_masks.append(mask.reshape(refs * count))
    length = max(t.shape[0] for t in flat_tokens)
    first = flat_tokens[0]
    packed = first.new_zeros(len(flat_tokens), length, width)
    key_mask = torch.zeros(len(flat_tokens), length, dtype=torch.bool, device=first.device)
    for index, (tokens, mask) in enumerate(zip(flat_tokens, flat_masks)):
        packed[index, : tokens.shape[0]] = tokens.to(device=first.device, dtype=first.dtype)
        key_mask[index, : mask.shape[0]] = mask.to(first.device)
    return packed, key_mask


def image_mask_to_token_mask(
    mask: torch.Tensor,
    *,
    grid_size: int = 16,
    cls_token: bool = True,
    threshold: float = 0.5,
    center_crop: bool = True,
) -> torch.Tensor:
    """Turn image-space masks into ViT token masks.

    mask: (R, H, W) (or (H, W)) values in 0..1, 1 = the concept. The mask is
    first centre-cropped to a square when ``center_crop`` (as CLIP
    preprocessing crops the image: ComfyUI's ``encode_image(crop=True)``), then
    each of the grid_size x grid_size patches keeps its token when the mask's
    area average over the patch is >= threshold. Returns (R, [1 +] grid_size²)
    bool with the CLS token first and always kept (e.g. 257 tokens for
    ViT-L/14 at 224 px). A reference whose mask keeps no patch is an error.
    """
    if not isinstance(mask, torch.Tensor):
        raise ModAdapterError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ModAdapterError(f"mask must have shape (references, height, width), got {tuple(mask.shape)}")
    if mask.shape[1] < grid_size or mask.shape[2] < grid_size:
        raise ModAdapterError(f"mask of size {tuple(mask.shape[1:])} is smaller than the {grid_size}x{grid_size} patch grid")
    values = mask.float()
    if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ModAdapterError("mask values must lie in 0..1 (1 = the concept)")
    if center_crop:
        height, width = values.shape[1:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        values = values[:, top : top + side, left : left + side]
    per_patch = F.adaptive_avg_pool2d(values.unsqueeze(1), (grid_size, grid_size)).flatten(1)
    keep = per_patch >= threshold
    empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ModAdapterError(
            f"the mask of reference(s) {empty} covers no {grid_size}x{grid_size}-grid patch to at least "
            f"{threshold:.0%}; enlarge the mask or drop the mask for that reference"
        )
    if cls_token:
        keep = torch.cat([torch.ones(keep.shape[0], 1, dtype=torch.bool, device=keep.device), keep], dim=1)
    return keep


def block_position_encoding(num_blocks: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sinusoidal encodings (num_blocks, dim) of the block index (Transformer style)."""
    positions = torch.arange(num_blocks, dtype=torch.float32, device=device).unsqueeze(1)
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / max(half, 1))
    angles = positions * frequencies
    encoding = torch.zeros(num_blocks, dim, dtype=torch.float32, device=device)
    encoding[:, 0 : 2 * half : 2] = torch.sin(angles)
    encoding[:, 1 : 2 * half : 2] = torch.cos(angles)
    return encoding.to(dtype)


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries attend to image tokens, then an MLP; both residual."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float, *, dtype=None, device=None, operations=nn):
        super().__init__()
        ops = dict(dtype=dtype, device=device)
        self.num_heads = num_heads
        self.norm_query = operations.LayerNorm(hidden_dim, **ops)
        self.norm_keys = operations.LayerNorm(hidden_dim, **ops)
        self.to_q = operations.Linear(hidden_dim, hidden_dim, **ops)
        self.to_k = operations.Linear(hidden_dim, hidden_dim, **ops)
        self.to_v = operations.Linear(hidden_dim, hidden_dim, **ops)
        self.to_out = operations.Linear(hidden_dim, hidden_dim, **ops)
        mlp_width = int(round(hidden_dim * mlp_ratio))
        self.norm_mlp = operations.LayerNorm(hidden_dim, **ops)
        self.mlp = nn.Sequential(operations.Linear(hidden_dim, mlp_width, **ops), nn.GELU(),
                                 operations.Linear(mlp_width, hidden_dim, **ops))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # queries (C, N, H), keys (C, T, H), attention_mask (C, 1, 1, T) bool (True = attend)
        c, n, h = queries.shape
        t = keys.shape[1]
        heads, head_dim = self.num_heads, h // self.num_heads
        q = self.to_q(self.norm_query(queries)).view(c, n, heads, head_dim).transpose(1, 2)
        kv = self.norm_keys(keys)
        k = self.to_k(kv).view(c, t, heads, head_dim).transpose(1, 2)
        v = self.to_v(kv).view(c, t, heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        queries = queries + self.to_out(attended.transpose(1, 2).reshape(c, n, h))
        return queries + self.mlp(self.norm_mlp(queries))


class FeedForwardBlock(nn.Module):
    """The MLP half of :class:`CrossAttentionBlock`, for the ablation that reads a pooled image feature instead."""

    def __init__(self, hidden_dim: int, mlp_ratio: float, *, dtype=None, device=None, operations=nn):
        super().__init__()
        mlp_width = int(round(hidden_dim * mlp_ratio))
        self.norm_mlp = operations.LayerNorm(hidden_dim, dtype=dtype, device=device)
        self.mlp = nn.Sequential(operations.Linear(hidden_dim, mlp_width, dtype=dtype, device=device), nn.GELU(),
                                 operations.Linear(mlp_width, hidden_dim, dtype=dtype, device=device))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return queries + self.mlp(self.norm_mlp(queries))


class ExpertMLP(nn.Module):
    """hidden_dim -> expert_hidden_dim -> modulation_dim; predicts the residual Δ = F+ − n."""

    def __init__(self, hidden_dim: int, expert_hidden_dim: int, modulation_dim: int, *, dtype=None, device=None,
                 operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(hidden_dim, expert_hidden_dim, dtype=dtype, device=device)
        self.fc2 = operations.Linear(expert_hidden_dim, modulation_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ModAdapter(nn.Module):
    """Predicts Δ (C, num_blocks, modulation_dim) for C concepts; see the module docstring.

    Built the way ComfyUI builds its own models: ``operations`` provides
    ``Linear`` and ``LayerNorm`` (``torch.nn`` by default; inside ComfyUI one of
    ``comfy.ops``, so that ComfyUI can cast the weights per forward, load the
    adapter partially in low VRAM and offload it after a prediction), created
    with ``dtype`` and ``device``.
    """

    def __init__(self, config: ModAdapterConfig, *, dtype=None, device=None, operations=nn):
        super().__init__()
        if not isinstance(config, ModAdapterConfig):
            raise ModAdapterError(f"ModAdapter needs a ModAdapterConfig, got {type(config).__name__}")
        self.config = config
        h = config.hidden_dim
        ops = dict(dtype=dtype, device=device)
        self.neutral_norm = operations.LayerNorm(config.modulation_dim, **ops)
        self.neutral_to_queries = operations.Linear(config.modulation_dim, config.num_blocks * h, **ops)
        self.image_norm = operations.LayerNorm(config.image_token_dim, **ops)
        self.image_proj = operations.Linear(config.image_token_dim, h, **ops)
        if config.image_reading == "cross_attention":
            self.blocks = nn.ModuleList(
                CrossAttentionBlock(h, config.num_heads, config.mlp_ratio, operations=operations, **ops)
                for _ in range(config.num_cross_attention_blocks)
            )
        else:  # ablation: the queries get one pooled image feature and never attend to the tokens
            self.blocks = nn.ModuleList(FeedForwardBlock(h, config.mlp_ratio, operations=operations, **ops)
                                        for _ in range(config.num_cross_attention_blocks))
        if config.router == "linear":  # ablation: a learned gate instead of the k-means centroids
            self.router_gate = operations.Linear(config.modulation_dim, config.num_experts, **ops)
        self.output_norm = operations.LayerNorm(h, **ops)
        self.experts = nn.ModuleList(
            ExpertMLP(h, config.expert_hidden_dim, config.modulation_dim, operations=operations, **ops)
            for _ in range(config.num_experts)
        )
        # Zero centroids until fitted (fit_kmeans): every concept then routes to expert 0.
        self.register_buffer(ROUTER_BUFFER, torch.zeros(config.num_experts, config.modulation_dim, dtype=torch.float32,
                                                        device=device))
        self.reset_expert_outputs()

    # -- initialisation / parameters ------------------------------------------------

    def reset_expert_outputs(self) -> None:
        """Zero the last layer of every expert, so Δ = 0 (F+ = n) until trained."""
        with torch.no_grad():
            for expert in self.experts:
                if expert.fc2.weight.device.type != "meta":
                    expert.fc2.weight.zero_()
                    expert.fc2.bias.zero_()

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (the router centroids are a buffer, not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def dtype(self) -> torch.dtype:
        return self.neutral_to_queries.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.neutral_to_queries.weight.device

    def _apply(self, fn, recurse=True):
        # Keep the router centroids float32 through .to(bfloat16)/.half(): routing
        # must not change with the weights' precision.
        original = self._buffers[ROUTER_BUFFER]
        result = super()._apply(fn, recurse)
        moved = self._buffers[ROUTER_BUFFER]
        if moved is not None and moved.dtype != torch.float32 and original is not None:
            self._buffers[ROUTER_BUFFER] = original.to(device=moved.device, dtype=torch.float32)
        return result

    # -- routing --------------------------------------------------------------------

    def set_router_centroids(self, centroids: torch.Tensor) -> None:
        """Install fitted k-means centroids (num_experts, modulation_dim)."""
        expected = (self.config.num_experts, self.config.modulation_dim)
        if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != expected:
            got = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
            raise ModAdapterError(f"router centroids must have shape {expected} (num_experts, modulation_dim), got {got}")
        if not torch.isfinite(centroids).all():
            raise ModAdapterError("router centroids contain NaN or Inf; refit the router")
        with torch.no_grad():
            self.router_centroids.copy_(centroids.to(self.router_centroids.device, torch.float32))

    def route(self, neutral: torch.Tensor) -> torch.Tensor:
        """Expert index (LongTensor (C,)) of each concept: nearest centroid of its neutral feature (with the
        linear router: the expert of largest gate weight)."""
        self._check_neutral(neutral)
        if self.config.router == "linear":
            return self.gate_weights(neutral).argmax(dim=-1)
        return self._nearest_experts(neutral)

    def gate_weights(self, neutral: torch.Tensor) -> torch.Tensor:
        """(C, num_experts) softmax weights of the learned linear router (ablation)."""
        normed = self.neutral_norm(neutral.to(device=self.device, dtype=self.dtype))
        return torch.softmax(self.router_gate(normed).float(), dim=-1)

    def _nearest_experts(self, neutral: torch.Tensor) -> torch.Tensor:
        if self.config.num_experts == 1:
            return torch.zeros(neutral.shape[0], dtype=torch.long, device=neutral.device)
        return assign_experts(neutral.float(), self.router_centroids.to(neutral.device))

    # -- forward ----------------------------------------------------------------------

    def _check_neutral(self, neutral: torch.Tensor, check_values: bool = True) -> None:
        cfg = self.config
        if not isinstance(neutral, torch.Tensor) or neutral.dim() != 2 or neutral.shape[1] != cfg.modulation_dim:
            got = tuple(neutral.shape) if isinstance(neutral, torch.Tensor) else type(neutral).__name__
            raise ModAdapterError(
                f"neutral features must have shape (concepts, {cfg.modulation_dim}) (FLUX vector_in of the "
                f"CLIP-L pooled concept word), got {got}"
            )
        if neutral.shape[0] == 0:
            raise ModAdapterError("no concepts given: neutral features have 0 rows")
        if not neutral.is_floating_point() or (check_values and not torch.isfinite(neutral).all()):
            raise ModAdapterError("neutral features contain NaN or Inf (or are not floating point); check the text encoder output")

    def _check_inputs(self, neutral, image_tokens, key_mask, experts, check_values: bool = True) -> None:
        """Types and shapes always (no host synchronisation); values (finite, a kept token per concept,
        experts in range) only with ``check_values``: each costs a device-to-host synchronisation."""
        cfg = self.config
        self._check_neutral(neutral, check_values)
        count = neutral.shape[0]
        if not isinstance(image_tokens, torch.Tensor) or image_tokens.dim() != 3:
            got = tuple(image_tokens.shape) if isinstance(image_tokens, torch.Tensor) else type(image_tokens).__name__
            raise ModAdapterError(
                f"image tokens must have shape (concepts, tokens, {cfg.image_token_dim}), got {got}; "
                "use pack_image_tokens to combine references"
            )
        if image_tokens.shape[2] != cfg.image_token_dim:
            raise ModAdapterError(
                f"image tokens have width {image_tokens.shape[2]} but this adapter expects {cfg.image_token_dim}; "
                "use the image encoder (CLIP vision model, penultimate layer) the adapter was trained with"
            )
        if image_tokens.shape[0] != count:
            raise ModAdapterError(f"got {count} neutral features but image tokens for {image_tokens.shape[0]} concepts")
        if image_tokens.shape[1] == 0:
            raise ModAdapterError("image tokens are empty: every concept needs at least one reference image")
        if not image_tokens.is_floating_point() or (check_values and not torch.isfinite(image_tokens).all()):
            raise ModAdapterError("image tokens contain NaN or Inf (or are not floating point); check the image encoder output")
        if key_mask is not None:
            if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != tuple(image_tokens.shape[:2]):
                got = (tuple(key_mask.shape), key_mask.dtype) if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
                raise ModAdapterError(f"key_mask must be a bool tensor of shape {tuple(image_tokens.shape[:2])}, got {got}")
            empty = (~key_mask.any(dim=1)).nonzero().flatten().tolist() if check_values else []
            if empty:
                raise ModAdapterError(f"key_mask keeps no image token for concept(s) {empty}; keep at least the CLS token")
        if experts is not None:
            if not isinstance(experts, torch.Tensor) or experts.dtype != torch.long or tuple(experts.shape) != (count,):
                raise ModAdapterError(f"experts must be a LongTensor of shape ({count},)")
            if check_values and experts.numel() and (experts.min() < 0 or experts.max() >= cfg.num_experts):
                raise ModAdapterError(f"expert indices must lie in 0..{cfg.num_experts - 1}, got {experts.tolist()}")

    def block_features(self, neutral: torch.Tensor, image_tokens: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-block features (C, num_blocks, hidden_dim) before the experts."""
        cfg = self.config
        dtype, device = self.dtype, self.device
        neutral = neutral.to(device=device, dtype=dtype)
        image_tokens = image_tokens.to(device=device, dtype=dtype)
        count = neutral.shape[0]
        queries = self.neutral_to_queries(self.neutral_norm(neutral)).view(count, cfg.num_blocks, cfg.hidden_dim)
        queries = queries + block_position_encoding(cfg.num_blocks, cfg.hidden_dim, device=device, dtype=dtype)
        keys = self.image_proj(self.image_norm(image_tokens))
        if key_mask is None:
            key_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=device)
        attention_mask = key_mask.to(device)[:, None, None, :]
        if cfg.image_reading == "pooled":  # ablation: the mean of the kept tokens, the same for every block
            kept = key_mask.to(device=device, dtype=dtype)[:, :, None]
            queries = queries + ((keys * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1))[:, None, :]
        for block in self.blocks:
            queries = block(queries, keys, attention_mask)
        return self.output_norm(queries)

    def forward(
        self,
        neutral: torch.Tensor,
        image_tokens: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
        experts: Optional[torch.Tensor] = None,
        *,
        check_values: bool = True,
    ) -> torch.Tensor:
        """Δ (C, num_blocks, modulation_dim) for C concepts.

        neutral (C, modulation_dim); image_tokens (C, T, image_token_dim);
        key_mask (C, T) bool, True = attend (None = all tokens); experts
        (C,) LongTensor to override routing (None = nearest centroid).
        check_values=False skips the checks that synchronise with the device
        (finite inputs, a kept token per concept): for callers whose inputs were
        validated where they entered (the nodes, training's data), so that the
        hot path runs without host synchronisations.
        """
        self._check_inputs(neutral, image_tokens, key_mask, experts, check_values)
        features = self.block_features(neutral, image_tokens, key_mask)
        if self.config.router == "linear" and experts is None:
            weights = self.gate_weights(neutral).to(features.dtype)  # every expert, softmax-weighted
            return sum(weights[:, e, None, None] * expert(features) for e, expert in enumerate(self.experts))
        if experts is None:
            experts = self._nearest_experts(neutral)  # the inputs were checked just above
        experts = experts.to(features.device)
        delta = features.new_zeros(features.shape[0], self.config.num_blocks, self.config.modulation_dim)
        # Group concepts by expert: each used expert runs once on all its concepts.
        for expert_index in torch.unique(experts).tolist():
            rows = (experts == expert_index).nonzero().flatten()
            delta = delta.index_put((rows,), self.experts[expert_index](features[rows]))
        return delta
