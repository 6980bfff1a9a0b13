"""Pre-training of the Mod-Adapter (no DiT), and the router fit.

Mod-Adapter paper (arXiv 2505.18612, §3): for a concept image with attribute caption p+ (written
by a VLM) the adapter's block features F+_i = Δ_i + n are regressed onto the
caption's pooled-text feature:

    L = (1/N) Σ_i || F+_i − M(CLIP(p+)) ||²

per sample (squared L2 norm over the modulation width, mean over the N
blocks), averaged over the batch. Only the adapter trains; the image encoder,
CLIP-L and vector_in are frozen and FLUX's transformer is never loaded (only
its vector_in tensors are read).

The router is fitted first (:func:`fit_router`): k-means over the neutral
features of every distinct training word, saved to a small safetensors file
that ``pretrain`` (and ``train`` without ``--init``) install into the adapter
and write into every checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..adapter import ModAdapter
from ..config import ModAdapterConfig
from ..errors import ConfigError, ModAdapterError
from ..router import assign_experts, fit_kmeans
from .features import (
    TextFeatureCache,
    distinct_words,
    load_clip_text_encoder,
    load_router_file,
    load_vector_in,
    neutral_features,
    router_checkpoint_info,
    save_router_file,
)
from .loop import (
    LoopConfig,
    TrainingResult,
    TrainingTask,
    dataset_fingerprint,
    precheck_resume,
    run_training,
    setup_distributed,
)
from .manifest import ManifestRecord, read_manifest

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ModAdapterError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


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
    elif config.num_experts > 1:
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
    return model(neutral, tokens.to(device), key_mask.to(device)), neutral


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


# --------------------------------------------------------------------------
# fit-router
# --------------------------------------------------------------------------


def fit_router(manifest: str, *, flux: str, out: str, experts: int = 12, seed: int = 0, components: Optional[str] = None,
               clip_l: Optional[str] = None, device: str = "cpu", dtype: str = "float32", base_model: str = "flux1-dev",
               iterations: int = 100) -> Dict[str, Any]:
    """Neutral features of every distinct training word -> k-means -> ``out``. Returns a summary."""
    records = read_manifest(manifest)  # ManifestError (every problem, by line) before any model is loaded
    words = distinct_words(r.concept_word for r in records)
    if len(words) < experts:
        raise ModAdapterError(f"the manifest has {len(words)} distinct concept word(s), fewer than --experts {experts}; "
                              f"use fewer experts or more words")
    clip_model, clip_tokenizer, vector_in = load_text_side(flux, components, clip_l, device, parse_dtype(dtype))
    features = neutral_features(words, clip_model, clip_tokenizer, vector_in)
    centroids = fit_kmeans(features, experts, seed=seed, iterations=iterations)
    save_router_file(out, centroids, seed=seed, words=words, base_model=base_model,
                     text_encoder=os.path.basename(os.path.normpath(clip_l or components or flux)))
    counts = torch.bincount(assign_experts(features.float().cpu(), centroids), minlength=experts)
    return {"words": len(words), "experts": experts, "width": int(centroids.shape[1]), "out": out,
            "words_per_expert": counts.tolist()}


# --------------------------------------------------------------------------
# Pre-training
# --------------------------------------------------------------------------


@dataclass
class PretrainSettings:
    manifest: str
    out: str
    flux: str
    image_encoder: str
    image_encoder_weights: str
    router: Optional[str] = None
    components: Optional[str] = None
    clip_l: Optional[str] = None
    image_encoder_config: Optional[str] = None
    preset: Optional[str] = None
    config: Optional[str] = None
    device: str = "auto"
    text_dtype: str = "float32"
    base_model: str = "flux1-dev"
    target_cache_size: int = 4096
    resume: Optional[str] = None


FINGERPRINT_FIELDS = ("concept_image", "concept_word", "caption", "mask", "attribute_caption")


class PretrainTask(TrainingTask):
    stage = "pretrain"

    def __init__(self, records: List[ManifestRecord], adapter: ModAdapter, encoder, neutral: Dict[str, torch.Tensor],
                 targets: TextFeatureCache, device: torch.device, metadata: Dict[str, Any]):
        self.records = records
        self.adapter = adapter
        self.encoder = encoder
        self.neutral = neutral
        self.targets = targets
        self.device = device
        self.metadata = metadata
        self.dataset_size = len(records)
        self.dataset_fingerprint = dataset_fingerprint(records, FINGERPRINT_FIELDS)

    def load_items(self, items, step):
        samples = [load_concept_sample(self.records[index]) for _, index in items]
        return {
            "images": [s[0] for s in samples],
            "masks": [s[1] for s in samples],
            "words": [self.records[index].concept_word.strip() for _, index in items],
            "attributes": [self.records[index].attribute_caption for _, index in items],
        }

    def per_sample_losses(self, model, prepared, step):
        with torch.autocast(self.device.type, enabled=False):
            target = self.targets.get(prepared["attributes"]).to(self.device)
        delta, neutral = predict_deltas(model, self.encoder, self.neutral, prepared["images"], prepared["masks"],
                                        prepared["words"], self.device)
        return pretrain_loss(delta, neutral, target)

    def checkpoint_metadata(self):
        return {"base_model": self.metadata["base_model"], "image_encoder": self.metadata["image_encoder"],
                "router_info": self.metadata["router_info"], "training": {"dataset": {"manifest": self.metadata["manifest"]}}}

    def run_settings(self):
        return {"config": self.adapter.config.to_dict()}


def pretrain_loss(delta: torch.Tensor, neutral: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample (1/N) Σ_i ||Δ_i + n − t||²: delta (B, N, D), neutral (B, D), target (B, D) -> (B,)."""
    f_plus = delta.float() + neutral.float()[:, None, :]
    return (f_plus - target.float()[:, None, :]).square().sum(dim=-1).mean(dim=-1)


