"""Running FLUX.1 in diffusers: the plumbing that Learn Concept (CLI), training and benchmarks share.

- loading: a diffusers folder, a repo in the local Hugging Face cache, or a
  single transformer file plus the other components; nothing is downloaded;
- latents: packing into 2×2 patches and the image position ids, with
  diffusers' own ``FluxPipeline`` helpers;
- the VAE: pixels in [-1, 1] to FLUX's normalised latents and back
  (``(z − shift_factor) · scaling_factor``, as FluxImg2ImgPipeline);
- the text: a caption's T5 tokens and CLIP-L pooled vector, as FluxPipeline
  encodes them;
- the velocity call: v_θ of unpacked latents at σ, and the modulation vector
  `vec` at σ that every block reads.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import ModAdapterError

# FLUX.1 [dev] embeds a guidance scale; diffusers' train_dreambooth_flux.py
# trains with --guidance_scale 3.5 by default, which is also FluxPipeline's
# default at inference.
DEFAULT_TRAINING_GUIDANCE = 3.5

# diffusers' FluxPipeline pads/truncates T5 to max_sequence_length (512 by
# default); ComfyUI pads T5 to 256 and concepts are mostly used there, so we
# learn with 256 text tokens (also cheaper: the text shares attention with the
# image tokens).
DEFAULT_MAX_SEQUENCE_LENGTH = 256

DEFAULT_COMPONENTS_REPO = "black-forest-labs/FLUX.1-dev"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")



# --------------------------------------------------------------------------
# Latent packing (diffusers' FluxPipeline helpers)
# --------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C): FluxPipeline._pack_latents (2×2 patches, row-major)."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ModAdapterError(f"FLUX latents need an even height and width, got {height}×{width}")
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height`` × ``width`` (FluxPipeline._unpack_latents,
    which counts in pixels: a VAE scale factor of 1 makes its pixels our latent rows and columns)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, 1)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (H/2·W/2, 3) of the packed image tokens: FluxPipeline._prepare_latent_image_ids
    for latents of ``height`` × ``width`` (channel 1 = row, channel 2 = column, channel 0 = 0)."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
    return ids.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------
# Images and the VAE
# --------------------------------------------------------------------------


def fit_image(image, resolution: int):
    """Resize the short side to ``resolution`` and centre-crop to a square.

    Returns (image, note): note says what changed, None when the image was
    already ``resolution`` × ``resolution``.
    """
    from PIL import Image

    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image, None
    scale = resolution / min(width, height)
    scaled_w, scaled_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    scaled = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    left, top = (scaled_w - resolution) // 2, (scaled_h - resolution) // 2
    cropped = scaled.crop((left, top, left + resolution, top + resolution))
    cut = []
    if scaled_w > resolution:
        cut.append(f"{scaled_w - resolution} px of width")
    if scaled_h > resolution:
        cut.append(f"{scaled_h - resolution} px of height")
    note = (f"{width}×{height} resized to {resolution}×{resolution} (short side scaled to {resolution}"
            + (f", centre crop cut {' and '.join(cut)}" if cut else "") + ")")
    return cropped, note



@torch.no_grad()
def vae_encode(vae, pixels: torch.Tensor, device=None, *, one_at_a_time: bool = False) -> torch.Tensor:
    """VAE-encode pixels (B, 3, H, W) in [-1, 1] into FLUX's normalised latent space (float32, on ``device``,
    default the VAE's).

    Uses the mean of the latent distribution, not a sample, so the target does
    not depend on an extra random draw; then ``(z − shift_factor) · scaling_factor``
    as FluxImg2ImgPipeline._encode_vae_image. ``one_at_a_time`` encodes image by
    image: the VAE's activations at 512² dominate its memory.
    """
    first = next(vae.parameters())
    device = first.device if device is None else device
    batches = pixels.split(1) if one_at_a_time else (pixels,)
    z = torch.cat([vae.encode(b.to(device=device, dtype=first.dtype)).latent_dist.mode().float() for b in batches])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`vae_encode`: pixels (B, 3, H, W) in about [-1, 1], float32."""
    vae_dtype = next(vae.parameters()).dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents / vae.config.scaling_factor + shift
    return vae.decode(z.to(vae_dtype), return_dict=False)[0].float()


# --------------------------------------------------------------------------
# The velocity
# --------------------------------------------------------------------------


def flux_velocity(transformer, latents: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor,
                  pooled: torch.Tensor, guidance: Optional[float]) -> torch.Tensor:
    """v_θ for unpacked latents (B, C, H, W) at per-sample σ (B,); returns (B, C, H, W).

    The transformer's timestep is σ itself (FluxPipeline passes timesteps / 1000).
    Models without a guidance embedding (schnell) get no guidance.
    """
    batch, _, height, width = latents.shape
    param = next(transformer.parameters())
    dtype, device = param.dtype, latents.device
    guidance_tensor = None
    if guidance is not None and getattr(transformer.config, "guidance_embeds", False):
        guidance_tensor = torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack_latents(latents).to(dtype),
        timestep=sigma.to(device=device, dtype=dtype),
        guidance=guidance_tensor,
        pooled_projections=pooled.to(device=device, dtype=dtype).expand(batch, -1),
        encoder_hidden_states=prompt_embeds.to(device=device, dtype=dtype).expand(batch, -1, -1),
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=latent_image_ids(height, width, device, dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, height, width)


