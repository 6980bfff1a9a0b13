"""The toy world's FLUX.1: a diffusers ``FluxTransformer2DModel`` and a T5 encoder, trained together by flow matching.

Conditioned exactly as FLUX.1 is: the T5 encoder's tokens (the real T5
tokenizer, padded to :data:`MAX_SEQUENCE_LENGTH`) are the context, the world
CLIP's pooled text embedding goes to ``vector_in``, latents are the world
VAE's (FLUX.1's 16 channels, 2×2-packed into 16 tokens of a 64×64 image).
There is no guidance embedding (like FLUX.1 [schnell]): the model is trained
with 10% empty captions and sampled with classifier-free guidance
(``true_cfg_scale`` in diffusers, ``cfg`` in ComfyUI's KSampler).

The T5 encoder learns with the transformer (its gradient comes through the
context); the VAE and CLIP are trained before and frozen. The VAE latents of
the training scenes are computed once and cached beside the run.
Training uses the pack's resumable loop: ``mod-adapter world train-flux``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import ModAdapterError
from ..flow_matching import flow_matching_pair
from ..flux_diffusers import flux_velocity, vae_decode, vae_encode
from ..safetensors_io import load_safetensors_checked, save_safetensors
from .checkpoint_file import load_world_checkpoint, save_world_checkpoint
from ..training.loop import DistributedContext, sample_generator
from .captions import caption, full_caption, random_modes
from .clip import tokenize as clip_tokenize
from .model_task import WorldModelTask
from .sampling import euler_cfg
from .scene import Scene
from .split import EVAL, TRAIN, random_scene, scenes as draw_scenes
from .streams import Stream, world_rng
from .vae import pixels_of

FLUX_FORMAT = "mod-adapter-world-flux"
MAX_SEQUENCE_LENGTH = 48  # the longest world caption is 38 T5 tokens
LATENT_SIZE = 8  # 64 px / 8
EMPTY_CAPTION_RATE = 0.1

# FLUX.1's transformer with head dimension 64 (RoPE axes 8 + 28 + 28), 2 heads, 3 double and 6 single blocks.
TRANSFORMER_CONFIG: Dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=3, num_single_layers=6, attention_head_dim=64,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
    axes_dims_rope=[8, 28, 28],
)
# T5 v1.1's architecture (gated GELU, relative attention) at a small width.
T5_CONFIG: Dict[str, Any] = dict(
    vocab_size=32128, d_model=64, d_kv=16, d_ff=256, num_layers=3, num_heads=4, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
_CONFIGS = {"transformer_config": TRANSFORMER_CONFIG, "t5_config": T5_CONFIG}


class WorldFlux(nn.Module):
    """What flow matching trains: the transformer and the T5 encoder."""

    def __init__(self):
        super().__init__()
        from diffusers import FluxTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        self.transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
        self.t5 = T5EncoderModel(T5Config(**T5_CONFIG))

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, t5_ids: torch.Tensor, pooled: torch.Tensor):
        """v for unpacked latents (B, 16, 8, 8) at σ (B,): FLUX's velocity call on the world's T5 context."""
        context = self.t5(input_ids=t5_ids).last_hidden_state
        return flux_velocity(self.transformer, latents, sigma, context, pooled, guidance=None)


def load_t5_tokenizer(folder: str):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(folder)


def t5_tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """As FluxPipeline tokenizes for T5: padded to MAX_SEQUENCE_LENGTH, never truncated silently."""
    ids = tokenizer(list(captions), padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=False,
                    return_tensors="pt").input_ids
    if ids.shape[1] != MAX_SEQUENCE_LENGTH:
        raise ModAdapterError(f"a caption is longer than {MAX_SEQUENCE_LENGTH} T5 tokens: {max(captions, key=len)!r}")
    return ids


def flux_scene_of(seed: int, index: int) -> Scene:
    return random_scene(world_rng(Stream.FLUX_SCENES, seed, index), TRAIN)


@torch.no_grad()
def cached_latents(vae, seed: int, count: int, path: str, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """FLUX-normalised VAE latents (count, 16, 8, 8) of the training scenes, computed once and kept at ``path``."""
    from tqdm.auto import tqdm

    if os.path.isfile(path):
        tensors, metadata = load_safetensors_checked(path, kind="latent cache", error_cls=ModAdapterError)
        if metadata.get("seed") == str(seed) and tensors["latents"].shape[0] == count:
            return tensors["latents"]
    chunks = []
    for start in tqdm(range(0, count, batch_size), desc="encoding training scenes", disable=not progress):
        scenes = [flux_scene_of(seed, i) for i in range(start, min(count, start + batch_size))]
        chunks.append(vae_encode(vae, pixels_of(scenes)).to(torch.float16))
    latents = torch.cat(chunks)
    save_safetensors(path, {"latents": latents}, {"seed": str(seed)})
    return latents


class FrozenConditioning:
    """The frozen parts: the world CLIP's pooled text embedding and the VAE decoder (for validation)."""

    def __init__(self, clip_text, clip_tokenizer, vae, device: torch.device):
        self.clip_text = clip_text.to(device).eval().requires_grad_(False)
        self.clip_tokenizer = clip_tokenizer
        self.vae = vae.eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def pooled(self, captions: Sequence[str]) -> torch.Tensor:
        ids = clip_tokenize(self.clip_tokenizer, list(captions)).to(self.device)
        return self.clip_text(input_ids=ids).pooler_output


