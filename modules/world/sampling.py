"""Sampling the world's FLUX.1 through diffusers, with concepts, as ComfyUI's KSampler samples it.

FluxPipeline runs classifier-free guidance as two transformer calls (the
prompt, then the empty prompt); a concept must modulate only the prompt's
call, as in ComfyUI, where the Mod-Adapter patch acts on the positive
conditioning only. This sampler makes the two calls itself with the pack's
diffusers host: the same noise (``torch.randn`` of the unpacked latent from
the seed, as ComfyUI's ``prepare_noise`` and FluxPipeline draw it), FLUX.1
[schnell]'s linear σ schedule, Euler steps. Without concepts it equals
FluxPipeline (tested), and with them the ComfyUI path (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import torch

from ..diffusers_flux_host import DiffusersFluxConcepts
from ..flux_diffusers import flux_velocity, vae_decode
from ..token_modulation import TokenConcept

LATENT_CHANNELS = 16


def sigmas(steps: int) -> torch.Tensor:
    """1, 1 − 1/steps, …, 1/steps, 0: FluxPipeline's schedule with shift 1, and ComfyUI's "simple" for FLUX.1
    [schnell] when ``steps`` divides 10000 (ComfyUI picks σ from a grid of 10000 values)."""
    return torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)])


def initial_noise(seed: int, resolution: int = 64) -> torch.Tensor:
    size = resolution // 8
    return torch.randn(1, LATENT_CHANNELS, size, size, generator=torch.Generator().manual_seed(seed))


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, σ per row) -> v


@torch.no_grad()
def euler_cfg(latents: torch.Tensor, steps: int, cfg: float, cond: Velocity, uncond: Velocity,
              progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Euler steps on :func:`sigmas` with classifier-free guidance: v = v_uncond + cfg · (v_cond − v_uncond)."""
    schedule = sigmas(steps)
    for i in range(steps):
        sigma = torch.full((latents.shape[0],), float(schedule[i]), device=latents.device)
        v_cond, v_uncond = cond(latents, sigma), uncond(latents, sigma)
        latents = latents + (float(schedule[i + 1]) - float(schedule[i])) * (v_uncond + cfg * (v_cond - v_uncond)).float()
        if progress is not None:
            progress(i + 1)
    return latents


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], max_sequence_length: int):
    embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=list(prompts),
                                           max_sequence_length=max_sequence_length)
    return embeds, pooled


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, cfg: float = 4.0,
             concepts: Optional[Sequence[Sequence[TokenConcept]]] = None, max_sequence_length: int = 48,
             resolution: int = 64, host: Optional[DiffusersFluxConcepts] = None,
             progress=None) -> torch.Tensor:
    """Images (B, 3, H, W) in 0..1, one per prompt and seed; ``concepts[i]`` modulate prompt i's tokens.

    ``host``: an installed :class:`DiffusersFluxConcepts` on ``pipe.transformer`` (one is installed for the
    call when None and concepts are given). ``progress``: called with the number of steps done.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    concepts = list(concepts) if concepts is not None else [[] for _ in prompts]
    if len(concepts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(concepts)} concept lists")
    embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length)
    empty_embeds, empty_pooled = encode_prompts(pipe, [""], max_sequence_length)
    latents = torch.cat([initial_noise(seed, resolution) for seed in seeds])
    count = latents.shape[0]
    rows: List[TokenConcept] = [dataclasses.replace(c, batch_rows=[row])
                                for row, row_concepts in enumerate(concepts) for c in row_concepts]
    own_host = host is None and bool(rows)
    if own_host:
        host = DiffusersFluxConcepts(pipe.transformer)

    def cond(x, sigma):
        if host is None:
            return flux_velocity(pipe.transformer, x, sigma, embeds, pooled, None)
        with host.using(rows):
            return flux_velocity(pipe.transformer, x, sigma, embeds, pooled, None)

    def uncond(x, sigma):  # the empty prompt: outside any concept scope
        return flux_velocity(pipe.transformer, x, sigma, empty_embeds.expand(count, -1, -1),
                             empty_pooled.expand(count, -1), None)

    try:
        latents = euler_cfg(latents, steps, cfg, cond, uncond, progress)
    finally:
        if own_host:
            host.remove()
    return ((vae_decode(pipe.vae, latents) + 1.0) / 2.0).clamp(0.0, 1.0)