def flux_modulation_vector(transformer, sigma: torch.Tensor, pooled: torch.Tensor,
                           guidance: Optional[float]) -> torch.Tensor:
    """FLUX's modulation vector ``vec`` (diffusers' ``temb``) at per-sample σ (B,): what every block's
    modulation reads. It is ``transformer.time_text_embed`` called as ``FluxTransformer2DModel.forward`` calls
    it (timestep and guidance × 1000); the image and the text tokens play no part in it."""
    param = next(transformer.parameters())
    dtype, device = param.dtype, param.device
    batch = sigma.shape[0]
    timestep = sigma.to(device=device, dtype=dtype) * 1000
    pooled = pooled.to(device=device, dtype=dtype).expand(batch, -1)
    if guidance is not None and getattr(transformer.config, "guidance_embeds", False):
        guidance_tensor = torch.full((batch,), float(guidance), device=device, dtype=dtype) * 1000
        return transformer.time_text_embed(timestep, guidance_tensor, pooled)
    return transformer.time_text_embed(timestep, pooled)


# --------------------------------------------------------------------------
# Loading FLUX
# --------------------------------------------------------------------------


@dataclass
class FluxSource:
    """Where the transformer and the other components (text encoders, tokenizers, VAE) come from."""

    transformer_file: Optional[str]  # a single .safetensors transformer, or None
    components: str  # diffusers folder or repo id (in the local cache)


def resolve_flux_source(flux: str, components: Optional[str] = None) -> FluxSource:
    """Interpret ``--flux`` (folder, single file or repo id) and ``--components``."""
    if os.path.isdir(flux):
        if not os.path.isfile(os.path.join(flux, "model_index.json")):
            raise ModAdapterError(
                f"'{flux}' is a folder but not a diffusers FLUX pipeline (no model_index.json). Give the folder of "
                f"e.g. black-forest-labs/FLUX.1-dev as downloaded with `huggingface-cli download`, or a single "
                f"transformer .safetensors file with --components."
            )
        return FluxSource(None, components or flux)
    if os.path.isfile(flux):
        if not flux.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise ModAdapterError(f"'{flux}' is not a .safetensors file; give a FLUX.1 transformer file, a diffusers "
                                  f"folder or a Hugging Face repo id")
        return FluxSource(flux, components or DEFAULT_COMPONENTS_REPO)
    if _REPO_ID.match(flux) and not flux.lower().endswith(SINGLE_FILE_SUFFIXES):
        return FluxSource(None, components or flux)
    raise ModAdapterError(f"--flux '{flux}' is neither an existing folder or file nor a Hugging Face repo id "
                          f"(owner/name)")


def _not_loadable(what: str, source: str, exc: Exception) -> ModAdapterError:
    return ModAdapterError(
        f"Cannot load {what} from '{source}' without downloading ({type(exc).__name__}: {exc}). Nothing is downloaded "
        f"here: give a local diffusers folder, or fetch the repo into the Hugging Face cache first "
        f"(`huggingface-cli download {source if _REPO_ID.match(source) else DEFAULT_COMPONENTS_REPO}`)."
    )


def load_t5_tokenizer(source: FluxSource):
    """The caption's T5 tokenizer (FluxPipeline.tokenizer_2), loaded alone so that a concept word
    missing from the caption is reported before the large models are loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.components, subfolder="tokenizer_2", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise _not_loadable("the T5 tokenizer (tokenizer_2)", source.components, exc) from None


def load_flux_pipeline(source: FluxSource, dtype: torch.dtype):
    """FluxPipeline on the CPU from local files only."""
    with warnings.catch_warnings():
        # recent diffusers (0.42 here) deprecate from_pretrained's torch_dtype for dtype, which older releases (the
        # pack supports 0.32 on) do not accept: keep the name every release reads, without the notice
        warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
        return _load_flux_pipeline(source, dtype)


def _load_flux_pipeline(source: FluxSource, dtype: torch.dtype):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import is_accelerate_available

    # without accelerate diffusers falls back to an ordinary load, with a paragraph about it: ask for that load
    kwargs = {"low_cpu_mem_usage": is_accelerate_available()}
    if source.transformer_file is not None:
        try:
            kwargs["transformer"] = FluxTransformer2DModel.from_single_file(
                source.transformer_file, config=source.components, subfolder="transformer", torch_dtype=dtype,
                local_files_only=True, low_cpu_mem_usage=kwargs["low_cpu_mem_usage"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModAdapterError(
                f"Cannot load the FLUX.1 transformer from '{source.transformer_file}' ({type(exc).__name__}: {exc}). "
                f"It must be a FLUX.1 transformer checkpoint (BFL/ComfyUI or diffusers layout); its configuration is "
                f"read from --components '{source.components}', which must be available locally."
            ) from None
    try:
        return FluxPipeline.from_pretrained(source.components, torch_dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_loadable("the FLUX pipeline", source.components, exc) from None


@torch.no_grad()
def encode_caption(pipe, caption: str, device, max_sequence_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(T5 prompt_embeds (1, L, 4096), CLIP pooled (1, 768)) of the caption, as FluxPipeline encodes it.

    The text encoders are moved to ``device`` for the call and back to the CPU after.
    """
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    for encoder in encoders:
        encoder.to(device)
    try:
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=caption, prompt_2=caption, device=torch.device(device),
                                                      max_sequence_length=max_sequence_length)
    finally:
        for encoder in encoders:
            encoder.to("cpu")
    return prompt_embeds, pooled
