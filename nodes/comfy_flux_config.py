"""FLUX.1 model configs and text encoders the way this ComfyUI's own loaders would build them, for any size.

ComfyUI detects a FLUX.1 checkpoint's config from its key names and shapes,
but older versions hard-code FLUX.1's full width instead of reading it; the
toy world's FLUX.1 (and the tests' tiny ones) are small, so the config is
detected on a FLUX.1 key set of the right sizes and the sizes are then set.
"""

from typing import Optional

import torch


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


def comfy_flux_model(config: dict, dtype: torch.dtype = torch.float32, device="cpu",
                     manual_cast_dtype: Optional[torch.dtype] = None):
    """An uninitialised ComfyUI FLUX.1 BaseModel from a unet config, through the version's own model config class.
    ``manual_cast_dtype``: compute in this dtype from weights stored in ``dtype`` (ComfyUI's fp8 loading)."""
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(dict(config))
    if model_config is None:
        raise RuntimeError(f"This ComfyUI has no model config for {config}")
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    return model_config.get_model({}, device=device)


def flux_text_encoders_target(clip_l_config: dict, t5_config: dict, t5_min_length=None):
    """A ClipTarget for ComfyUI's FLUX.1 text encoders (FluxTokenizer with the real tokenizers, CLIP-L pooled + T5
    tokens) whose CLIP-L and T5 have the given transformers-style configs. ``t5_min_length``: the T5 padding
    length (None: FLUX.1's 256)."""
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.t5

    class SizedFluxTokenizer(comfy.text_encoders.flux.FluxTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            if t5_min_length is not None:
                self.t5xxl = comfy.text_encoders.sd3_clip.T5XXLTokenizer(
                    embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, min_length=t5_min_length)

    class SizedFluxClipModel(comfy.text_encoders.flux.FluxClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=clip_l_config,
                                                     return_projected_pooled=False, model_options=model_options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=t5_config,
                                                    special_tokens={"end": 1, "pad": 0},
                                                    model_class=comfy.text_encoders.t5.T5,
                                                    model_options={**model_options, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    return comfy.supported_models_base.ClipTarget(SizedFluxTokenizer, SizedFluxClipModel)
