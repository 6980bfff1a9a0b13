"""The Mod-Adapter checkpoint format: one self-describing safetensors file.

Tensors: the adapter's state dict (every weight plus the ``router_centroids``
buffer, which is always stored float32). String metadata:

=================  ==========================================================
``format``         ``"mod-adapter"``
``format_version`` ``"1"``
``config``         JSON of :meth:`ModAdapterConfig.to_dict`
``router``         JSON ``{"num_centroids", "fitted", "seed", "num_words"}``
``base_model``     e.g. ``"flux1-dev"``
``image_encoder``  JSON, e.g. ``{"name": "openai/clip-vit-large-patch14",
                   "layer": "penultimate", "tokens": 257, "width": 1024}``
``training``       JSON summary (steps, dataset, loss...), ``{}`` if none
``parameter_count`` number of parameters (router centroids excluded), decimal
=================  ==========================================================

Loading never unpickles anything (the safe reader is
:mod:`.safetensors_io`) and checks that the file is what its metadata says
before any weight is used: unknown format or version, missing or extra
tensors, wrong shapes, NaN/Inf weights and metadata that contradicts the
weights are refused with a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from .adapter import ROUTER_BUFFER, ModAdapter
from .config import ModAdapterConfig
from .errors import CheckpointError, ConfigError
from .safetensors_io import DTYPE_SIZES, load_safetensors_checked, read_safetensors_header, save_safetensors

FORMAT_NAME = "mod-adapter"
FORMAT_VERSION = "1"
CHECKPOINT_KIND = "Mod-Adapter checkpoint"
REQUIRED_METADATA = ("format", "format_version", "config", "router", "base_model", "image_encoder", "training", "parameter_count")
_JSON_METADATA = ("config", "router", "image_encoder", "training")


@dataclass(frozen=True)
class AdapterHeader:
    """A checkpoint's validated header (read once, without the weights): what a loader needs to decide how to
    load it (:attr:`weight_dtype`), and what :func:`load_adapter_checkpoint` then reuses."""

    path: str
    metadata: Dict[str, str]  # as stored
    parsed: Dict[str, Any]  # the metadata's JSON fields parsed, the config as a ModAdapterConfig
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]]  # name: (dtype as in the header, shape)

    @property
    def weight_dtype(self) -> torch.dtype:
        """What the weights load as unless a dtype is asked for (the router centroids aside)."""
        return _stored_weight_dtype(d for name, (d, _) in self.tensors.items() if name != ROUTER_BUFFER)


@dataclass
class LoadedAdapter:
    adapter: ModAdapter  # in eval mode
    config: ModAdapterConfig
    metadata: Dict[str, Any]  # JSON fields parsed; parameter_count as int
    path: str


def _error(path, problem: str, advice: str = "") -> CheckpointError:
    advice = advice or "Use an unmodified Mod-Adapter checkpoint (a .safetensors file saved by this pack)."
    return CheckpointError(f"Cannot use {CHECKPOINT_KIND} '{os.fspath(path)}': {problem}. {advice}")


def _short_list(names, limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _expected_shapes(config: ModAdapterConfig) -> Dict[str, Tuple[int, ...]]:
    # Built on the meta device: no memory, no initialisation, even for 1.67B parameters.
    with torch.device("meta"):
        model = ModAdapter(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _count_parameters(shapes: Dict[str, Tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for name, shape in shapes.items() if name != ROUTER_BUFFER)


def _infer_sizes(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """Config sizes implied by the tensor shapes (only those that can be read off)."""
    sizes: Dict[str, int] = {}

    def shape(name):
        return shapes.get(name)

    expert_ids = {int(m.group(1)) for n in shapes for m in [re.match(r"experts\.(\d+)\.", n)] if m}
    if expert_ids:
        sizes["num_experts"] = max(expert_ids) + 1
    block_ids = {int(m.group(1)) for n in shapes for m in [re.match(r"blocks\.(\d+)\.", n)] if m}
    sizes["num_cross_attention_blocks"] = (max(block_ids) + 1) if block_ids else 0
    if shape("image_proj.weight") and len(shape("image_proj.weight")) == 2:
        sizes["hidden_dim"], sizes["image_token_dim"] = shape("image_proj.weight")
    if shape("neutral_norm.weight") and len(shape("neutral_norm.weight")) == 1:
        sizes["modulation_dim"] = shape("neutral_norm.weight")[0]
    queries = shape("neutral_to_queries.weight")
    if queries and len(queries) == 2 and sizes.get("hidden_dim") and queries[0] % sizes["hidden_dim"] == 0:
        sizes["num_blocks"] = queries[0] // sizes["hidden_dim"]
    fc1 = shape("experts.0.fc1.weight")
    if fc1 and len(fc1) == 2:
        sizes["expert_hidden_dim"] = fc1[0]
    centroids = shape(ROUTER_BUFFER)
    if centroids and len(centroids) == 2:
        sizes["router_centroids"] = centroids[0]
    return sizes


def _parse_metadata(path, metadata: Dict[str, str]) -> Dict[str, Any]:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if "format" not in metadata:
        raise _error(path, "it has no 'format' metadata, so it is not a Mod-Adapter checkpoint (perhaps a FLUX model, a LoRA or a concept file)",
                     "Load it with the node meant for that kind of file, or pick a Mod-Adapter checkpoint.")
    if metadata["format"] != FORMAT_NAME:
        raise _error(path, f"its format is {metadata['format']!r}, not {FORMAT_NAME!r}",
                     "Load it with the node meant for that kind of file, or pick a Mod-Adapter checkpoint.")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _error(path, f"its format_version is {metadata.get('format_version')!r}; this version of the pack reads version {FORMAT_VERSION!r}",
                     "Update Mod-Adapter for ComfyUI (a newer checkpoint) or re-save the checkpoint with this version.")
    if missing:
        raise _error(path, f"its metadata lacks {', '.join(missing)}")
    parsed: Dict[str, Any] = {"format": metadata["format"], "format_version": metadata["format_version"], "base_model": metadata["base_model"]}
    for key in _JSON_METADATA:
        try:
            parsed[key] = json.loads(metadata[key])
        except ValueError as exc:
            raise _error(path, f"its '{key}' metadata is not valid JSON ({exc})") from None
    for key in ("router", "image_encoder", "training"):
        if not isinstance(parsed[key], dict):
            raise _error(path, f"its '{key}' metadata is a JSON {type(parsed[key]).__name__}, not an object")
    try:
        parsed["parameter_count"] = int(metadata["parameter_count"])
    except ValueError:
        raise _error(path, f"its parameter_count metadata {metadata['parameter_count']!r} is not an integer") from None
    try:
        parsed["config"] = ModAdapterConfig.from_dict(parsed["config"])
    except ConfigError as exc:
        raise _error(path, f"its config metadata is invalid ({exc})") from None
    for key, value in metadata.items():
        if key not in REQUIRED_METADATA:
            parsed.setdefault(key, value)  # extra string metadata is kept as is
    return parsed


def _validate_against_weights(path, parsed: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]]) -> None:
    config: ModAdapterConfig = parsed["config"]
    # Contradictions first, as named sizes: clearer than a list of 200 missing keys.
    inferred = _infer_sizes(shapes)
    contradictions = []
    for field, value in inferred.items():
        expected = config.num_experts if field == "router_centroids" else getattr(config, field)
        if value != expected:
            label = "router centroid rows" if field == "router_centroids" else field
            contradictions.append(f"{label}: config says {expected}, weights have {value}")
    if contradictions:
        raise _error(path, "its config metadata contradicts its weights (" + "; ".join(contradictions) + ")",
                     "The file was edited or assembled from different adapters; use an unmodified checkpoint.")
    router = parsed["router"]
    if router.get("num_centroids") != config.num_experts:
        raise _error(path, f"its router metadata says {router.get('num_centroids')!r} centroids but the config has {config.num_experts} experts")
    width = parsed["image_encoder"].get("width")
    if width is not None and width != config.image_token_dim:
        raise _error(path, f"its image_encoder metadata says token width {width} but the config says image_token_dim {config.image_token_dim}")

    expected = _expected_shapes(config)
    missing = set(expected) - set(shapes)
    extra = set(shapes) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short_list(missing)}")
        if extra:
            parts.append(f"unexpected tensors: {_short_list(extra)}")
        raise _error(path, "its tensors do not match its config (" + "; ".join(parts) + ")")
    wrong = [f"{name}: expected {expected[name]}, got {shapes[name]}" for name in sorted(expected) if tuple(shapes[name]) != expected[name]]
    if wrong:
        raise _error(path, "tensors have wrong shapes (" + "; ".join(wrong[:8]) + (f"; ... {len(wrong) - 8} more" if len(wrong) > 8 else "") + ")")
    counted = _count_parameters(shapes)
    if counted != parsed["parameter_count"]:
        raise _error(path, f"its parameter_count metadata says {parsed['parameter_count']} but the weights hold {counted} parameters")


# The dtypes docs/formats.md allows for adapter weights (the router centroids are always F32).
WEIGHT_DTYPES = ("F32", "F16", "BF16")


def read_adapter_header(path) -> AdapterHeader:
    """The checkpoint's header, fully validated (format, keys, shapes, dtypes, contradictions); no weights read."""
    metadata, tensors = read_safetensors_header(path, kind=CHECKPOINT_KIND, error_cls=CheckpointError)
    parsed = _parse_metadata(path, metadata)
    shapes = {name: tuple(shape) for name, (_, shape) in tensors.items()}
    for name, (dtype, _) in tensors.items():
        if dtype not in WEIGHT_DTYPES:
            kind = "fp8" if dtype.startswith("F8") else "F64" if dtype == "F64" else "not floating point"
            raise _error(path, f"tensor {name!r} is stored as {dtype} ({kind}); the adapter format holds F32, F16 or "
                               f"BF16 weights only: re-save the checkpoint in one of those")
    _validate_against_weights(path, parsed, shapes)
    return AdapterHeader(os.fspath(path), metadata, parsed, tensors)


