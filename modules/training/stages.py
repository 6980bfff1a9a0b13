"""What the training stages share: dtypes, concept images, Δ prediction, adapter and router building, the
frozen encoders.

Pre-training (:mod:`.pretrain`) and FLUX training (:mod:`.flux`) predict Δ the
same way: concept image → image encoder tokens (masked) → adapter with the
word's neutral feature. Model loading is in separate functions, so that the
manifest is checked before any of them runs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..adapter import ModAdapter
from ..config import ModAdapterConfig
from ..errors import ConfigError, ModAdapterError
from .features import (
    distinct_words,
    load_clip_text_encoder,
    load_router_file,
    load_vector_in,
    neutral_features,
    router_checkpoint_info,
)
from .manifest import ManifestRecord

# --------------------------------------------------------------------------
# Adapter configuration
# --------------------------------------------------------------------------


def resolve_adapter_config(preset: Optional[str], config_path: Optional[str]) -> ModAdapterConfig:
    """The adapter config: a preset, optionally overridden by a JSON file.

    The JSON file holds a full config (as ``mod-adapter info --preset paper --json``
    prints under ``config``) or only the keys to change on the preset
    (``paper`` when no preset is named).
    """
    base = ModAdapterConfig.preset(preset or "paper").to_dict()
    if config_path:
        try:
            with open(config_path, "r", encoding="utf-8") as handle:
                overrides = json.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read the adapter config '{config_path}' ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise ConfigError(f"the adapter config '{config_path}' is not valid JSON ({exc})") from None
        if isinstance(overrides, dict) and isinstance(overrides.get("config"), dict):
            overrides = overrides["config"]  # `mod-adapter info --json` output
        if not isinstance(overrides, dict):
            raise ConfigError(f"the adapter config '{config_path}' must be a JSON object")
        base.update(overrides)
    return ModAdapterConfig.from_dict(base)


def build_adapter(config: ModAdapterConfig, centroids: Optional[torch.Tensor], seed: int) -> ModAdapter:
    """A freshly initialised adapter (the same on every rank for a seed) with the router installed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = ModAdapter(config)
    if centroids is not None:
        adapter.set_router_centroids(centroids)
    elif config.needs_fitted_router:
        raise ModAdapterError(f"the adapter has {config.num_experts} experts but no router was given: fit one with "
                              f"`mod-adapter fit-router` and pass --router")
    return adapter


def check_router(centroids: torch.Tensor, config: ModAdapterConfig, path: str) -> None:
    expected = (config.num_experts, config.modulation_dim)
    if tuple(centroids.shape) != expected:
        raise ModAdapterError(
            f"router file '{path}' holds {tuple(centroids.shape)} centroids but the adapter needs {expected} "
            f"(num_experts, modulation_dim); refit with `mod-adapter fit-router --experts {config.num_experts}` "
            f"on the same FLUX model"
        )


def load_router(path: Optional[str], config: ModAdapterConfig) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
    """(centroids or None, the checkpoint's ``router`` entry) from ``--router``, checked against ``config``."""
    if not path:
        return None, {"num_centroids": config.num_experts, "fitted": False, "seed": None, "num_words": 0}
    centroids, info = load_router_file(path)
    check_router(centroids, config, path)
    return centroids, router_checkpoint_info(info)


# --------------------------------------------------------------------------
# Concept images -> image tokens
# --------------------------------------------------------------------------


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image as a float tensor in 0..1: (H, W, C) for RGB, (H, W) for L."""
    import numpy as np

    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).float() / 255.0


def load_concept_sample(record: ManifestRecord) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(image (H, W, 3) in 0..1, mask (H, W) in 0..1 or None) of a record's concept image."""
    image = pil_to_tensor(record.open_image("concept_image"))
    mask = record.open_mask()
    return image, (pil_to_tensor(mask) if mask is not None else None)


def encode_concept_images(encoder, images: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]]):
    """Image tokens (n, T, D) and key mask (n, T) for images of any sizes.

    Images of one size (and mask presence) are encoded together; each goes
    through the encoder's own preprocessing (as ComfyUI's CLIP vision does).
    """
    groups: Dict[Tuple, List[int]] = {}
    for index, (image, mask) in enumerate(zip(images, masks)):
        groups.setdefault((tuple(image.shape), mask is not None), []).append(index)
    tokens: List[Optional[torch.Tensor]] = [None] * len(images)
    keys: List[Optional[torch.Tensor]] = [None] * len(images)
    for (_, has_mask), indices in groups.items():
        batch = torch.stack([images[i] for i in indices])
        mask_batch = torch.stack([masks[i] for i in indices]) if has_mask else None
        group_tokens, group_keys = encoder.encode_with_mask(batch, mask_batch)
        for j, i in enumerate(indices):
            tokens[i], keys[i] = group_tokens[j], group_keys[j]
    return torch.stack(tokens), torch.stack(keys)


def predict_deltas(model, encoder, neutral_table: Dict[str, torch.Tensor], images: Sequence[torch.Tensor],
                   masks: Sequence[Optional[torch.Tensor]], words: Sequence[str], device: torch.device):
    """(Δ (B, N, D), neutral features (B, D)) of concept images and their words.

    The frozen image encoder runs outside autocast (float32 tokens, as at
    inference); ``model`` is the adapter, possibly DDP-wrapped.
    """
    with torch.autocast(device.type, enabled=False):
        tokens, key_mask = encode_concept_images(encoder, images, masks)
    neutral = torch.stack([neutral_table[w] for w in words]).to(device)
    # The records were validated when the manifest was read, the tokens come from the frozen encoder:
    # no per-step host synchronisations.
    return model(neutral, tokens.to(device), key_mask.to(device), check_values=False), neutral


# --------------------------------------------------------------------------
# Model loading (separate functions: the manifest is checked before any of them runs)
# --------------------------------------------------------------------------


def load_image_encoder(name: str, weights: str, device, *, config_file: Optional[str] = None, dtype: torch.dtype = torch.float32):
    from .image_encoder import OpenClipImageEncoder

    if config_file:
        import open_clip

        if not os.path.isfile(config_file):
            raise ModAdapterError(f"--image-encoder-config '{config_file}' does not exist")
        open_clip.add_model_config(config_file)
    return OpenClipImageEncoder.load(name, weights, device=device, dtype=dtype)


def load_text_side(flux: str, components: Optional[str], clip_l: Optional[str], device, dtype: torch.dtype):
    """(CLIP text model, CLIP tokenizer, vector_in) for neutral features and targets."""
    clip_source = clip_l or components or flux
    if os.path.isfile(clip_source):
        raise ModAdapterError(
            f"--flux '{flux}' is a single transformer file: give --clip-l (a CLIP-L text encoder folder) or "
            f"--components (a diffusers FLUX folder) for the CLIP-L text encoder"
        )
    clip_model, clip_tokenizer = load_clip_text_encoder(clip_source, device=device, dtype=dtype)
    vector_in = load_vector_in(flux, device=device, dtype=dtype)
    return clip_model, clip_tokenizer, vector_in


def compute_neutral_table(words: Sequence[str], clip_model, clip_tokenizer, vector_in) -> Dict[str, torch.Tensor]:
    words = distinct_words(words)
    values = neutral_features(words, clip_model, clip_tokenizer, vector_in).cpu()
    return dict(zip(words, values))
