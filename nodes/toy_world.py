"""Mod-Adapter Toy World: the shipped toy world as ComfyUI's own MODEL, CLIP, VAE and CLIP_VISION.

Every piece is built with ComfyUI's classes from the diffusers files in
world/ (docs/results.md): the FLUX.1 model through ComfyUI's model config and
its diffusers-to-FLUX key map, FLUX's text encoders as ComfyUI's CLIP-L and T5
(the real tokenizers; T5 padded to the world's 48 tokens instead of FLUX.1's
256), ComfyUI's AutoencoderKL, and ComfyUI's CLIP vision model. The models
are tiny, so they run in float32 on any device: the same numbers as the
diffusers host, which the tests compare.
"""

import json
import os

import comfy.clip_vision
import comfy.diffusers_convert
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import torch
from comfy_api.latest import io, ui
from safetensors.torch import load_file

from ..modules.errors import ModAdapterError
from ..modules.world.captions import full_caption
from ..modules.world.paths import WORLD_FOLDER, check_world
from ..modules.world.scene import ATTRIBUTES, Scene, render
from .comfy_flux_config import flux_text_encoders_target, flux_unet_config
from .sockets import CATEGORY

DTYPE = torch.float32


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _load_weights(folder: str, name: str) -> dict:
    return {k: v.to(DTYPE) for k, v in load_file(os.path.join(folder, name)).items()}


def _strict(what: str, missing, unexpected) -> None:
    if missing or unexpected:
        raise ModAdapterError(f"the toy world's {what} does not fit ComfyUI's model: missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}; reinstall the pack")


def load_world_model(flux_folder: str):
    config = _read_json(os.path.join(flux_folder, "transformer", "config.json"))
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    unet_config = flux_unet_config(
        vec_in_dim=config["pooled_projection_dim"], context_in_dim=config["joint_attention_dim"],
        hidden_size=heads * head_dim, mlp_ratio=4.0, num_heads=heads, depth=config["num_layers"],
        depth_single_blocks=config["num_single_layers"], axes_dim=list(config["axes_dims_rope"]),
        guidance_embed=config["guidance_embeds"])
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    model_config.set_inference_dtype(DTYPE, None)
    model = model_config.get_model({}, device="cpu")
    diffusers_sd = _load_weights(os.path.join(flux_folder, "transformer"), "diffusion_pytorch_model.safetensors")
    converted = model_config.process_unet_state_dict(comfy.model_detection.convert_diffusers_mmdit(diffusers_sd, ""))
    _strict("FLUX.1 transformer", *model.diffusion_model.load_state_dict(converted, strict=False))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def world_clip_target(flux_folder: str):
    """ComfyUI's FLUX text encoders (CLIP-L pooled + T5 tokens) with the world's sizes and T5 length."""
    clip_config = _read_json(os.path.join(flux_folder, "text_encoder", "config.json"))
    t5_config = _read_json(os.path.join(flux_folder, "text_encoder_2", "config.json"))
    t5_config.setdefault("dense_act_fn", "gelu_new")
    t5_config["dense_act_fn"] = {"gelu_new": "gelu_pytorch_tanh"}.get(t5_config["dense_act_fn"], t5_config["dense_act_fn"])
    t5_config.setdefault("is_gated_act", t5_config.get("feed_forward_proj", "").startswith("gated"))
    t5_length = _read_json(os.path.join(flux_folder, "world_sampling.json"))["max_sequence_length"]
    return flux_text_encoders_target(clip_config, t5_config, t5_min_length=t5_length)


def load_world_clip(flux_folder: str):
    clip = comfy.sd.CLIP(target=world_clip_target(flux_folder), model_options={"dtype": DTYPE})
    clip_l = _load_weights(os.path.join(flux_folder, "text_encoder"), "model.safetensors")
    clip_l = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip_l.items()}
    missing, unexpected = clip.cond_stage_model.clip_l.load_sd(clip_l)
    _strict("CLIP-L text model", [k for k in missing if not k.endswith("text_projection.weight")], unexpected)
    t5 = _load_weights(os.path.join(flux_folder, "text_encoder_2"), "model.safetensors")
    _strict("T5 encoder", *clip.cond_stage_model.t5xxl.load_sd(t5))
    return clip


