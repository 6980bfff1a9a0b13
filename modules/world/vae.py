"""The toy world's VAE: a diffusers ``AutoencoderKL`` with FLUX.1's latent shape (16 channels, 8× down), small.

It is trained on renders of the training split (L1 + L2 reconstruction and a
tiny KL term, on a sampled latent; the object's pixels weigh
:data:`OBJECT_WEIGHT` times more than the background's: the object is a
sixth of the image but holds the shape and surface, and a VAE trained
without the weight drew it blurred beyond recognition; an L1 term on the
pixel differences keeps its edges: without it, blurred corners made boxes and
stars read as balls) with the pack's resumable loop
(``mod-adapter world train --stage vae``). FLUX.1 normalises latents with
fixed constants (``shift_factor`` 0.1159, ``scaling_factor`` 0.3611, which
ComfyUI hard-codes in its Flux latent format), so the world must use them
too: a small penalty pulls each image's latent mean and spread to what those
constants expect (0.1159 and 1/0.3611), and :func:`match_flux_latent_scale`
then corrects the remaining spread exactly (a scale folded into the encoder's
last and the decoder's first convolution; a shift cannot be folded exactly
because the decoder's convolution pads with zeros).

The channel widths are multiples of 32 because ComfyUI's VAE code uses
GroupNorm with 32 groups everywhere.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..training.loop import sample_generator
from .checkpoint_file import load_world_checkpoint, save_world_checkpoint
from .judge import images_to_tensor
from .model_task import WorldModelTask
from .scene import Scene, object_mask, render
from .split import TRAIN, random_scene
from .streams import Stream, world_rng

VAE_FORMAT = "mod-adapter-world-vae"
IMAGE_SIZE = 64
# FLUX.1's latent constants (diffusers' AutoencoderKL config of FLUX.1, ComfyUI's latent_formats.Flux).
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159

VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=IMAGE_SIZE,
    scaling_factor=FLUX_SCALING_FACTOR,
    shift_factor=FLUX_SHIFT_FACTOR,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
KL_WEIGHT = 1e-6
OBJECT_WEIGHT = 8.0
EDGE_WEIGHT = 1.0
STATISTICS_WEIGHT = 0.01
TARGET_MEAN, TARGET_STD = FLUX_SHIFT_FACTOR, 1.0 / FLUX_SCALING_FACTOR


def build_vae(config: Dict[str, Any] = VAE_CONFIG):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def vae_scene_of(seed: int, index: int) -> Scene:
    """Scene ``index`` of the VAE's training set (training split only): the same on every machine and resume."""
    return random_scene(world_rng(Stream.VAE_SCENES, seed, index), TRAIN)


def pixels_of(scenes: Sequence[Scene]) -> torch.Tensor:
    """Renders as the VAE takes them: (B, 3, 64, 64) in [-1, 1]."""
    return images_to_tensor([render(s, IMAGE_SIZE) for s in scenes]) * 2.0 - 1.0


