"""Write the toy world's folder (:mod:`.paths` has its layout) from the training runs: :func:`export_world` writes
flux/ and image_encoder/ in float16 (every file of the world together stays under 25 MB). The sampler settings the
world was measured with are in :data:`SAMPLING`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict

import torch

from ..safetensors_io import save_safetensors
from .clip import CLIP_TEXT_CONFIG, OPEN_CLIP_CONFIG, OPEN_CLIP_NAME, load_world_clip, write_open_clip_config
from .paths import (CLIP_VISION_CONFIG_FILE, FLUX_FOLDER, IMAGE_ENCODER_FILE, IMAGE_ENCODER_FOLDER, WORLD_FOLDER,
                    world_paths)
from .transformer import MAX_SEQUENCE_LENGTH, T5_CONFIG, TRANSFORMER_CONFIG, load_world_flux
from .vae import load_world_vae

# How the world is sampled (no guidance embedding: classifier-free guidance against the empty prompt).
SAMPLING: Dict[str, Any] = {"steps": 20, "cfg": 4.0, "max_sequence_length": MAX_SEQUENCE_LENGTH, "resolution": 64}


def clip_vision_config() -> Dict[str, Any]:
    """The image tower as a transformers CLIPVisionConfig (what ComfyUI's CLIP vision models are built from)."""
    vision = OPEN_CLIP_CONFIG["vision_cfg"]
    return {"model_type": "clip_vision_model", "hidden_size": vision["width"],
            "intermediate_size": int(vision["width"] * vision["mlp_ratio"]),
            "num_attention_heads": vision["width"] // vision["head_width"], "num_hidden_layers": vision["layers"],
            "patch_size": vision["patch_size"], "image_size": vision["image_size"], "num_channels": 3,
            "projection_dim": OPEN_CLIP_CONFIG["embed_dim"], "hidden_act": "gelu", "layer_norm_eps": 1e-5}


def scheduler_config() -> Dict[str, Any]:
    """FLUX.1 [schnell]'s scheduler: linear σ from 1 to 0, no resolution-dependent shift (as ComfyUI samples it)."""
    return {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


@torch.no_grad()
def export_world(flux_run: str, clip_checkpoint: str, out: str = WORLD_FOLDER, *, use_ema: bool = False,
                 tokenizers: str = None) -> Dict[str, str]:
    """Write ``out``/flux and ``out``/image_encoder from a ``train-flux`` run folder (its weights and its
    scaled VAE) and a ``train-clip`` checkpoint. ``tokenizers``: a folder with tokenizer/ and tokenizer_2/
    (default: the ones already in ``out``/flux)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    weights = os.path.join(flux_run, "flux-ema.safetensors" if use_ema else "flux.safetensors")
    flux = load_world_flux(weights)
    vae = load_world_vae(os.path.join(flux_run, "vae.safetensors"))
    clip = load_world_clip(clip_checkpoint)
    tokenizers = tokenizers or os.path.join(out, FLUX_FOLDER)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tokenizers, "tokenizer"))
    tokenizer_2 = T5TokenizerFast.from_pretrained(os.path.join(tokenizers, "tokenizer_2"))

    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    transformer.load_state_dict(flux.transformer.state_dict())
    text_encoder_2 = T5EncoderModel(T5Config(**T5_CONFIG))
    text_encoder_2.load_state_dict(flux.t5.state_dict())
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_CONFIG))
    text_encoder.load_state_dict(clip.text.text_model.state_dict())
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.to(torch.float16)
    flux_folder = os.path.join(out, FLUX_FOLDER)
    staging = flux_folder + ".new"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # the tokenizer files as published, not a re-serialisation
        shutil.rmtree(os.path.join(staging, name))
        shutil.copytree(os.path.join(tokenizers, name), os.path.join(staging, name))
    index_path = os.path.join(staging, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]  # as FLUX.1's own (transformers 4 and 5)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(staging, "world_sampling.json"), "w") as f:
        json.dump(SAMPLING, f, indent=1)
    shutil.rmtree(flux_folder, ignore_errors=True)
    os.replace(staging, flux_folder)

    encoder_folder = os.path.join(out, IMAGE_ENCODER_FOLDER)
    os.makedirs(encoder_folder, exist_ok=True)
    write_open_clip_config(encoder_folder)
    with open(os.path.join(encoder_folder, CLIP_VISION_CONFIG_FILE), "w") as f:
        json.dump(clip_vision_config(), f, indent=1)
    visual = {f"visual.{k}": v.detach().to(torch.float16).contiguous() for k, v in clip.visual.state_dict().items()}
    save_safetensors(os.path.join(encoder_folder, IMAGE_ENCODER_FILE), visual,
                     {"architecture": OPEN_CLIP_NAME, "trained_with": "the world's CLIP text model (contrastive)"})
    return world_paths(out)