@torch.no_grad()
def sample_latents(flux: WorldFlux, conditioning: FrozenConditioning, t5_tokenizer, captions: Sequence[str],
                   seed: int, steps: int = 20, cfg: float = 4.0) -> torch.Tensor:
    """Euler sampling on FLUX's linear σ schedule (1 → 0) with classifier-free guidance against the empty caption,
    as :mod:`.sampling` samples the exported world (one noise draw for the batch, from ``seed``)."""
    device = conditioning.device
    count = len(captions)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 16, LATENT_SIZE, LATENT_SIZE, generator=generator).to(device)
    ids = t5_tokenize(t5_tokenizer, list(captions) + [""]).to(device)
    pooled = conditioning.pooled(list(captions) + [""])
    return euler_cfg(x, steps, cfg, lambda z, sigma: flux.velocity(z, sigma, ids[:count], pooled[:count]),
                     lambda z, sigma: flux.velocity(z, sigma, ids[count:].expand(count, -1),
                                                    pooled[count:].expand(count, -1)))


class FluxWorldTask(WorldModelTask):
    name = "flux"

    def __init__(self, flux: WorldFlux, conditioning: FrozenConditioning, t5_tokenizer, latents: torch.Tensor, *,
                 seed: int, device: torch.device, judge=None, validation_count: int = 32):
        super().__init__(flux, seed=seed, dataset_size=int(latents.shape[0]), device=device)
        self.conditioning = conditioning
        self.t5_tokenizer = t5_tokenizer
        self.latents = latents
        self.judge = judge
        self.validation_count = validation_count

    def load_items(self, items: List[Tuple[int, int]], step: int) -> Any:
        captions, sigmas, noises = [], [], []
        for slot, index in items:
            rng = world_rng(Stream.FLUX_CAPTIONS, self.seed, index, step)  # a new caption each time a scene comes back
            scene = flux_scene_of(self.seed, index)
            text = "" if rng.random() < EMPTY_CAPTION_RATE else caption(scene, random_modes(rng), rng)
            captions.append(text)
            generator = sample_generator(self.seed, step, slot)
            sigmas.append(torch.sigmoid(torch.randn((), generator=generator)))  # logit-normal σ (SD3, FLUX)
            noises.append(torch.randn(16, LATENT_SIZE, LATENT_SIZE, generator=generator))
        latents = self.latents[[index for _, index in items]].float()
        return latents, torch.stack(sigmas), torch.stack(noises), t5_tokenize(self.t5_tokenizer, captions), captions

    def per_sample_losses(self, model: torch.nn.Module, prepared: Any, step: int) -> torch.Tensor:
        latents, sigma, noise, ids, captions = prepared
        latents, sigma, noise = latents.to(self.device), sigma.to(self.device), noise.to(self.device)
        noisy, target = flow_matching_pair(latents, noise, sigma)
        velocity = model.velocity(noisy, sigma, ids.to(self.device), self.conditioning.pooled(captions))
        return (velocity.float() - target).square().mean(dim=(1, 2, 3))

    def write_validation_images(self, step: int, out_dir: str, ctx: DistributedContext) -> None:
        """Held-out scenes from their full captions: a PNG grid and, with a judge, per-attribute accuracy."""
        scenes = list(draw_scenes(1000, self.validation_count, EVAL))
        images = generate_images(self.model, self.conditioning, self.t5_tokenizer, [full_caption(s) for s in scenes],
                                 seed=1000)
        from PIL import Image

        grid = images.mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        rows = [np.concatenate(list(grid[i:i + 8]), axis=1) for i in range(0, len(grid), 8)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(out_dir, f"validation-{step:08d}.png"))
        if self.judge is not None:
            accuracy = attribute_accuracy(self.judge, images, scenes)
            with open(os.path.join(out_dir, "validation.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **accuracy}) + "\n")
            ctx.log(f"step {step}: held-out prompt following " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))

    def run_settings(self) -> Dict[str, Any]:
        return {**{name: json.dumps(config, sort_keys=True) for name, config in _CONFIGS.items()},
                "max_sequence_length": MAX_SEQUENCE_LENGTH}

    def save_model(self, path: str, model: torch.nn.Module, summary: Dict[str, Any]) -> None:
        save_world_flux(path, model, summary)

    def load_model(self, path: str) -> torch.nn.Module:
        return load_world_flux(path)


@torch.no_grad()
def generate_images(flux: WorldFlux, conditioning: FrozenConditioning, t5_tokenizer, captions: Sequence[str], *,
                    seed: int, steps: int = 20, cfg: float = 4.0) -> torch.Tensor:
    """Images (B, 3, 64, 64) in 0..1."""
    latents = sample_latents(flux, conditioning, t5_tokenizer, captions, seed, steps, cfg)
    return ((vae_decode(conditioning.vae, latents.cpu()) + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def attribute_accuracy(judge, images: torch.Tensor, scenes: Sequence[Scene]) -> Dict[str, float]:
    """Per attribute: the share of images in which the judge reads the scene's value."""
    reads = judge.read(images)
    return {name: sum(r[name] == getattr(s, name) for r, s in zip(reads, scenes)) / len(scenes) for name in reads[0]}


def save_world_flux(path: str, flux: WorldFlux, summary: Dict[str, Any]) -> None:
    save_world_checkpoint(path, flux, FLUX_FORMAT, _CONFIGS, summary)


def load_world_flux(path: str) -> WorldFlux:
    tensors, _ = load_world_checkpoint(path, FLUX_FORMAT, "world FLUX", _CONFIGS)
    flux = WorldFlux()
    flux.load_state_dict(tensors, strict=True)
    return flux.eval()