def read_adapter_info(path) -> Dict[str, Any]:
    """Metadata, parameter count and bytes per dtype of a checkpoint, without loading weights.

    The header is fully validated (format, keys, shapes, contradictions);
    NaN/Inf values are only found by :func:`load_adapter_checkpoint`.
    """
    header = read_adapter_header(path)
    parsed, tensors = header.parsed, header.tensors
    bytes_by_dtype: Dict[str, int] = {}
    for dtype, shape in tensors.values():
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + math.prod(shape) * DTYPE_SIZES[dtype]
    info = dict(parsed)
    info["config"] = parsed["config"].to_dict()
    info.update(
        path=os.fspath(path),
        file_size=os.path.getsize(path),
        num_tensors=len(tensors),
        parameter_count=_count_parameters({n: s for n, (_, s) in tensors.items()}),
        bytes_by_dtype=bytes_by_dtype,
        # "bfloat16", "float16" or "float32": what the weights load as unless a dtype is asked for
        weight_dtype=str(header.weight_dtype).split(".")[-1],
    )
    return info


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stored_weight_dtype(dtypes: Iterable[str]) -> torch.dtype:
    """The dtype the weights are stored in (the router centroids aside); float32 for a mixed file."""
    stored = {_TORCH_DTYPES[d] for d in dtypes}
    return stored.pop() if len(stored) == 1 else torch.float32


