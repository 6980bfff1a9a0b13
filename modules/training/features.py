"""Text features for training: neutral features, pre-training targets, router files.

Mod-Adapter reads a concept word through FLUX's own pooled-text path
(Mod-Adapter paper, arXiv 2505.18612): the neutral feature of a word is

    n = M(CLIP(p0))

where p0 is the bare word, CLIP is the CLIP-L text encoder's pooled output
(what FLUX receives as ``pooled_projections``, computed as diffusers'
``FluxPipeline._get_clip_prompt_embeds``: padded to 77 tokens, truncated,
``pooler_output``) and M is FLUX's ``vector_in`` MLP (768 -> 3072). In
diffusers ``vector_in`` is ``FluxTransformer2DModel.time_text_embed.text_embedder``
(``PixArtAlphaTextProjection``: linear_1, SiLU, linear_2); in BFL/ComfyUI
layout it is ``vector_in.in_layer`` / ``vector_in.out_layer``. Pre-training
regresses F+ onto ``M(CLIP(p+))`` of the attribute caption p+, the same map
applied to a longer text (:class:`TextFeatureCache`).

Only the few vector_in tensors are read from a FLUX checkpoint
(:func:`load_vector_in`), so ``fit-router`` and ``pretrain`` never load the
12B transformer. Everything is read from local safetensors files: nothing is
downloaded and pickle weights are refused.

The router (k-means centroids over the neutral features of every distinct
training word) is stored in its own small safetensors file
(:func:`save_router_file`); pre-training and training copy it into every
adapter checkpoint they write.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ModAdapterError
from ..safetensors_io import load_safetensors_checked, read_safetensors_header, save_safetensors

ROUTER_FORMAT = "mod-adapter-router"
ROUTER_FORMAT_VERSION = "1"
CLIP_MAX_TOKENS = 77

# vector_in tensor names, diffusers layout -> BFL layout.
_DIFFUSERS_VECTOR_IN = "time_text_embed.text_embedder."
_VECTOR_IN_NAMES = {
    "linear_1.weight": "vector_in.in_layer.weight",
    "linear_1.bias": "vector_in.in_layer.bias",
    "linear_2.weight": "vector_in.out_layer.weight",
    "linear_2.bias": "vector_in.out_layer.bias",
}
_BFL_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------


def vector_in_of(transformer: nn.Module) -> nn.Module:
    """FLUX's vector_in (768 -> width MLP) inside a diffusers ``FluxTransformer2DModel``."""
    embedder = getattr(getattr(transformer, "time_text_embed", None), "text_embedder", None)
    if embedder is None or not hasattr(embedder, "linear_1") or not hasattr(embedder, "linear_2"):
        raise ModAdapterError(
            f"{type(transformer).__name__} has no time_text_embed.text_embedder (FLUX's vector_in); "
            "give a diffusers FluxTransformer2DModel"
        )
    return embedder


def _module_device_dtype(module: nn.Module) -> Tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def clip_pooled(texts: Sequence[str], clip_text_model: nn.Module, clip_tokenizer, *, batch_size: int = 64) -> torch.Tensor:
    """CLIP-L pooled embeddings (len(texts), 768) as FluxPipeline computes ``pooled_prompt_embeds``.

    Returned float32 on the text model's device.
    """
    texts = list(texts)
    if not texts:
        raise ModAdapterError("no texts to encode")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ModAdapterError(f"text {index} is empty; every concept word and caption must contain a word")
    device, _ = _module_device_dtype(clip_text_model)
    max_length = min(int(getattr(clip_tokenizer, "model_max_length", CLIP_MAX_TOKENS) or CLIP_MAX_TOKENS), CLIP_MAX_TOKENS)
    outputs = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = clip_tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        result = clip_text_model(ids.to(device), output_hidden_states=False)
        pooled = getattr(result, "pooler_output", None)
        if pooled is None:
            raise ModAdapterError(f"{type(clip_text_model).__name__} gives no pooler_output; use transformers' CLIPTextModel")
        outputs.append(pooled.float())
    return torch.cat(outputs)