def _edge_error(recon: torch.Tensor, pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per sample: the weighted L1 distance of the horizontal and vertical pixel differences (sharp edges)."""
    dx = ((recon[..., :, 1:] - recon[..., :, :-1]) - (pixels[..., :, 1:] - pixels[..., :, :-1])).abs()
    dy = ((recon[..., 1:, :] - recon[..., :-1, :]) - (pixels[..., 1:, :] - pixels[..., :-1, :])).abs()
    return (weights[..., :, 1:] * dx).mean(dim=(1, 2, 3)) + (weights[..., 1:, :] * dy).mean(dim=(1, 2, 3))


class VaeTask(WorldModelTask):
    name = "vae"

    def load_items(self, items: List[Tuple[int, int]], step: int) -> Any:
        scenes = [vae_scene_of(self.seed, index) for _, index in items]
        weights = 1.0 + (OBJECT_WEIGHT - 1.0) * torch.from_numpy(np.stack([object_mask(s, IMAGE_SIZE) for s in scenes]))
        generator = sample_generator(self.seed, step, items[0][0] if items else 0)
        return pixels_of(scenes), weights[:, None], generator

    def per_sample_losses(self, model: torch.nn.Module, prepared: Any, step: int) -> torch.Tensor:
        pixels, weights, generator = prepared
        pixels, weights = pixels.to(self.device), weights.to(self.device)
        posterior = model.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        z = posterior.mean + posterior.std * noise
        recon = model.decode(z).sample
        error = recon - pixels
        means = posterior.mean.flatten(1)
        statistics = (means.mean(dim=1) - TARGET_MEAN).square() + (means.std(dim=1) - TARGET_STD).square()
        reconstruction = ((weights * error.abs()).mean(dim=(1, 2, 3)) + (weights * error.square()).mean(dim=(1, 2, 3))
                          + EDGE_WEIGHT * _edge_error(recon, pixels, weights))
        return (reconstruction / weights.mean(dim=(1, 2, 3)) + KL_WEIGHT * posterior.kl()
                + STATISTICS_WEIGHT * statistics)

    def run_settings(self) -> Dict[str, Any]:
        return {"config": json.dumps(_config_of(self.model), sort_keys=True)}

    def save_model(self, path: str, model: torch.nn.Module, summary: Dict[str, Any]) -> None:
        save_world_vae(path, model, summary)

    def load_model(self, path: str) -> torch.nn.Module:
        return load_world_vae(path)


def _config_of(vae) -> Dict[str, Any]:
    return {k: v for k, v in dict(vae.config).items() if k in VAE_CONFIG}


def save_world_vae(path: str, vae, summary: Dict[str, Any]) -> None:
    save_world_checkpoint(path, vae, VAE_FORMAT, {"config": _config_of(vae)}, summary)


def load_world_vae(path: str):
    tensors, configs = load_world_checkpoint(path, VAE_FORMAT, "world VAE")
    vae = build_vae(configs["config"])
    vae.load_state_dict(tensors, strict=True)
    return vae.eval()


@torch.no_grad()
def latent_statistics(vae, scenes: Sequence[Scene], batch_size: int = 128) -> Tuple[float, float]:
    """Mean and standard deviation of the raw latent means (over every element) of renders of ``scenes``."""
    values = []
    for start in range(0, len(scenes), batch_size):
        values.append(vae.encode(pixels_of(scenes[start:start + batch_size])).latent_dist.mean.flatten())
    values = torch.cat(values).double()
    return float(values.mean()), float(values.std())


@torch.no_grad()
def match_flux_latent_scale(vae, scenes: Sequence[Scene]) -> Dict[str, float]:
    """Re-parametrise ``vae`` in place so that its latents' spread on ``scenes`` is 1 / 0.3611, FLUX.1's.

    z' = a·z: the encoder's output convolution gives a·mean and log-variance
    + 2 ln a, the decoder's input convolution takes z'/a. Exact (convolutions
    are linear and zero padding scales), so decoding an encoded image is
    unchanged up to float rounding. Returns the statistics before and after.
    """
    mean, std = latent_statistics(vae, scenes)
    a = TARGET_STD / std
    channels = vae.config.latent_channels
    conv_out = vae.encoder.conv_out  # 2·C channels: means, then log-variances
    conv_out.weight[:channels] *= a
    conv_out.bias[:channels] *= a
    conv_out.bias[channels:] += 2.0 * float(np.log(a))
    vae.decoder.conv_in.weight /= a
    new_mean, new_std = latent_statistics(vae, scenes)
    return {"mean_before": mean, "std_before": std, "mean_after": new_mean, "std_after": new_std}


def flux_scaled_vae(trained: str, scaled: str, scenes: int = 2000):
    """The VAE the world's FLUX trains on: ``trained`` with :func:`match_flux_latent_scale` applied on ``scenes``
    fixed training renders, written once to ``scaled`` and read from there afterwards (a resume uses the same
    weights, bit for bit)."""
    import os

    if os.path.isfile(scaled):
        return load_world_vae(scaled)
    vae = load_world_vae(trained)
    fixed = [vae_scene_of(12345, i) for i in range(scenes)]
    statistics = match_flux_latent_scale(vae, fixed)
    save_world_vae(scaled, vae, {"trained": os.path.abspath(trained), "latent_scale": statistics})
    return vae


@torch.no_grad()
def reconstruction_accuracy(vae, judge, scenes: Sequence[Scene], batch_size: int = 128) -> Dict[str, float]:
    """Per attribute: how often the judge reads the scene's value in the VAE's reconstruction of its render
    (what the VAE loses, the world's FLUX cannot draw)."""
    from .judge import labels_of

    correct: Dict[str, int] = {}
    for start in range(0, len(scenes), batch_size):
        chunk = list(scenes[start:start + batch_size])
        recon = vae.decode(vae.encode(pixels_of(chunk)).latent_dist.mean).sample
        logits = judge(((recon + 1.0) / 2.0).clamp(0.0, 1.0))
        for name, labels in labels_of(chunk).items():
            correct[name] = correct.get(name, 0) + int((logits[name].argmax(dim=-1) == labels).sum())
    return {name: count / len(scenes) for name, count in correct.items()}