def save_adapter_checkpoint(
    path,
    adapter: ModAdapter,
    *,
    base_model: str,
    image_encoder: Dict[str, Any],
    router_info: Optional[Dict[str, Any]] = None,
    training: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``adapter`` with its self-describing metadata to ``path`` (atomic)."""
    if not isinstance(adapter, ModAdapter):
        raise CheckpointError(f"save_adapter_checkpoint needs a ModAdapter, got {type(adapter).__name__}")
    config = adapter.config
    if not isinstance(base_model, str) or not base_model:
        raise CheckpointError("base_model must be a non-empty string, e.g. 'flux1-dev'")
    if not isinstance(image_encoder, dict) or not image_encoder.get("name"):
        raise CheckpointError("image_encoder must be a dict with at least a 'name', e.g. "
                              "{'name': 'openai/clip-vit-large-patch14', 'layer': 'penultimate', 'tokens': 257, 'width': 1024}")
    if image_encoder.get("width", config.image_token_dim) != config.image_token_dim:
        raise CheckpointError(f"image_encoder width {image_encoder['width']} differs from the adapter's image_token_dim {config.image_token_dim}")
    router = {"num_centroids": config.num_experts, "fitted": False, "seed": None, "num_words": 0}
    if router_info is not None:
        if not isinstance(router_info, dict):
            raise CheckpointError(f"router_info must be a dict, got {type(router_info).__name__}")
        if router_info.get("num_centroids", config.num_experts) != config.num_experts:
            raise CheckpointError(f"router_info num_centroids {router_info['num_centroids']} differs from the adapter's {config.num_experts} experts")
        router.update(router_info)
    if training is not None and not isinstance(training, dict):
        raise CheckpointError(f"training must be a dict, got {type(training).__name__}")

    state = adapter.state_dict()
    state[ROUTER_BUFFER] = state[ROUTER_BUFFER].float()
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to save: adapter tensor {name!r} contains NaN or Inf (the training diverged)")
    try:
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(config.to_dict(), sort_keys=True),
            "router": json.dumps(router, sort_keys=True),
            "base_model": base_model,
            "image_encoder": json.dumps(image_encoder, sort_keys=True),
            "training": json.dumps(training or {}, sort_keys=True),
            "parameter_count": str(adapter.num_parameters()),
        }
    except TypeError as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable ({exc})") from None
    save_safetensors(path, state, metadata)


def load_adapter_checkpoint(path, *, device="cpu", dtype: Optional[torch.dtype] = None,
                            operations=torch.nn, header: Optional[AdapterHeader] = None) -> LoadedAdapter:
    """Load and validate a checkpoint; the adapter comes back in eval mode.

    dtype: the weights' dtype (None = as stored). The router centroids stay float32.
    operations: what builds the layers (see :class:`ModAdapter`; ComfyUI passes one of comfy.ops).
    header: :func:`read_adapter_header` of this file, when the caller read it already (it is not read again).
    """
    if header is None or header.path != os.fspath(path):
        header = read_adapter_header(path)
    parsed = header.parsed
    config: ModAdapterConfig = parsed["config"]
    tensors, _ = load_safetensors_checked(path, kind=CHECKPOINT_KIND, error_cls=CheckpointError, device=device,
                                          header=(header.metadata, header.tensors))
    if dtype is None:
        dtype = header.weight_dtype
    for name in list(tensors):
        tensors[name] = tensors[name].to(dtype=torch.float32 if name == ROUTER_BUFFER else dtype)
    adapter = ModAdapter(config, device="meta", operations=operations)
    # assign=True adopts the loaded tensors instead of copying into meta storage.
    adapter.load_state_dict(tensors, strict=True, assign=True)
    adapter.eval()
    metadata = dict(parsed, config=config.to_dict())
    return LoadedAdapter(adapter=adapter, config=config, metadata=metadata, path=os.fspath(path))
