"""Main training of the Mod-Adapter: FLUX.1's flow-matching loss through the predicted Δ.

Per sample (one concept per sample, paper §training): the adapter predicts Δ
from the concept word's neutral feature and the concept image; the caption's
T5 tokens of the concept word get ``vec + Δ_i`` in block i through
:class:`.diffusers_flux_host.DiffusersFluxConcepts` (``TokenConcept.batch_rows
= [b]``, so each sample of a batch carries its own concept); the target image
is VAE-encoded to x0, noised along the rectified-flow path

    x_σ = (1 − σ)·x0 + σ·ε,      target velocity v = ε − x0,

and the loss is ``mean((v_θ(x_σ, σ) − v)²)`` per sample. FLUX (transformer,
VAE, T5, CLIP-L, vector_in) is frozen; only the adapter trains. σ is drawn
per sample from a logit-normal (default) or uniform distribution, optionally
shifted (``σ' = sσ / (1 + (s−1)σ)``), and ε from the sample's own generator
(:func:`.loop.sample_generator`), so any split over processes gives the
same draws.

Precision: FLUX is held in ``--flux-dtype`` (bfloat16 on CUDA by default,
float32 on the CPU); the adapter's master weights are float32 and run under
bf16 autocast on CUDA (``--mixed-precision``). The transformer uses gradient
checkpointing (Δ still receives its gradient: the host keeps the plan for the
recomputation).

Text embeddings are computed on the fly by the pipeline's own ``encode_prompt``
and cached per distinct caption (``--text-cache-size``); image tokens and VAE
latents are computed on the fly (cache-free).

Validation (``--validate-every K``): for fixed records and fixed seeds, the
adapter's Δ is applied and a few Euler steps of the flow ODE are run as
FluxPipeline does (its scheduler, its resolution-dependent shift), then the
VAE decodes and PNGs are written under ``OUT/validation/step-<step>/``; the
same seeds without any Δ are written once to ``OUT/validation/reference/``.

Several GPUs: DDP on the adapter (:mod:`.loop`). When FLUX does not fit
once per GPU, ``--flux-sharding fsdp`` shards the frozen transformer's weights
over the processes with PyTorch FSDP2 (``fully_shard`` per block): each block's
weights are gathered for its forward (and for the backward through it) and
freed after. FLUX is frozen, so no gradient is reduced for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..adapter import ModAdapter
from ..checkpoint import load_adapter_checkpoint
from ..concept_file import word_file_stem
from ..diffusers_flux_host import DiffusersFluxConcepts
from ..dtypes import resolve_dtype
from ..errors import ModAdapterError
from ..flux_diffusers import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_TRAINING_GUIDANCE,
    fit_image,
    flux_velocity,
    load_flux_pipeline,
    load_t5_tokenizer,
    resolve_flux_source,
    vae_decode,
    vae_encode,
)
from ..flow_matching import flow_matching_pair
from ..flux_layout import FluxLayout
from ..token_modulation import TokenConcept
from ..token_positions import TextSequenceLayout, find_concept_positions
from .features import LruTextCache, read_flux_transformer_config, vector_in_of
from .loop import (
    DistributedContext,
    LoopConfig,
    TrainingResult,
    TrainingTask,
    dataset_fingerprint,
    precheck_resume,
    run_training,
    sample_generator,
    setup_distributed,
)
from .manifest import ManifestError, ManifestRecord, read_manifest
from .stages import (
    build_adapter,
    compute_neutral_table,
    load_concept_sample,
    load_image_encoder,
    load_router,
    pil_to_tensor,
    predict_deltas,
    resolve_adapter_config,
)

TIMESTEP_SAMPLING = ("logit_normal", "uniform")


@dataclass
class FluxTrainSettings:
    manifest: str
    out: str
    flux: str
    image_encoder: str
    image_encoder_weights: str
    init: Optional[str] = None  # pre-training checkpoint (the paper's recipe)
    router: Optional[str] = None  # with preset/config: train from scratch (the "no pre-training" ablation)
    preset: Optional[str] = None
    config: Optional[str] = None
    components: Optional[str] = None
    image_encoder_config: Optional[str] = None
    device: str = "auto"
    flux_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    resolution: int = 512
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    guidance: float = DEFAULT_TRAINING_GUIDANCE
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 1.0
    gradient_checkpointing: bool = True
    flux_sharding: str = "none"  # none | fsdp
    text_cache_size: int = 1024
    base_model: str = "flux1-dev"
    validation_manifest: Optional[str] = None
    validation_samples: int = 4
    validation_steps: int = 20
    validation_resolution: Optional[int] = None
    validation_seed: int = 0
    resume: Optional[str] = None

    def validate(self) -> None:
        problems = []
        if self.init and (self.router or self.preset or self.config):
            problems.append("--init takes the adapter (config and router) from the pre-training checkpoint; "
                            "drop --router/--preset/--config, or drop --init to start from scratch")
        if not isinstance(self.resolution, int) or self.resolution < 16 or self.resolution % 16:
            problems.append(f"--resolution must be a multiple of 16, got {self.resolution!r}")
        if self.validation_resolution is not None and (self.validation_resolution < 16 or self.validation_resolution % 16):
            problems.append(f"--validation-resolution must be a multiple of 16, got {self.validation_resolution!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            problems.append(f"--timestep-sampling must be one of {list(TIMESTEP_SAMPLING)}, got {self.timestep_sampling!r}")
        if not self.timestep_shift > 0:
            problems.append(f"--timestep-shift must be positive, got {self.timestep_shift!r}")
        if self.max_sequence_length < 8:
            problems.append(f"--max-sequence-length must be at least 8, got {self.max_sequence_length!r}")
        if self.flux_sharding not in ("none", "fsdp"):
            problems.append(f"--flux-sharding must be none or fsdp, got {self.flux_sharding!r}")
        if self.validation_samples < 0 or self.validation_steps < 1:
            problems.append("--validation-samples must be >= 0 and --validation-steps >= 1")
        if problems:
            raise ModAdapterError("invalid training settings: " + "; ".join(problems))


# --------------------------------------------------------------------------
# Before any model: manifest and concept-word positions
# --------------------------------------------------------------------------


def concept_positions(records: Sequence[ManifestRecord], layout: TextSequenceLayout, source: str) -> List[List[int]]:
    """T5 positions of each record's concept word in its caption; every failing line is reported at once."""
    positions, problems = [], []
    for record in records:
        try:
            positions.append(find_concept_positions(layout, record.caption, [record.concept_word])[0])
        except ModAdapterError as exc:
            first_line = str(exc).splitlines()[0]
            problems.append(f"line {record.line}: {first_line}")
            positions.append([])
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise ManifestError(f"manifest {source}: the concept word cannot be located in the T5 tokens of the caption "
                            f"in {len(problems)} record(s):\n" + "\n".join(shown))
    return positions