@torch.no_grad()
def project_pooled(pooled: torch.Tensor, text_embedder: nn.Module) -> torch.Tensor:
    """M(pooled): FLUX's vector_in applied to CLIP pooled embeddings; float32."""
    device, dtype = _module_device_dtype(text_embedder)
    expected = text_embedder.linear_1.in_features
    if pooled.shape[-1] != expected:
        raise ModAdapterError(
            f"the CLIP text encoder gives {pooled.shape[-1]}-d pooled embeddings but FLUX's vector_in expects "
            f"{expected}; use the CLIP-L text encoder of this FLUX model"
        )
    out = text_embedder(pooled.to(device=device, dtype=dtype)).float()
    if not torch.isfinite(out).all():
        raise ModAdapterError("vector_in produced NaN or Inf; check the FLUX and CLIP-L weights (or use float32)")
    return out


def neutral_features(words: Sequence[str], clip_text_model: nn.Module, clip_tokenizer, text_embedder: nn.Module,
                     *, batch_size: int = 64) -> torch.Tensor:
    """n = M(CLIP(word)) for every bare concept word: (W, width) float32."""
    words = [w.strip() if isinstance(w, str) else w for w in words]
    return project_pooled(clip_pooled(words, clip_text_model, clip_tokenizer, batch_size=batch_size), text_embedder)


class LruTextCache:
    """Values computed per distinct text on first use and kept, least recently used evicted.

    ``compute`` maps a list of texts to their values, in order, in one batch.
    ``max_items=0`` keeps nothing (every call recomputes); ``None`` keeps all.
    """

    def __init__(self, compute: Callable[[List[str]], Sequence[Any]], max_items: Optional[int]):
        self.compute = compute
        self.max_items = max_items
        self._items: "collections.OrderedDict[str, Any]" = collections.OrderedDict()

    def get(self, texts: Sequence[str]) -> List[Any]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._items]
        computed = dict(zip(missing, self.compute(missing))) if missing else {}
        out = []
        for text in texts:
            if text in self._items:
                self._items.move_to_end(text)
                value = self._items[text]
            else:
                value = computed[text]
                if self.max_items is None or self.max_items > 0:
                    self._items[text] = value
            out.append(value)
        while self.max_items is not None and len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return out


