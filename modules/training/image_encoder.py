"""The CLIP image encoder outside ComfyUI, token for token as ComfyUI computes it.

Mod-Adapter reads a concept image as the penultimate-layer tokens of a CLIP
vision transformer. In ComfyUI those tokens come from the CLIP_VISION model
the user loads (``CLIPVisionLoader`` → ``encode_image(image, crop)`` →
``penultimate_hidden_states``); for training they come from this module,
which must give the same numbers for the same weights, or the adapter learns
on features it never sees at inference.

What ComfyUI computes (``comfy/clip_vision.py``, ``comfy/clip_model.py``),
reproduced here:

* preprocessing (``clip_preprocess``): drop alpha, channels first; unless the
  image already is ``size x size``, resize with ``bicubic`` + ``antialias``
  (short side to ``size``, the other side ``round(scale * side)``, then a
  centre crop of ``size x size`` with offsets ``(dim - size) // 2``; with
  ``crop=False`` a squash to ``size x size``); clip to 0..1 in 1/255 steps
  (``round(255 * x) / 255``); normalise with OpenAI CLIP's mean/std; float32;
* tokens: patch embedding (no bias), the class token prepended, learned
  position embedding added, ``ln_pre`` (``pre_layrnorm``), then the
  transformer blocks; ``penultimate_hidden_states`` is the output of block
  ``L - 2`` (after ``L - 1`` blocks, as ``hidden_states[-2]`` in transformers),
  *with* the class token first and *without* ``ln_post``: (B, 1 + grid², D),
  e.g. 257 x 1024 for ViT-L/14, 257 x 1280 for ViT-H/14;
* activation: ComfyUI picks the CLIP vision config by depth, and its 24-layer
  (ViT-L) configs use QuickGELU, the 32/48-layer ones (ViT-H, ViT-bigG) GELU,
  whatever the weights were trained with;
* precision: ComfyUI stores the weights in ``text_encoder_dtype`` (float16
  unless ``--fp32-text-enc``/``--bf16-text-enc``/...) except ``pre_layrnorm``,
  which it builds in float32, and computes in float32 (``manual_cast`` casts
  each weight to the float32 input). ``storage_dtype`` reproduces that
  rounding.

The network is open_clip's ``VisionTransformer``; weights are read only from
safetensors files, in open_clip layout (``visual.conv1.weight``,
``visual.transformer.resblocks.N...``, with or without the ``visual.``
prefix) or transformers layout (``vision_model.embeddings...``,
``vision_model.encoder.layers.N...``: ComfyUI's ``clip_vision`` files), local
or from the Hugging Face cache (never downloaded). Pickle files are refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..dtypes import optional_dtype
from ..errors import ModAdapterError
from ..safetensors_io import read_safetensors_header

__all__ = [
    "ImageEncoderError",
    "OpenClipImageEncoder",
    "clip_preprocess",
    "resolve_weights",
    "convert_transformers_to_open_clip",
    "CLIP_MEAN",
    "CLIP_STD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Files a Hugging Face CLIP repository may hold, in the order they are tried.
HUB_SAFETENSORS_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.safetensors")
_HUB_PICKLE_FILES = ("open_clip_pytorch_model.bin", "pytorch_model.bin")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# ComfyUI's CLIP vision configs by depth: comfy/clip_vision_config_{vitl,vitl_336,h,g}.json.
_COMFY_ACTIVATION_BY_DEPTH = {24: "quick_gelu", 32: "gelu", 48: "gelu"}
# For messages: the usual architecture of a (depth, width) pair.
_KNOWN_ARCHITECTURES = {(12, 768): "ViT-B-16 / ViT-B-32", (24, 1024): "ViT-L-14", (32, 1280): "ViT-H-14",
                        (48, 1664): "ViT-bigG-14", (40, 1408): "ViT-g-14"}


class ImageEncoderError(ModAdapterError):
    """A CLIP image encoder cannot be built or used."""


# --------------------------------------------------------------------------
# Preprocessing (ComfyUI's clip_preprocess, step for step)
# --------------------------------------------------------------------------


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop: bool = True,
) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in 0..1 → normalised pixels (B, 3, size, size), float32.

    The same operations, in the same order and dtype, as
    ``comfy.clip_vision.clip_preprocess``.
    """
    if not isinstance(images, torch.Tensor):
        raise ImageEncoderError(f"images must be a torch.Tensor (B, H, W, C), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] < 3:
        raise ImageEncoderError(
            f"images must have shape (batch, height, width, channels) with 3 or 4 channels like a ComfyUI IMAGE, "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ImageEncoderError(f"images are empty: shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ImageEncoderError(f"images must be floating point in 0..1, got dtype {images.dtype}")
    image = images[:, :, :, :3] if images.shape[3] > 3 else images
    mean_t = torch.tensor(mean, device=image.device, dtype=image.dtype)
    std_t = torch.tensor(std, device=image.device, dtype=image.dtype)
    image = image.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            scale_size = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scale_size = (size, size)
        image = F.interpolate(image, size=scale_size, mode="bicubic", antialias=True)
        h = (image.shape[2] - size) // 2
        w = (image.shape[3] - size) // 2
        image = image[:, :, h : h + size, w : w + size]
    image = torch.clip((255.0 * image), 0, 255).round() / 255.0
    return ((image - mean_t.view([3, 1, 1])) / std_t.view([3, 1, 1])).float()


# --------------------------------------------------------------------------
# Weights: where they are, which layout, conversion to open_clip's names
# --------------------------------------------------------------------------


def _looks_like_repo_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def _refuse_pickle(path: str) -> None:
    if path.lower().endswith(_PICKLE_SUFFIXES):
        raise ImageEncoderError(
            f"refusing to load {path}: {os.path.splitext(path)[1]} files are pickles, which can run arbitrary code "
            "when loaded. Use the .safetensors version of these weights (ComfyUI's clip_vision files, "
            "open_clip_model.safetensors or model.safetensors on the Hugging Face hub)."
        )


def resolve_weights(weights: Union[str, os.PathLike], *, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The local safetensors file named by ``weights``.

    ``weights`` is a ``.safetensors`` file, a folder holding one of
    ``open_clip_model.safetensors`` / ``model.safetensors``, or a Hugging Face
    repo id (optionally ``hf-hub:`` prefixed) already in the local cache
    (``huggingface-cli download REPO --include '*.safetensors'``); nothing is
    downloaded. Pickle files (.bin, .pt, .pth, .ckpt) are refused.
    """
    text = os.fspath(weights)
    local = os.path.expanduser(text)
    if os.path.isfile(local):
        _refuse_pickle(local)
        return Path(local)
    if os.path.isdir(local):
        for name in HUB_SAFETENSORS_FILES:
            if os.path.isfile(os.path.join(local, name)):
                return Path(local) / name
        pickles = [n for n in _HUB_PICKLE_FILES if os.path.isfile(os.path.join(local, n))]
        hint = f" (it has {pickles}, pickle files this pack refuses to load)" if pickles else ""
        raise ImageEncoderError(f"folder {local} holds none of {list(HUB_SAFETENSORS_FILES)}{hint}")
    _refuse_pickle(local)
    repo_id = text[len("hf-hub:"):] if text.startswith("hf-hub:") else text
    if not _looks_like_repo_id(repo_id):
        raise ImageEncoderError(
            f"image encoder weights {text!r} are neither a file, a folder nor a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import try_to_load_from_cache

    cache = os.fspath(cache_dir) if cache_dir is not None else None
    for name in HUB_SAFETENSORS_FILES:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    pickles = [n for n in _HUB_PICKLE_FILES if isinstance(try_to_load_from_cache(repo_id, n, cache_dir=cache), str)]
    if pickles:
        raise ImageEncoderError(
            f"the Hugging Face cache has {repo_id} only as pickle files {pickles}, which this pack refuses to load; "
            f"download a safetensors file: huggingface-cli download {repo_id} --include '*.safetensors'"
        )
    raise ImageEncoderError(
        f"{text!r} is not a local file and the Hugging Face cache has no {' / '.join(HUB_SAFETENSORS_FILES)} for "
        f"repo {repo_id!r} (nothing is downloaded at run time). Download it first: "
        f"huggingface-cli download {repo_id} --include '*.safetensors', or pass the file path."
    )


@dataclass(frozen=True)
class _Layout:
    kind: str  # "open_clip" or "transformers"
    prefix: str
    depth: int


def _detect_layout(keys: Sequence[str], path: Any) -> _Layout:
    keyset = set(keys)
    for key in sorted(keys, key=len):
        if key.endswith("conv1.weight"):
            prefix = key[: -len("conv1.weight")]
            if prefix + "transformer.resblocks.0.attn.in_proj_weight" in keyset:
                pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
                return _Layout("open_clip", prefix, _depth(keys, pattern))
        if key.endswith("embeddings.patch_embedding.weight"):
            prefix = key[: -len("embeddings.patch_embedding.weight")]
            if prefix + "encoder.layers.0.self_attn.q_proj.weight" in keyset:
                if prefix + "embeddings.patch_embedding.bias" in keyset or prefix + "embeddings.class_embedding" not in keyset:
                    raise ImageEncoderError(
                        f"{path} is a SigLIP-style vision model (no class token); Mod-Adapter's image encoder is CLIP "
                        "(ViT-L/14, ViT-H/14, ...)"
                    )
                pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
                return _Layout("transformers", prefix, _depth(keys, pattern))
    sample = ", ".join(sorted(keys)[:5])
    raise ImageEncoderError(
        f"{path} is not a CLIP vision checkpoint: expected open_clip keys (visual.conv1.weight, "
        f"visual.transformer.resblocks.0...) or transformers keys (vision_model.embeddings.patch_embedding.weight, "
        f"vision_model.encoder.layers.0...); its keys start with: {sample}"
    )


def _depth(keys: Sequence[str], pattern: "re.Pattern[str]") -> int:
    indices = {int(m.group(1)) for k in keys for m in [pattern.match(k)] if m}
    depth = max(indices) + 1 if indices else 0
    if sorted(indices) != list(range(depth)):
        raise ImageEncoderError(f"the checkpoint's transformer blocks are not numbered 0..N-1 (found {sorted(indices)})")
    return depth


def _open_clip_sources(layout: _Layout, blocks: int) -> Dict[str, List[str]]:
    """open_clip name (without "visual.") → source names in the file, for the tensors the encoder uses."""
    p = layout.prefix
    if layout.kind == "open_clip":
        names = ["class_embedding", "conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]
        for i in range(blocks):
            for part in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                names += [f"transformer.resblocks.{i}.{part}.weight", f"transformer.resblocks.{i}.{part}.bias"]
            names += [f"transformer.resblocks.{i}.attn.in_proj_weight", f"transformer.resblocks.{i}.attn.in_proj_bias"]
        return {n: [p + n] for n in names}
    sources = {
        "class_embedding": [p + "embeddings.class_embedding"],
        "conv1.weight": [p + "embeddings.patch_embedding.weight"],
        "positional_embedding": [p + "embeddings.position_embedding.weight"],
        "ln_pre.weight": [p + "pre_layrnorm.weight"],
        "ln_pre.bias": [p + "pre_layrnorm.bias"],
    }
    parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(blocks):
        src, dst = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in parts.items():
            for w in ("weight", "bias"):
                sources[f"{dst}{ours}.{w}"] = [f"{src}{theirs}.{w}"]
        for w in ("weight", "bias"):
            sources[f"{dst}attn.in_proj_{w}"] = [f"{src}self_attn.{x}_proj.{w}" for x in ("q", "k", "v")]
    return sources


def convert_transformers_to_open_clip(state_dict: Dict[str, torch.Tensor], prefix: str = "vision_model.") -> Dict[str, torch.Tensor]:
    """A transformers ``CLIPVisionModel`` state dict in open_clip ``VisionTransformer`` names.

    The inverse of ComfyUI's ``convert_to_transformers`` for the tensors the
    penultimate tokens need (embeddings, ``ln_pre``, the blocks; q/k/v are
    concatenated into ``in_proj``), plus ``ln_post``/``proj`` when present.
    """
    pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layout = _Layout("transformers", prefix, _depth(list(state_dict), pattern))
    out: Dict[str, torch.Tensor] = {}
    for name, sources in _open_clip_sources(layout, layout.depth).items():
        missing = [s for s in sources if s not in state_dict]
        if missing:
            raise ImageEncoderError(f"the transformers state dict lacks {missing}")
        out[name] = state_dict[sources[0]] if len(sources) == 1 else torch.cat([state_dict[s] for s in sources], 0)
    if prefix + "post_layernorm.weight" in state_dict:
        out["ln_post.weight"] = state_dict[prefix + "post_layernorm.weight"]
        out["ln_post.bias"] = state_dict[prefix + "post_layernorm.bias"]
    if "visual_projection.weight" in state_dict:
        out["proj"] = state_dict["visual_projection.weight"].t()
    return out


# --------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------


def _as_dtype(value: Union[str, torch.dtype, None], what: str) -> Optional[torch.dtype]:
    return optional_dtype(value, what=what, error_cls=ImageEncoderError)


class OpenClipImageEncoder:
    """CLIP vision tokens (penultimate layer) as ComfyUI's CLIP_VISION gives them.

    Build with :meth:`load`. ``encode(images)`` takes a ComfyUI-style IMAGE
    tensor (B, H, W, C) in 0..1 and returns (B, num_tokens, token_width).
    """

    def __init__(self, visual: torch.nn.Module, *, name: str, depth: int, activation: str,
                 device: torch.device, dtype: torch.dtype, weights: Optional[str] = None,
                 architecture: Optional[str] = None) -> None:
        self.visual = visual
        self._name = name
        self.architecture = architecture or name
        self.depth = depth
        self.activation = activation
        self.device = device
        self.dtype = dtype
        self.weights = weights
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.grid_size = int(visual.grid_size[0])
        self._width = int(visual.conv1.weight.shape[0])

    # -- description ----------------------------------------------------------

    @property
    def name(self) -> str:
        """What the checkpoint metadata calls this encoder: the ``name`` given to :meth:`load`, else the
        Hugging Face repo id the weights came from, else the open_clip architecture (``ViT-H-14``)."""
        return self._name

    @property
    def token_width(self) -> int:
        """D, the width of each token (1024 for ViT-L/14, 1280 for ViT-H/14)."""
        return self._width

    @property
    def num_tokens(self) -> int:
        """T = 1 (class token) + grid² (257 at 224 px with patch 14)."""
        return 1 + self.grid_size * self.grid_size

    def metadata(self) -> Dict[str, Any]:
        """The ``image_encoder`` entry of an adapter checkpoint's metadata."""
        return {"name": self.name, "layer": "penultimate", "tokens": self.num_tokens, "width": self.token_width}

    def __repr__(self) -> str:
        return (f"OpenClipImageEncoder({self.name}, {self.depth} layers, {self.num_tokens}x{self.token_width} tokens, "
                f"{self.activation}, {self.dtype}, {self.device})")

    # -- building -------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_name: str,
        weights: Union[str, os.PathLike],
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        storage_dtype: Union[str, torch.dtype, None] = torch.float16,
        activation: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        name: Optional[str] = None,
    ) -> "OpenClipImageEncoder":
        """Build the vision tower of open_clip's ``model_name`` with ``weights``.

        model_name: an open_clip architecture (``ViT-L-14``, ``ViT-L-14-336``,
        ``ViT-H-14``, ``ViT-bigG-14``, or one registered with
        ``open_clip.add_model_config``); must match the weights (checked).
        weights: see :func:`resolve_weights` (safetensors only).
        dtype: the compute dtype (ComfyUI: float32).
        storage_dtype: weights are rounded to this dtype first, as ComfyUI
        stores them (float16 by default; None keeps the file's precision,
        like ComfyUI with ``--fp32-text-enc``). ``ln_pre`` is never rounded.
        activation: ``"quick_gelu"`` or ``"gelu"``; None picks ComfyUI's choice
        for the depth (QuickGELU for 24 layers, GELU for 32 and 48), else the
        open_clip config's own.
        name: the encoder's name in checkpoint metadata (default: the repo id
        when ``weights`` is one, else ``model_name``); name the weights the
        user must load in ComfyUI, e.g. ``openai/clip-vit-large-patch14``.
        """
        import open_clip
        from open_clip.model import _build_vision_tower

        dtype = _as_dtype(dtype, "dtype")
        storage_dtype = _as_dtype(storage_dtype, "storage_dtype")
        if not dtype.is_floating_point:
            raise ImageEncoderError(f"dtype must be a floating dtype, got {dtype}")
        config = open_clip.get_model_config(model_name) if isinstance(model_name, str) else None
        if not config or "vision_cfg" not in config:
            close = [m for m in open_clip.list_models() if m.lower().startswith(str(model_name).lower()[:7])][:8]
            raise ImageEncoderError(f"unknown open_clip model {model_name!r}; e.g. ViT-L-14, ViT-H-14 (close: {close})")
        vision_cfg = dict(config["vision_cfg"])
        if vision_cfg.get("timm_model_name") or not isinstance(vision_cfg.get("layers"), int):
            raise ImageEncoderError(f"{model_name} is not a plain CLIP ViT (timm or ResNet tower); use a ViT-*-14 model")
        for flag in ("attentional_pool", "no_ln_pre"):
            if vision_cfg.get(flag):
                raise ImageEncoderError(f"{model_name} has {flag}; ComfyUI's CLIP vision cannot run it")
        depth_cfg = int(vision_cfg["layers"])
        if depth_cfg < 2:
            raise ImageEncoderError(f"{model_name} has {depth_cfg} layer(s); a penultimate layer needs at least 2")
        if activation is None:
            activation = _COMFY_ACTIVATION_BY_DEPTH.get(depth_cfg, "quick_gelu" if config.get("quick_gelu") else "gelu")
        if activation not in ("quick_gelu", "gelu"):
            raise ImageEncoderError(f"activation must be 'quick_gelu' or 'gelu', got {activation!r}")

        path = resolve_weights(weights, cache_dir=cache_dir)
        _, header = read_safetensors_header(path, kind="CLIP vision checkpoint", error_cls=ImageEncoderError)
        layout = _detect_layout(list(header), path)
        sources = _open_clip_sources(layout, layout.depth - 1)  # the last block is not needed
        shapes = {key: tuple(header[src[0]][1]) for key, src in sources.items() if src[0] in header}
        _check_architecture(model_name, vision_cfg, layout, shapes, path)
        missing = sorted({s for src in sources.values() for s in src if s not in header})
        if missing:
            raise ImageEncoderError(f"{path} lacks {len(missing)} tensor(s) of the vision tower, e.g. {missing[:4]}")

        with torch.device("meta"):
            visual = _build_vision_tower(int(config.get("embed_dim", 512)), vision_cfg, quick_gelu=activation == "quick_gelu")
        # Keep only what the penultimate tokens need: blocks 0..L-2, no ln_post/proj.
        visual.prune_intermediate_layers(indices=[depth_cfg - 2], prune_norm=True, prune_head=True)

        from safetensors import safe_open

        state: Dict[str, torch.Tensor] = {}
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            for key, src in sources.items():
                parts = [handle.get_tensor(s) for s in src]
                tensor = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
                if not torch.isfinite(tensor.float()).all():
                    raise ImageEncoderError(f"{path}: tensor {src[0]!r} holds NaN or infinite values")
                if storage_dtype is not None and not key.startswith("ln_pre."):
                    tensor = tensor.to(storage_dtype)
                state[key] = tensor.to(dtype)
        try:
            visual.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ImageEncoderError(f"{path} does not fit {model_name}: {e}") from None
        leftover = [k for k, t in list(visual.named_parameters()) + list(visual.named_buffers()) if t.is_meta]
        if leftover:
            raise ImageEncoderError(f"{model_name}: no weights for {leftover[:4]} in {path}")
        device = torch.device(device)
        visual = visual.to(device=device).eval().requires_grad_(False)
        if name is None:
            text = os.fspath(weights)
            repo = text[len("hf-hub:"):] if text.startswith("hf-hub:") else text
            name = repo if not os.path.exists(os.path.expanduser(text)) and _looks_like_repo_id(repo) else str(model_name)
        return cls(visual, name=name, depth=depth_cfg, activation=activation, device=device, dtype=dtype,
                   weights=str(path), architecture=str(model_name))

    # -- encoding -------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: the tokens feed training graphs
    def encode(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """Penultimate-layer tokens (B, num_tokens, token_width) of ComfyUI IMAGEs (B, H, W, C) in 0..1.

        Equal to ComfyUI's ``clip_vision.encode_image(images, crop=crop)
        ["penultimate_hidden_states"]`` for the same weights. Returned in
        ``dtype`` on ``device``.
        """
        pixels = clip_preprocess(images.to(self.device), size=self.image_size, crop=crop)
        x = self.visual._embeds(pixels.to(self.dtype))
        _, intermediates = self.visual.transformer.forward_intermediates(x, indices=[self.depth - 2], stop_early=True)
        return intermediates[0]

    def encode_with_mask(
        self, images: torch.Tensor, masks: Optional[torch.Tensor], crop: bool = True, threshold: float = 0.5
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens and their key mask (B, num_tokens) bool for image masks (B, H, W) in 0..1 (1 = concept).

        A patch token is kept when its share of the mask is >= ``threshold``
        (after the same centre crop as the image when ``crop``); the class
        token is always kept. ``masks=None`` keeps every token.
        """
        from ..adapter import image_mask_to_token_mask

        tokens = self.encode(images, crop=crop)
        if masks is None:
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if masks.dim() == 2:
            masks = masks.unsqueeze(0)
        if masks.shape[0] != tokens.shape[0]:
            raise ImageEncoderError(f"got {tokens.shape[0]} images but {masks.shape[0]} masks")
        if images.dim() == 4 and tuple(masks.shape[1:]) != tuple(images.shape[1:3]):
            raise ImageEncoderError(f"masks are {tuple(masks.shape[1:])} but images are {tuple(images.shape[1:3])}")
        key_mask = image_mask_to_token_mask(masks, grid_size=self.grid_size, cls_token=True, threshold=threshold,
                                            center_crop=crop)
        return tokens, key_mask.to(tokens.device)


def _check_architecture(model_name: str, vision_cfg: Dict[str, Any], layout: _Layout,
                        shapes: Dict[str, Tuple[int, ...]], path: Any) -> None:
    conv = shapes.get("conv1.weight")
    pos = shapes.get("positional_embedding")
    if conv is None or pos is None or len(conv) != 4 or len(pos) != 2:
        raise ImageEncoderError(f"{path}: patch or position embedding missing or malformed")
    have = {"layers": layout.depth, "width": conv[0], "patch_size": conv[-1], "tokens": pos[0]}
    image_size = vision_cfg.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch = vision_cfg.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    want = {"layers": int(vision_cfg["layers"]), "width": int(vision_cfg["width"]), "patch_size": int(patch),
            "tokens": 1 + (int(image_size) // int(patch)) ** 2}
    if have != want:
        guess = _KNOWN_ARCHITECTURES.get((have["layers"], have["width"]))
        hint = f" (that looks like {guess})" if guess else ""
        raise ImageEncoderError(
            f"{path} holds a ViT with {have['layers']} layers, width {have['width']}, patch {have['patch_size']} and "
            f"{have['tokens']} tokens{hint}, but {model_name} has {want['layers']} layers, width {want['width']}, "
            f"patch {want['patch_size']} and {want['tokens']} tokens; pass the model name that matches the weights"
        )
