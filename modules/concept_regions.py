"""Regions: a concept restricted to part of the image through attention, its modulation unchanged.

A region is a mask over the generated image. In every block's joint attention the concept word's tokens
attend to the prompt and to the image tokens inside it only, and are attended by the image tokens inside it
only (and by themselves): the other text tokens, which attend to the whole image, would otherwise carry the
concept out of the region. One additive attention bias over the whole sequence (text tokens first, then image
tokens), -inf where a token may not read another, 0 elsewhere. A region over the whole image restricts nothing
(no bias at all). FLUX.1 in ComfyUI takes such a bias as its `attention_mask` and hands it to every
double and single block, so no block code is touched. Pure torch; the ComfyUI host builds the bias per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import ModAdapterError


def check_region_mask(mask: torch.Tensor, name: str = "") -> torch.Tensor:
    """A ComfyUI MASK, (H, W) or (1, H, W), values in [0, 1], as a float (H, W) tensor; one clear error otherwise."""
    if not isinstance(mask, torch.Tensor):
        raise ModAdapterError(f"Concept {name!r}: its region must be a MASK, got {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or 0 in mask.shape:
        raise ModAdapterError(f"Concept {name!r}: a region is one MASK of (height, width); got shape "
                              f"{tuple(mask.shape)}. Give one mask (not a batch) per Concept Region node.")
    mask = mask.detach().float().cpu()
    if not bool(torch.isfinite(mask).all()):
        raise ModAdapterError(f"Concept {name!r}: its region MASK contains NaN or infinite values")
    if not bool((mask > 0.5).any()):
        raise ModAdapterError(f"Concept {name!r}: its region MASK is empty (no value above 0.5), so the concept "
                              f"could act nowhere. Paint the region, or remove the Concept Region node.")
    return mask


def region_tokens(mask: torch.Tensor, height_tokens: int, width_tokens: int) -> torch.Tensor:
    """Which image tokens of a (height_tokens × width_tokens) grid lie inside the region, row by row (as FLUX
    orders its image tokens): (height_tokens · width_tokens,) bool; a token is inside when at least half of its
    area is (the mask is stretched over the image, as ComfyUI's own mask nodes do)."""
    area = F.interpolate(mask[None, None].float(), size=(height_tokens, width_tokens), mode="area")[0, 0]
    return (area >= 0.5).reshape(-1)


@dataclass(frozen=True)
class RegionalTokens:
    """One concept's region in one forward: its word's positions in the text, the batch rows that carry it, and
    which of the generated image's tokens are inside."""

    positions: Sequence[int]
    batch_rows: Sequence[int]
    inside: torch.Tensor  # (image tokens of the generated image,) bool


def region_attention_bias(regions: Sequence[RegionalTokens], batch: int, text_len: int, image_len: int,
                          dtype: torch.dtype = torch.float32, device=None) -> Optional[torch.Tensor]:
    """The additive attention bias (batch, text_len + image_len, text_len + image_len) that keeps each regional
    word and the image tokens outside its region from attending to each other, and the other text tokens from
    reading the word; None when no token is outside any region (a region over the whole image changes nothing).
    ``image_len`` may exceed the generated image's tokens (FLUX.1 Kontext's reference tokens come after them):
    those stay unmasked."""
    bias = None
    for region in regions:
        if not region.batch_rows:
            continue
        outside = torch.nonzero(~region.inside.to(torch.bool)).reshape(-1)
        if outside.numel() == 0:
            continue
        if region.inside.numel() > image_len:
            raise ModAdapterError(f"A region covers {region.inside.numel()} image tokens but this forward has only "
                                  f"{image_len}")
        if bias is None:
            bias = torch.zeros(batch, text_len + image_len, text_len + image_len, dtype=dtype, device=device)
        is_word = torch.zeros(text_len, dtype=torch.bool, device=bias.device)
        is_word[[int(p) for p in region.positions]] = True
        words, other_text = torch.nonzero(is_word).reshape(-1), torch.nonzero(~is_word).reshape(-1)
        image = outside.to(bias.device) + text_len
        # Whoever may not read the word: the image outside, and the other text tokens, which attend everywhere
        # and would carry the concept out of the region. The word itself still reads the whole prompt.
        readers = torch.cat([other_text, image])
        for row in region.batch_rows:
            bias[row, words[:, None], image[None, :]] = float("-inf")
            bias[row, readers[:, None], words[None, :]] = float("-inf")
    return bias


def combine_attention_masks(existing: Optional[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """Our bias added to an attention mask already on the conditioning (e.g. Redux's attn_bias): a boolean mask
    becomes its log (True 0, False -inf), as ComfyUI's StyleModelApply converts it."""
    if existing is None:
        return bias
    if existing.dtype == torch.bool:
        existing = torch.log(existing.to(bias.dtype))
    if existing.shape[-2:] != bias.shape[-2:]:
        raise ModAdapterError(f"This conditioning carries an attention mask over {tuple(existing.shape[-2:])} tokens, "
                              f"but the forward has {tuple(bias.shape[-2:])}: a region cannot be combined with it.")
    return existing.to(bias.device, bias.dtype) + bias