class TextFeatureCache:
    """M(CLIP(text)) per text (the pre-training targets of attribute captions p+), as (len, width) float32 on the CPU."""

    def __init__(self, clip_text_model: nn.Module, clip_tokenizer, text_embedder: nn.Module, max_items: Optional[int] = 4096):
        def compute(texts: List[str]) -> torch.Tensor:
            return project_pooled(clip_pooled(texts, clip_text_model, clip_tokenizer), text_embedder).cpu()

        self._cache = LruTextCache(compute, max_items)

    def get(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack(self._cache.get(texts))


# --------------------------------------------------------------------------
# Loading CLIP-L and vector_in from local files
# --------------------------------------------------------------------------


def _snapshot_folder(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        raise ModAdapterError(
            f"'{repo_id}' is not a local folder or file and is not in the local Hugging Face cache ({type(exc).__name__}). "
            f"Nothing is downloaded here: download it first (`huggingface-cli download {repo_id}`) or give a local path."
        ) from None


def _local_folder(path: str, what: str) -> str:
    if os.path.isdir(path):
        return path
    if _REPO_ID.match(path) and not os.path.exists(path):
        return _snapshot_folder(path)
    raise ModAdapterError(f"{what} '{path}' is not an existing folder (or a Hugging Face repo id in the local cache)")


def load_clip_text_encoder(path: str, *, device="cpu", dtype: torch.dtype = torch.float32):
    """(CLIPTextModel, CLIPTokenizer) from a local folder.

    ``path``: a transformers CLIP(-L) text model folder holding its tokenizer
    files, or a diffusers FLUX folder (its ``text_encoder/`` and ``tokenizer/``),
    or a repo id already in the local Hugging Face cache. Weights must be
    safetensors.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = _local_folder(path, "CLIP-L text encoder")
    model_dir, tokenizer_dir = folder, folder
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        model_dir, tokenizer_dir = os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModAdapterError(f"cannot load the CLIP tokenizer from '{tokenizer_dir}' ({type(exc).__name__}: {exc}); "
                              "the folder needs vocab.json and merges.txt") from None
    try:
        model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModAdapterError(f"cannot load a CLIP text model from '{model_dir}' ({type(exc).__name__}: {exc}); "
                              "it needs config.json and model.safetensors (pickle .bin weights are refused)") from None
    return model.to(device).eval().requires_grad_(False), tokenizer


def _transformer_weight_files(flux: str) -> List[str]:
    """Safetensors files that may hold FLUX's vector_in, most likely first."""
    if os.path.isfile(flux):
        if not flux.lower().endswith((".safetensors", ".sft")):
            raise ModAdapterError(f"'{flux}' is not a .safetensors file; give a FLUX.1 transformer file or a diffusers folder")
        return [flux]
    folder = _local_folder(flux, "--flux")
    transformer_dir = os.path.join(folder, "transformer") if os.path.isdir(os.path.join(folder, "transformer")) else folder
    index = os.path.join(transformer_dir, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, "r", encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map", {})
        wanted = {weight_map.get(_DIFFUSERS_VECTOR_IN + name) for name in _VECTOR_IN_NAMES} - {None}
        return [os.path.join(transformer_dir, name) for name in sorted(wanted)]
    files = sorted(f for f in os.listdir(transformer_dir) if f.endswith(".safetensors"))
    if not files:
        raise ModAdapterError(f"no .safetensors transformer weights in '{transformer_dir}'")
    return [os.path.join(transformer_dir, f) for f in files]


def load_vector_in(flux: str, *, device="cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """FLUX's vector_in alone, read from the transformer's safetensors file(s).

    ``flux``: a diffusers FLUX folder (or its ``transformer/`` folder), a
    single transformer file in diffusers or BFL/ComfyUI layout, or a repo id
    in the local Hugging Face cache. Returns a ``PixArtAlphaTextProjection``
    (the module diffusers uses) in eval mode without gradients.
    """
    from diffusers.models.embeddings import PixArtAlphaTextProjection

    found: Dict[str, torch.Tensor] = {}
    for path in _transformer_weight_files(flux):
        _, header = read_safetensors_header(path, kind="FLUX.1 transformer", error_cls=ModAdapterError)
        names: Dict[str, str] = {}
        for ours, bfl in _VECTOR_IN_NAMES.items():
            candidates = [_DIFFUSERS_VECTOR_IN + ours] + [p + bfl for p in _BFL_PREFIXES]
            hit = next((c for c in candidates if c in header), None)
            if hit is not None:
                names[ours] = hit
        if names:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as handle:
                for ours, stored in names.items():
                    found[ours] = handle.get_tensor(stored)
        if len(found) == len(_VECTOR_IN_NAMES):
            break
    missing = sorted(set(_VECTOR_IN_NAMES) - set(found))
    if missing:
        raise ModAdapterError(
            f"'{flux}' holds no FLUX vector_in weights ({', '.join(_DIFFUSERS_VECTOR_IN + m for m in missing)} or "
            f"vector_in.in_layer/out_layer); give a FLUX.1 transformer (diffusers folder or single file)"
        )
    for name, tensor in found.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor.float()).all():
            raise ModAdapterError(f"'{flux}': vector_in tensor {name} holds NaN/Inf or is not floating point")
    hidden, in_features = found["linear_1.weight"].shape
    module = PixArtAlphaTextProjection(in_features, hidden, out_features=found["linear_2.weight"].shape[0], act_fn="silu")
    module.load_state_dict({k: v.to(torch.float32) for k, v in found.items()})
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def read_flux_transformer_config(flux: str, components: Optional[str] = None) -> Dict[str, Any]:
    """The FLUX transformer's sizes without loading it: ``num_layers``, ``num_single_layers``,
    ``width``, ``pooled_projection_dim``, ``joint_attention_dim``, ``guidance_embeds``.

    Read from ``transformer/config.json`` of a diffusers folder (or of
    ``components`` for a single file); otherwise counted from a single file's tensor names.
    """
    candidates = []
    for base in (flux, components):
        if base and not os.path.isfile(base):
            try:
                folder = _local_folder(base, "--flux")
            except ModAdapterError:
                continue
            candidates += [os.path.join(folder, "transformer", "config.json"), os.path.join(folder, "config.json")]
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as handle:
                cfg = json.load(handle)
            if "num_layers" in cfg and "num_single_layers" in cfg:
                return {
                    "num_layers": int(cfg["num_layers"]),
                    "num_single_layers": int(cfg["num_single_layers"]),
                    "width": int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128)),
                    "pooled_projection_dim": int(cfg.get("pooled_projection_dim", 768)),
                    "joint_attention_dim": int(cfg.get("joint_attention_dim", 4096)),
                    "guidance_embeds": bool(cfg.get("guidance_embeds", False)),
                }
    if os.path.isfile(flux):
        _, header = read_safetensors_header(flux, kind="FLUX.1 transformer", error_cls=ModAdapterError)
        double = {int(m.group(1)) for n in header for m in [re.search(r"(?:double_blocks|transformer_blocks)\.(\d+)\.", n)] if m}
        single = {int(m.group(1)) for n in header for m in [re.search(r"(?:single_blocks|single_transformer_blocks)\.(\d+)\.", n)] if m}
        width = None
        for name, (_, shape) in header.items():
            if name.endswith(("vector_in.out_layer.weight", "text_embedder.linear_2.weight")):
                width = shape[0]
        if double and single and width:
            return {"num_layers": max(double) + 1, "num_single_layers": max(single) + 1, "width": int(width),
                    "pooled_projection_dim": 768, "joint_attention_dim": 4096,
                    "guidance_embeds": any("guidance_in" in n or "guidance_embedder" in n for n in header)}
    raise ModAdapterError(f"cannot read the FLUX transformer's configuration from '{flux}'"
                          + (f" or '{components}'" if components else "") + "; give a diffusers FLUX folder")


# --------------------------------------------------------------------------
# Router files
# --------------------------------------------------------------------------


def distinct_words(words: Sequence[str]) -> List[str]:
    """The distinct concept words, stripped, in first-seen order."""
    return list(dict.fromkeys(w.strip() for w in words))


def save_router_file(path, centroids: torch.Tensor, *, seed: int, words: Sequence[str], base_model: str,
                     text_encoder: str = "") -> None:
    """Write k-means centroids (k, width) with what they were fitted on."""
    if centroids.dim() != 2:
        raise ModAdapterError(f"router centroids must be (k, width), got {tuple(centroids.shape)}")
    words = list(words)
    digest = hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()
    metadata = {
        "format": ROUTER_FORMAT,
        "format_version": ROUTER_FORMAT_VERSION,
        "router": json.dumps({"num_centroids": int(centroids.shape[0]), "fitted": True, "seed": int(seed),
                              "num_words": len(words), "words_sha256": digest}, sort_keys=True),
        "words": json.dumps(words),
        "base_model": base_model,
        "text_encoder": text_encoder,
    }
    save_safetensors(path, {"centroids": centroids.detach().float().cpu()}, metadata)


def load_router_file(path) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(centroids (k, width) float32, router info) from :func:`save_router_file`'s file."""
    if not os.path.isfile(os.fspath(path)):
        raise ModAdapterError(f"router file '{path}' does not exist; create it with `mod-adapter fit-router`")
    tensors, metadata = load_safetensors_checked(path, kind="router file", error_cls=ModAdapterError)
    if metadata.get("format") != ROUTER_FORMAT or "centroids" not in tensors:
        raise ModAdapterError(f"'{path}' is not a Mod-Adapter router file (format {metadata.get('format')!r}); "
                              "create one with `mod-adapter fit-router`")
    if metadata.get("format_version") != ROUTER_FORMAT_VERSION:
        raise ModAdapterError(f"router file '{path}' has format_version {metadata.get('format_version')!r}; "
                              f"this version reads {ROUTER_FORMAT_VERSION!r}")
    try:
        info = json.loads(metadata["router"])
        info["words"] = json.loads(metadata.get("words", "[]"))
    except (KeyError, ValueError) as exc:
        raise ModAdapterError(f"router file '{path}' has damaged metadata ({exc})") from None
    info["base_model"] = metadata.get("base_model", "")
    return tensors["centroids"].float(), info


def router_checkpoint_info(info: Dict[str, Any]) -> Dict[str, Any]:
    """The ``router`` metadata entry of an adapter checkpoint, from a router file's info."""
    return {key: info[key] for key in ("num_centroids", "fitted", "seed", "num_words", "words_sha256") if key in info}