def run_pretrain(settings: PretrainSettings, loop: LoopConfig) -> TrainingResult:
    loop.validate()
    config = resolve_adapter_config(settings.preset, settings.config)
    # Everything that can be checked without a model comes first.
    records = read_manifest(settings.manifest, require_attribute_caption=True)
    centroids, router_info = load_router(settings.router, config)
    if not settings.router and config.num_experts > 1:
        raise ModAdapterError(f"--router is required: the adapter has {config.num_experts} experts (fit the router "
                              f"with `mod-adapter fit-router`)")
    if settings.resume:
        precheck_resume(settings.resume, PretrainTask.stage, loop, len(records),
                        dataset_fingerprint(records, FINGERPRINT_FIELDS), {"config": config.to_dict()})

    ctx = setup_distributed(settings.device)
    try:
        text_dtype = parse_dtype(settings.text_dtype)
        encoder = load_image_encoder(settings.image_encoder, settings.image_encoder_weights, ctx.device,
                                     config_file=settings.image_encoder_config)
        if encoder.token_width != config.image_token_dim:
            raise ModAdapterError(
                f"the image encoder {encoder.name} gives {encoder.token_width}-wide tokens but the adapter config has "
                f"image_token_dim {config.image_token_dim}; pick the matching preset/config or encoder"
            )
        clip_model, clip_tokenizer, vector_in = load_text_side(settings.flux, settings.components, settings.clip_l,
                                                               ctx.device, text_dtype)
        if vector_in.linear_2.out_features != config.modulation_dim:
            raise ModAdapterError(
                f"FLUX's vector_in gives {vector_in.linear_2.out_features}-d features but the adapter config has "
                f"modulation_dim {config.modulation_dim}; use a config made for this FLUX model"
            )
        neutral = compute_neutral_table([r.concept_word for r in records], clip_model, clip_tokenizer, vector_in)
        targets = TextFeatureCache(clip_model, clip_tokenizer, vector_in, max_items=settings.target_cache_size)
        adapter = build_adapter(config, centroids, loop.seed).to(ctx.device)
        metadata = {"base_model": settings.base_model, "image_encoder": encoder.metadata(), "router_info": router_info,
                    "manifest": os.path.abspath(settings.manifest)}
        task = PretrainTask(records, adapter, encoder, neutral, targets, ctx.device, metadata)
        ctx.log(f"pre-training a {adapter.num_parameters():,}-parameter adapter on {len(records)} records "
                f"({len(neutral)} distinct words), {ctx.world_size} process(es) on {ctx.device}")
        return run_training(task, loop, settings.out, ctx, resume=settings.resume)
    finally:
        ctx.close()
