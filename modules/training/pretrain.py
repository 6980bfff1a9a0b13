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

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ..adapter import ModAdapter
from ..dtypes import resolve_dtype
from ..errors import ModAdapterError
from ..router import assign_experts, fit_kmeans
from .features import (
    TextFeatureCache,
    distinct_words,
    neutral_features,
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
from .stages import (
    build_adapter,
    compute_neutral_table,
    load_concept_sample,
    load_image_encoder,
    load_router,
    load_text_side,
    predict_deltas,
    resolve_adapter_config,
)

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
    clip_model, clip_tokenizer, vector_in = load_text_side(flux, components, clip_l, device, resolve_dtype(dtype))
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
    if not settings.router and config.needs_fitted_router:
        raise ModAdapterError(f"--router is required: the adapter has {config.num_experts} experts (fit the router "
                              f"with `mod-adapter fit-router`)")
    if settings.resume:
        precheck_resume(settings.resume, PretrainTask.stage, loop, len(records),
                        dataset_fingerprint(records, FINGERPRINT_FIELDS), {"config": config.to_dict()})

    ctx = setup_distributed(settings.device)
    try:
        text_dtype = resolve_dtype(settings.text_dtype)
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