def load_world_vae(flux_folder: str):
    """ComfyUI's AutoencoderKL with the world's sizes. FLUX.1's VAE has no quant convolutions; ComfyUI's
    configurable AutoencoderKL always has them, so they are given as exact identities."""
    config = _read_json(os.path.join(flux_folder, "vae", "config.json"))
    channels = config["block_out_channels"]
    latent = config["latent_channels"]
    ddconfig = {"double_z": True, "z_channels": latent, "resolution": config["sample_size"],
                "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": channels[0],
                "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": config["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    sd = comfy.diffusers_convert.convert_vae_state_dict(
        _load_weights(os.path.join(flux_folder, "vae"), "diffusion_pytorch_model.safetensors"))
    sd["quant_conv.weight"] = torch.eye(2 * latent, dtype=DTYPE)[:, :, None, None]
    sd["quant_conv.bias"] = torch.zeros(2 * latent, dtype=DTYPE)
    sd["post_quant_conv.weight"] = torch.eye(latent, dtype=DTYPE)[:, :, None, None]
    sd["post_quant_conv.bias"] = torch.zeros(latent, dtype=DTYPE)
    keys = set(sd)
    vae = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": latent, "ddconfig": ddconfig}}, dtype=DTYPE)
    model_keys = set(vae.first_stage_model.state_dict())
    _strict("VAE", model_keys - keys, keys - model_keys)
    vae.latent_channels = latent
    return vae


def load_world_clip_vision(image_encoder_file: str, config_file: str):
    clip_vision = comfy.clip_vision.ClipVisionModel(config_file)  # 0.3.64 takes only a file
    sd = comfy.clip_vision.convert_to_transformers(load_file(image_encoder_file), "visual.")
    missing, unexpected = clip_vision.load_sd({k: v.to(DTYPE) for k, v in sd.items()})
    _strict("CLIP vision model", missing, unexpected)
    return clip_vision


class ModAdapterToyWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterToyWorld",
            display_name="Mod-Adapter Toy World",
            category=f"{CATEGORY}/loaders",
            description="Loads the toy world shipped with the pack: a small FLUX.1 (its transformer, CLIP-L, T5 and "
                        "VAE) and a CLIP vision model, trained on procedural scenes of one object (shape, surface, "
                        "pose, lighting, background). Runs on a CPU in seconds: images are 64×64 (use a 64×64 "
                        "EmptySD3LatentImage), sample with about 20 steps, cfg 4, euler, simple.",
            inputs=[],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The world's FLUX.1 (no guidance embedding, like "
                                "FLUX.1 [schnell]): use KSampler's cfg, about 4."),
                io.Clip.Output(display_name="CLIP", tooltip="The world's CLIP-L and T5 (the real tokenizers): "
                               "CLIPTextEncode, the Concept Encoder and Learn Concept take it."),
                io.Vae.Output(display_name="VAE", tooltip="The world's VAE: 16 latent channels, 8× down, as FLUX.1's."),
                io.ClipVision.Output(display_name="CLIP_VISION", tooltip="The world's CLIP vision model (64 px, "
                                     "65 tokens): the Concept Encoder reads concept images with it."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_toy_world(WORLD_FOLDER))


PREVIEW_SCALE = 4


class ModAdapterToyWorldScene(io.ComfyNode):
    """A scene of the toy world, rendered: a concept image for the Toy World's models."""

    @classmethod
    def define_schema(cls):
        defaults = {"shape": "star", "colour": "red", "pattern": "stripes", "position": "right", "size": "large",
                    "direction": "top", "tint": "cool", "background": "grass"}
        return io.Schema(
            node_id="ModAdapterToyWorldScene",
            display_name="Mod-Adapter Toy World Scene",
            category=f"{CATEGORY}/loaders",
            description="Renders one scene of the toy world (64×64): an object with a shape, a surface (colour and "
                        "pattern), a pose (position and size), a lighting (direction and tint) and a background. "
                        "Use it as a concept image with the Toy World's models.",
            inputs=[io.Combo.Input(name, options=list(values), default=defaults[name],
                                   tooltip=f"The scene's {name}.") for name, values in ATTRIBUTES.items()]
            + [io.Int.Input("seed", default=0, min=0, max=0x7FFFFFFF, control_after_generate=False,
                            tooltip="The grain of the background texture.")],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The scene, 64×64."),
                io.String.Output(display_name="caption", tooltip="The scene's caption with every attribute stated."),
            ],
        )

    @classmethod
    def execute(cls, seed, **attributes) -> io.NodeOutput:
        scene = Scene(**attributes, seed=seed)
        image = torch.from_numpy(render(scene)).float().div(255.0)[None]
        # Shown on the node, as Load Image shows its picture; 64×64 is drawn 4× larger, pixel for pixel.
        preview = image.repeat_interleave(PREVIEW_SCALE, dim=1).repeat_interleave(PREVIEW_SCALE, dim=2)
        return io.NodeOutput(image, full_caption(scene), ui=ui.PreviewImage(preview, cls=cls))


def load_toy_world(folder: str):
    """(MODEL, CLIP, VAE, CLIP_VISION) of the world in ``folder``."""
    paths = check_world(folder)
    flux = paths["flux"]
    return (load_world_model(flux), load_world_clip(flux), load_world_vae(flux),
            load_world_clip_vision(paths["image_encoder"], paths["clip_vision_config"]))
