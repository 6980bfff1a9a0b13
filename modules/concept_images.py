"""Checks and mask handling for concept reference images (ComfyUI IMAGE/MASK layout, pure torch).

IMAGE tensors are (B, H, W, C) floats in 0..1; MASK tensors (B, H, W) in 0..1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import ModAdapterError


def check_image_batch(image, what: str = "concept image") -> torch.Tensor:
    """Refuse what the image encoder cannot use, with a message that says what to do."""
    if not isinstance(image, torch.Tensor):
        raise ModAdapterError(f"The {what} must be an IMAGE tensor, got {type(image).__name__}")
    if image.ndim != 4:
        raise ModAdapterError(f"The {what} must be an IMAGE batch (batch, height, width, channels), got shape {tuple(image.shape)}")
    batch, height, width, channels = image.shape
    if batch == 0 or height == 0 or width == 0:
        raise ModAdapterError(f"The {what} is empty (shape {tuple(image.shape)}): connect a loaded image")
    if channels not in (1, 3, 4):
        raise ModAdapterError(f"The {what} has {channels} channels; expected RGB (3) or RGBA (4)")
    if not image.is_floating_point() or not bool(torch.isfinite(image).all()):
        raise ModAdapterError(f"The {what} contains NaN or infinite values: re-load or re-generate it")
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    return image[..., :3].clamp(0, 1)


def fit_mask_to_images(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A (R, H, W) mask for R images of size H×W: a single mask is shared, other sizes are resized."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise ModAdapterError(f"The concept mask must be a MASK (batch, height, width), got shape {tuple(mask.shape)}")
    if not bool(torch.isfinite(mask).all()):
        raise ModAdapterError("The concept mask contains NaN or infinite values")
    references, height, width = images.shape[:3]
    if mask.shape[0] not in (1, references):
        raise ModAdapterError(f"The mask batch has {mask.shape[0]} masks for {references} reference images: "
                              f"give one mask for all, or one per image")
    mask = mask.float().clamp(0, 1)
    if tuple(mask.shape[1:]) != (height, width):
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return mask.expand(references, -1, -1)


def vit_grid_size(num_tokens: int) -> int:
    """The patch grid of a ViT whose output has one CLS token plus grid² patch tokens."""
    grid = math.isqrt(max(num_tokens - 1, 0))
    if grid * grid != num_tokens - 1 or grid == 0:
        raise ModAdapterError(f"The image encoder gave {num_tokens} tokens, which is not a CLS token plus a square "
                              f"patch grid; masks need a CLIP ViT image encoder")
    return grid


def preview_with_mask(seen: torch.Tensor, seen_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """What the encoder saw, (R, S, S, 3) in 0..1; areas outside the mask are dimmed."""
    if seen_mask is None:
        return seen
    return seen * (0.25 + 0.75 * seen_mask[..., None])
