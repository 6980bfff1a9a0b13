"""Tiny random models of the real architectures, built through ComfyUI's own classes.

Everything a Mod-Adapter graph needs, small enough for the CPU: a FLUX.1 model
(ComfyUI model config + ModelPatcher), FLUX's text encoders (ComfyUI's
FluxTokenizer with the real tokenizer files, a FluxClipModel whose CLIP-L and
T5 are tiny), a CLIP vision model (ComfyUI's ClipVisionModel from a tiny
config), a TAESD-type VAE, and a matching Mod-Adapter checkpoint. ComfyUI must
be importable. The FLUX width (128), text width (64) and image-token width
(32) line up so the pieces work together.

This file is also copied into a throw-away custom node pack by the server
tests, so it imports nothing from the test folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch

# ComfyUI's own FLUX.1 config detection at small sizes (the pack's loader of the toy world uses it too).
from mod_adapter.nodes.comfy_flux_config import comfy_flux_model, flux_text_encoders_target, flux_unet_config  # noqa: F401

# The sizes of the tiny FLUX.1; every other field of its config comes from ComfyUI's own detection.
FLUX_SIZES = dict(vec_in_dim=64, context_in_dim=64, hidden_size=128, mlp_ratio=2.0, num_heads=2, depth=2,
                  depth_single_blocks=2, axes_dim=[8, 28, 28])
NUM_DOUBLE, NUM_SINGLE, WIDTH = 2, 2, 128

CLIP_L_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 64, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 1, "pad_token_id": 1,
    "projection_dim": 64, "vocab_size": 49408,
}
T5_CONFIG = {
    "d_ff": 128, "d_kv": 32, "d_model": 64, "decoder_start_token_id": 0, "dropout_rate": 0.0, "eos_token_id": 1,
    "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
    "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 1, "num_heads": 2, "num_layers": 1,
    "pad_token_id": 0, "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128,
}
CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 224,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 32, "projection_dim": 32,
}
IMAGE_TOKEN_WIDTH = 32  # = CLIP_VISION_CONFIG["hidden_size"]; 7×7 patches + CLS = 50 tokens

_CONFIG_DIR = tempfile.mkdtemp(prefix="mod_adapter_tiny_configs_")


def _config_file(name: str, config: dict) -> str:
    path = os.path.join(_CONFIG_DIR, name)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: fill them (norm scales at 1, the rest small noise)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name.split(".")[-2:][0]):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * (0.05 if p.ndim > 1 else 0.02))


def flux_model_holding(config: dict, weights: dict, weight_dtype: Optional[torch.dtype] = None, upcast: bool = False):
    """A ComfyUI FLUX.1 BaseModel of ``config`` holding ``weights``. With ``weight_dtype`` (fp8): the weights rounded
    to it, stored in it and computed in float32, as ComfyUI's Load Diffusion Model with weight_dtype fp8_* loads them
    on a device without fp8 compute; with ``upcast`` as well: instead, a float32 model holding exactly those rounded
    weights (the reference)."""
    import comfy.model_detection
    import comfy.model_management

    if weight_dtype is not None:
        weights = {k: v.to(weight_dtype) for k, v in weights.items()}
    if weight_dtype is None or upcast:
        model = comfy_flux_model(config)
        model.diffusion_model.load_state_dict({k: v.float() for k, v in weights.items()})
        return model
    supported = comfy.model_detection.model_config_from_unet_config(dict(config)).supported_inference_dtypes
    manual_cast = comfy.model_management.unet_manual_cast(weight_dtype, torch.device("cpu"), supported)
    model = comfy_flux_model(config, weight_dtype, manual_cast_dtype=manual_cast)
    model.diffusion_model.load_state_dict(weights)
    return model


def tiny_flux_model(seed: int = 0, weight_dtype: Optional[torch.dtype] = None, upcast: bool = False):
    """The tiny FLUX.1 as a ModelPatcher; ``weight_dtype``, ``upcast``: as :func:`flux_model_holding` stores them."""
    import comfy.model_management
    import comfy.model_patcher

    model = comfy_flux_model(flux_unet_config(**FLUX_SIZES))
    randomize_(model.diffusion_model, seed)
    if weight_dtype is not None:
        model = flux_model_holding(flux_unet_config(**FLUX_SIZES), model.diffusion_model.state_dict(), weight_dtype,
                                   upcast)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_flux_clip(seed: int = 1):
    import comfy.sd

    clip = comfy.sd.CLIP(target=flux_text_encoders_target(CLIP_L_CONFIG, T5_CONFIG), model_options={"dtype": torch.float32})
    randomize_(clip.cond_stage_model, seed)
    return clip


def tiny_clip_vision(seed: int = 2):
    import comfy.clip_vision

    clip_vision = comfy.clip_vision.ClipVisionModel(_config_file("clip_vision.json", CLIP_VISION_CONFIG))
    randomize_(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed: int = 3):
    """A 16-channel TAESD (the kind ComfyUI uses for FLUX previews), through comfy.sd.VAE's own detection."""
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    randomize_(taesd, seed)
    state = {k: v.clone() for k, v in taesd.state_dict().items()}
    return comfy.sd.VAE(sd=state)


def tiny_adapter_checkpoint(path: str, seed: int = 4) -> str:
    """A Mod-Adapter for the tiny FLUX and CLIP vision above, with non-zero experts so Δ ≠ 0."""
    from mod_adapter.modules.adapter import ModAdapter
    from mod_adapter.modules.checkpoint import save_adapter_checkpoint
    from mod_adapter.modules.config import ModAdapterConfig

    torch.manual_seed(seed)
    config = ModAdapterConfig(num_blocks=NUM_DOUBLE + NUM_SINGLE, num_double_blocks=NUM_DOUBLE, modulation_dim=WIDTH,
                              image_token_dim=IMAGE_TOKEN_WIDTH, hidden_dim=32, num_heads=2,
                              num_cross_attention_blocks=1, mlp_ratio=2.0, num_experts=2, expert_hidden_dim=48)
    adapter = ModAdapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:  # the zero-initialised expert outputs
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        adapter.set_router_centroids(torch.randn(2, WIDTH, generator=generator))
    save_adapter_checkpoint(path, adapter, base_model="tiny-flux-test",
                            image_encoder={"name": "tiny-clip-vision", "layer": "penultimate", "tokens": 50,
                                           "width": IMAGE_TOKEN_WIDTH})
    return path
