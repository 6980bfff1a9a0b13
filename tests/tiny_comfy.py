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

import torch

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


def flux_unet_config(*, vec_in_dim: int, context_in_dim: int, hidden_size: int, mlp_ratio: float, num_heads: int,
                     depth: int, depth_single_blocks: int, axes_dim, guidance_embed: bool = True) -> dict:
    """The FLUX.1 model config this ComfyUI's own loader would build for a checkpoint of these sizes.

    ComfyUI's detection (`comfy.model_detection.detect_unet_config`) runs on the
    key names and shapes of such a checkpoint (meta tensors: nothing is
    allocated), so every field a version adds (0.33.0: `txt_ids_dims`,
    `yak_mlp`, `txt_norm`, ...) has the value that version gives FLUX.1. Older
    versions hard-code FLUX.1's full sizes instead of reading them, so the sizes
    are set afterwards.
    """
    import comfy.model_detection

    def meta(*shape):
        return torch.empty(shape, device="meta")

    mlp = int(hidden_size * mlp_ratio)
    head = hidden_size // num_heads
    checkpoint = {"img_in.weight": meta(hidden_size, 16 * 2 * 2), "txt_in.weight": meta(hidden_size, context_in_dim),
                  "vector_in.in_layer.weight": meta(hidden_size, vec_in_dim)}
    if guidance_embed:
        checkpoint["guidance_in.in_layer.weight"] = meta(hidden_size, 256)
    for i in range(depth):
        for stream in ("img", "txt"):
            checkpoint[f"double_blocks.{i}.{stream}_attn.norm.key_norm.scale"] = meta(head)
            checkpoint[f"double_blocks.{i}.{stream}_attn.norm.query_norm.scale"] = meta(head)
            checkpoint[f"double_blocks.{i}.{stream}_mlp.0.weight"] = meta(mlp, hidden_size)
    for j in range(depth_single_blocks):
        checkpoint[f"single_blocks.{j}.norm.key_norm.scale"] = meta(head)
    config = comfy.model_detection.detect_unet_config(checkpoint, "")
    if config is None or config.get("image_model") != "flux":
        raise RuntimeError(f"This ComfyUI does not detect a FLUX.1 checkpoint from FLUX.1's key names: {config}")
    config.update(vec_in_dim=vec_in_dim, context_in_dim=context_in_dim, hidden_size=hidden_size, mlp_ratio=mlp_ratio,
                  num_heads=num_heads, depth=depth, depth_single_blocks=depth_single_blocks, axes_dim=list(axes_dim),
                  guidance_embed=guidance_embed)
    return config


def comfy_flux_model(config: dict, dtype: torch.dtype = torch.float32, device="cpu"):
    """An uninitialised ComfyUI FLUX.1 BaseModel from a unet config, through the version's own model config class."""
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    if model_config is None:
        raise RuntimeError(f"This ComfyUI has no model config for {config}")
    model_config.set_inference_dtype(dtype, None)
    return model_config.get_model({}, device=device)


def tiny_flux_model(seed: int = 0):
    import comfy.model_management
    import comfy.model_patcher

    model = comfy_flux_model(flux_unet_config(**FLUX_SIZES))
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_flux_clip(seed: int = 1):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    clip_l_json = _config_file("clip_l.json", CLIP_L_CONFIG)
    t5_json = _config_file("t5.json", T5_CONFIG)

    class TinyFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=clip_l_json,
                                                     return_projected_pooled=False, model_options=model_options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=t5_json,
                                                    special_tokens={"end": 1, "pad": 0},
                                                    model_class=comfy.text_encoders.t5.T5,
                                                    model_options={**model_options, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
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
