"""Tiny random FLUX.1 models of the real architectures, for CPU tests.

The same random weights can be built in diffusers layout and in ComfyUI (BFL)
layout, so both hosts can be compared on one model.
"""

from __future__ import annotations

import torch

# A FLUX.1 transformer at toy size: 2 double + 4 single blocks, width 128.
DIFFUSERS_TINY_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # = 16 latent channels × 2×2 patch, as in FLUX.1
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)


def tiny_diffusers_flux(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**DIFFUSERS_TINY_CONFIG, **overrides}).eval()
    # diffusers zero-initialises nothing in FLUX, but the final projection and
    # gates of a real model are far from zero: re-draw every weight so that
    # every path (including the text stream of the last block) matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05 if p.ndim > 1 else 0.02)
    return model


def diffusers_inputs(model, batch: int = 2, text_len: int = 7, height: int = 4, width: int = 4, seed: int = 1):
    """Inputs of one FluxTransformer2DModel forward (already packed 2×2 latents)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    img_len = height * width
    img_ids = torch.zeros(img_len, 3)
    img_ids[:, 1] = torch.arange(height).repeat_interleave(width)
    img_ids[:, 2] = torch.arange(width).repeat(height)
    return dict(
        hidden_states=torch.randn(batch, img_len, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


# The same architecture inside ComfyUI, built as ComfyUI's own loader would
# build it (its FLUX model config, as in nodes/comfy_flux_config.py): 2 double + 4 single blocks, width 256.
COMFY_TINY_SIZES = dict(vec_in_dim=768, context_in_dim=4096, hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=2,
                        depth_single_blocks=4, axes_dim=[16, 56, 56])
COMFY_TINY_BLOCKS = 6
COMFY_TINY_WIDTH = 256


# diffusers' FLUX converter hard-codes width 3072 and MLP ratio 4: the smallest
# model it converts has the real width and one block of each kind (~0.5B parameters).
COMFY_REAL_WIDTH_SIZES = dict(COMFY_TINY_SIZES, hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1)


def tiny_comfy_flux(seed: int = 0, sizes: dict = COMFY_TINY_SIZES):
    """A ComfyUI ModelPatcher around a small random FLUX.1 (ComfyUI must be importable)."""
    import comfy.model_patcher

    from tiny_comfy import comfy_flux_model, flux_unet_config

    model = comfy_flux_model(flux_unet_config(**sizes))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # comfy's ops leave weights uninitialised
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.05 if p.ndim > 1 else 0.02))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_conditioning(seed: int, text_len: int = 256):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, text_len, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]]


def comfy_sample(model_patcher, positive, negative=None, cfg: float = 1.0, steps: int = 2, size: int = 16, seed: int = 0,
                 callback=None):
    """Sample through ComfyUI's own sampler (euler/simple) from fixed noise."""
    import comfy.sample

    latent = torch.zeros(1, 16, size, size)
    noise = torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model_patcher, noise, steps, cfg, "euler", "simple", positive, negative or [],
                               latent, seed=seed, callback=callback, disable_pbar=True)