def tokenizer_t5_layout(tokenizer, max_sequence_length: int) -> TextSequenceLayout:
    """FluxPipeline's T5 sequence: padded and truncated to ``max_sequence_length``."""
    return TextSequenceLayout.from_hf_tokenizer(tokenizer, "t5", min_length=max_sequence_length,
                                                max_length=max_sequence_length)


# --------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------


def sample_sigma(generator: torch.Generator, settings: FluxTrainSettings) -> float:
    """σ of one sample (always two draws, so the noise that follows is independent of the scheme)."""
    normal = torch.randn((), generator=generator, dtype=torch.float64)
    uniform = torch.rand((), generator=generator, dtype=torch.float64)
    if settings.timestep_sampling == "logit_normal":
        sigma = torch.sigmoid(normal * settings.logit_std + settings.logit_mean)
    else:
        sigma = uniform
    shift = settings.timestep_shift
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return float(sigma.clamp(1e-4, 1.0))


class TextEmbeddingCache:
    """(T5 prompt_embeds (L, 4096), CLIP pooled (768)) per caption, from the pipeline's encode_prompt; LRU on the CPU."""

    def __init__(self, pipe, device: torch.device, max_sequence_length: int, max_items: int = 1024):
        @torch.no_grad()
        def compute(captions: List[str]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
            embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=captions, device=device,
                                                   max_sequence_length=max_sequence_length)
            return [(embeds[i].cpu(), pooled[i].cpu()) for i in range(len(captions))]

        self._cache = LruTextCache(compute, max_items)

    def get(self, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        items = self._cache.get(captions)
        return torch.stack([e for e, _ in items]), torch.stack([p for _, p in items])


def load_target_pixels(record: ManifestRecord, resolution: int) -> torch.Tensor:
    """The target image as (3, R, R) pixels in [-1, 1] (short side resized, centre-cropped)."""
    image, _ = fit_image(record.open_image("target_image"), resolution)
    return pil_to_tensor(image).permute(2, 0, 1) * 2.0 - 1.0


# --------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------


FINGERPRINT_FIELDS = ("concept_image", "concept_word", "caption", "target_image", "mask")


class FluxTrainTask(TrainingTask):
    stage = "train"

    def __init__(self, records, positions, adapter: ModAdapter, encoder, pipe, host: DiffusersFluxConcepts,
                 neutral: Dict[str, torch.Tensor], texts: TextEmbeddingCache, settings: FluxTrainSettings,
                 seed: int, device: torch.device, metadata: Dict[str, Any], validation: Sequence[Tuple[ManifestRecord, List[int]]] = ()):
        self.records, self.positions = records, positions
        self.adapter, self.encoder, self.pipe, self.host = adapter, encoder, pipe, host
        self.neutral, self.texts, self.settings = neutral, texts, settings
        self.seed, self.device, self.metadata = seed, device, metadata
        self.validation_items = list(validation)
        self.validation_on_all_ranks = settings.flux_sharding == "fsdp"
        self.dataset_size = len(records)
        self.dataset_fingerprint = dataset_fingerprint(records, FINGERPRINT_FIELDS)
        self._reference_done = False

    # -- training ------------------------------------------------------------

    def load_items(self, items, step):
        concept = [load_concept_sample(self.records[index]) for _, index in items]
        return {
            "slots": [slot for slot, _ in items],
            "images": [c[0] for c in concept],
            "masks": [c[1] for c in concept],
            "targets": torch.stack([load_target_pixels(self.records[index], self.settings.resolution) for _, index in items]),
            "words": [self.records[index].concept_word.strip() for _, index in items],
            "captions": [self.records[index].caption for _, index in items],
            "positions": [self.positions[index] for _, index in items],
        }

    def per_sample_losses(self, model, prepared, step):
        device = self.device
        with torch.autocast(device.type, enabled=False):
            prompt_embeds, pooled = self.texts.get(prepared["captions"])
            x0 = torch.cat([vae_encode(self.pipe.vae, p[None]) for p in prepared["targets"]]).to(device)
        sigmas, noise = [], []
        for slot in prepared["slots"]:
            generator = sample_generator(self.seed, step, slot)
            sigmas.append(sample_sigma(generator, self.settings))
            noise.append(torch.randn(tuple(x0.shape[1:]), generator=generator))
        sigma = torch.tensor(sigmas, dtype=torch.float32, device=device)
        noise = torch.stack(noise).to(device)
        noisy, target = flow_matching_pair(x0, noise, sigma)

        delta, _ = predict_deltas(model, self.encoder, self.neutral, prepared["images"], prepared["masks"],
                                  prepared["words"], device)
        concepts = [TokenConcept(delta=delta[b], positions=prepared["positions"][b], batch_rows=[b],
                                 name=prepared["words"][b]) for b in range(delta.shape[0])]
        with self.host.using(concepts):
            prediction = flux_velocity(self.pipe.transformer, noisy, sigma, prompt_embeds.to(device),
                                       pooled.to(device), self.settings.guidance)
        return (prediction.float() - target).square().mean(dim=(1, 2, 3))

    # -- validation ----------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt_embeds, pooled, concepts: Sequence[TokenConcept], seed: int, resolution: int) -> torch.Tensor:
        """A FluxPipeline-style Euler sample of the flow ODE with ``concepts`` applied; image (3, H, W) in 0..1."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import (
            calculate_shift,
            retrieve_timesteps,
        )

        pipe, device = self.pipe, self.device
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        height = width = 2 * (resolution // (scale * 2))
        channels = pipe.transformer.config.in_channels // 4
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn((1, channels, height, width), generator=generator).to(device)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        steps = self.settings.validation_steps
        sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
        cfg = scheduler.config
        mu = calculate_shift((height // 2) * (width // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        with self.host.using(concepts):
            for t in timesteps:
                sigma = (t / 1000.0).expand(1).float()
                velocity = flux_velocity(pipe.transformer, latents, sigma, prompt_embeds, pooled, self.settings.guidance)
                latents = scheduler.step(velocity.float(), t, latents.float(), return_dict=False)[0]
        image = vae_decode(pipe.vae, latents)[0]
        return ((image + 1.0) / 2.0).clamp(0, 1).cpu()

    @torch.no_grad()
    def write_validation_images(self, step, out_dir, ctx: DistributedContext):
        if not self.validation_items:
            return
        resolution = self.settings.validation_resolution or self.settings.resolution
        folder = os.path.join(out_dir, "validation", f"step-{step:08d}")
        reference = os.path.join(out_dir, "validation", "reference")
        for i, (record, positions) in enumerate(self.validation_items):
            word = record.concept_word.strip()
            prompt_embeds, pooled = self.texts.get([record.caption])
            image, mask = load_concept_sample(record)
            delta = predict_deltas(self.adapter, self.encoder, self.neutral, [image], [mask], [word], self.device)[0][0].float()
            seed = self.settings.validation_seed + i
            image = self.sample(prompt_embeds, pooled, [TokenConcept(delta, positions, name=word)], seed, resolution)
            name = f"{i:02d}-{word_file_stem(word)}.png"
            if ctx.is_main:
                os.makedirs(folder, exist_ok=True)
                _save_png(image, os.path.join(folder, name))
            if not self._reference_done:
                plain = self.sample(prompt_embeds, pooled, [], seed, resolution)
                if ctx.is_main:
                    os.makedirs(reference, exist_ok=True)
                    _save_png(plain, os.path.join(reference, name))
        self._reference_done = True
        ctx.log(f"validation images of step {step} in {folder}")

    # -- metadata ------------------------------------------------------------

    def checkpoint_metadata(self):
        return {"base_model": self.metadata["base_model"], "image_encoder": self.metadata["image_encoder"],
                "router_info": self.metadata["router_info"],
                "training": {"dataset": {"manifest": self.metadata["manifest"]}, "init": self.metadata.get("init"),
                             "resolution": self.settings.resolution, "guidance": self.settings.guidance,
                             "timestep_sampling": self.settings.timestep_sampling,
                             "timestep_shift": self.settings.timestep_shift,
                             "max_sequence_length": self.settings.max_sequence_length}}

    def run_settings(self):
        return _run_settings(self.settings, self.adapter.config)


def _run_settings(s: FluxTrainSettings, config) -> Dict[str, Any]:
    """Settings that a resumed run must share with the interrupted one."""
    return {"resolution": s.resolution, "max_sequence_length": s.max_sequence_length, "guidance": s.guidance,
            "timestep_sampling": s.timestep_sampling, "timestep_shift": s.timestep_shift,
            "logit_mean": s.logit_mean, "logit_std": s.logit_std, "config": config.to_dict()}


def _save_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    array = (image.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------
# Loading and running
# --------------------------------------------------------------------------


def load_pipeline(settings: FluxTrainSettings, dtype: torch.dtype):
    """The FLUX pipeline (transformer, VAE, T5, CLIP-L, tokenizers, scheduler) from local files."""
    return load_flux_pipeline(resolve_flux_source(settings.flux, settings.components), dtype)


def shard_transformer(transformer: torch.nn.Module, ctx: DistributedContext) -> None:
    """Shard the frozen FLUX transformer's weights over the processes (FSDP2, one unit per block)."""
    if not ctx.distributed:
        return
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    import warnings

    # FSDP2 warns that the blocks return views, because an in-place op on a view would skip its
    # backward all-gather. Nothing here (nor in diffusers' Flux forward) changes them in place;
    # tests/test_training.py checks that sharded training gives the unsharded weights.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        fully_shard(block)
    fully_shard(transformer)


def run_train(settings: FluxTrainSettings, loop: LoopConfig) -> TrainingResult:
    settings.validate()
    loop.validate()
    # 1. Everything checkable without a model: manifest, concept positions, adapter vs FLUX sizes, router.
    records = read_manifest(settings.manifest)
    source = resolve_flux_source(settings.flux, settings.components)
    layout = tokenizer_t5_layout(load_t5_tokenizer(source), settings.max_sequence_length)
    positions = concept_positions(records, layout, settings.manifest)
    validation_records = records
    validation_positions = positions
    if settings.validation_manifest:
        validation_records = read_manifest(settings.validation_manifest)
        validation_positions = concept_positions(validation_records, layout, settings.validation_manifest)
    validation = list(zip(validation_records, validation_positions))[: settings.validation_samples]
    flux_config = read_flux_transformer_config(settings.flux, settings.components)
    if settings.init:
        from ..checkpoint import read_adapter_info

        info = read_adapter_info(settings.init)
        from ..config import ModAdapterConfig

        config = ModAdapterConfig.from_dict(info["config"])
        if not info["router"].get("fitted") and config.needs_fitted_router:
            raise ModAdapterError(f"--init {settings.init} has no fitted router; pre-train with --router")
    else:
        config = resolve_adapter_config(settings.preset, settings.config)
    FluxLayout.from_config(flux_config).check_adapter(config, f"({settings.init or 'config'})")
    centroids, router_info = load_router(settings.router, config)
    if not settings.router and not settings.init and config.needs_fitted_router:
        raise ModAdapterError("give --init (a pre-training checkpoint) or --router with --preset/--config")
    if settings.resume:
        precheck_resume(settings.resume, FluxTrainTask.stage, loop, len(records),
                        dataset_fingerprint(records, FINGERPRINT_FIELDS), _run_settings(settings, config))

    # 2. Models.
    ctx = setup_distributed(settings.device)
    try:
        device = ctx.device
        dtype = resolve_dtype(settings.flux_dtype, device)
        encoder = load_image_encoder(settings.image_encoder, settings.image_encoder_weights, device,
                                     config_file=settings.image_encoder_config)
        if settings.init:
            loaded = load_adapter_checkpoint(settings.init, dtype=torch.float32)
            adapter = loaded.adapter
            router_info = dict(loaded.metadata["router"])
            expected_encoder = loaded.metadata["image_encoder"].get("name")
            if expected_encoder and expected_encoder != encoder.name:
                ctx.log(f"warning: --init {settings.init} was pre-trained with the image encoder {expected_encoder!r}, "
                        f"this run uses {encoder.name!r}; train with the weights users will load in ComfyUI")
        else:
            adapter = build_adapter(config, centroids, loop.seed)
        if encoder.token_width != config.image_token_dim:
            raise ModAdapterError(f"the image encoder gives {encoder.token_width}-wide tokens, the adapter expects "
                                  f"{config.image_token_dim}")
        adapter = adapter.to(device=device, dtype=torch.float32).train().requires_grad_(True)

        pipe = load_pipeline(settings, dtype)
        for component in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            if component is not None:
                component.requires_grad_(False).to(device)
        pipe.vae.eval()
        for encoder_model in (pipe.text_encoder, pipe.text_encoder_2):
            encoder_model.eval()
        transformer = pipe.transformer
        # n = vector_in(CLIP-L pooled(word)) with this pipeline's own CLIP-L and vector_in (before any sharding).
        words = [r.concept_word for r in records] + [r.concept_word for r, _ in validation]
        neutral = compute_neutral_table(words, pipe.text_encoder, pipe.tokenizer, vector_in_of(transformer))
        host = DiffusersFluxConcepts(transformer)
        if settings.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()  # no dropout in FLUX; train mode only matters for checkpointing
        if settings.flux_sharding == "fsdp":
            shard_transformer(transformer, ctx)

        texts = TextEmbeddingCache(pipe, device, settings.max_sequence_length, settings.text_cache_size)
        metadata = {"base_model": settings.base_model, "image_encoder": encoder.metadata(), "router_info": router_info,
                    "manifest": os.path.abspath(settings.manifest),
                    "init": os.path.abspath(settings.init) if settings.init else None}
        task = FluxTrainTask(records, positions, adapter, encoder, pipe, host, neutral, texts, settings, loop.seed,
                             device, metadata, validation)
        ctx.log(f"training a {adapter.num_parameters():,}-parameter adapter on {len(records)} records with FLUX "
                f"({dtype}) on {ctx.world_size} process(es), {device}")
        try:
            return run_training(task, loop, settings.out, ctx, resume=settings.resume)
        finally:
            host.remove()
    finally:
        ctx.close()
