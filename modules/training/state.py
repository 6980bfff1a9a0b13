"""Saving and restoring training state without pickle: safetensors + JSON.

A training run is resumable only if everything that decides its next step is
saved: the optimizer's moments, the learning-rate scheduler, the step and data
position, and the random number generators. ``torch.save`` would pickle all of
that; pickle files run code when loaded, so this pack never writes or reads
them. Instead every state is turned into a *tree* of JSON values whose tensors
are replaced by references into a flat ``{name: tensor}`` dict:

* tensors -> ``{"__tensor__": name}`` (stored in a safetensors file);
* tuples -> ``{"__tuple__": [...]}`` (AdamW's ``betas``, RNG states);
* dicts with non-string keys -> ``{"__dict__": [[key, value], ...]}``
  (``optimizer.state_dict()["state"]`` is keyed by parameter index);
* numpy arrays -> ``{"__ndarray__": name, "dtype": "uint32"}`` (numpy's RNG
  state; stored as a tensor of the same width);
* floats that JSON cannot hold (inf, nan) -> ``{"__float__": "inf"}``.

:func:`encode_tree` / :func:`decode_tree` do this for any such structure, so
the optimizer and scheduler state dicts round-trip exactly (the tensors bit
for bit). Files are written atomically by :func:`.safetensors_io.save_safetensors`
and read back through :func:`.safetensors_io.load_safetensors_checked`.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Dict, Optional, Tuple

import torch

from ..atomic_file import atomic_write_text
from ..errors import ModAdapterError
from ..safetensors_io import load_safetensors_checked, save_safetensors


class TrainingStateError(ModAdapterError):
    """A training-state file cannot be used to resume."""


STATE_FORMAT = "mod-adapter-training-state"
RNG_FORMAT = "mod-adapter-rng-state"
STATE_VERSION = "1"

_SAVABLE_NUMPY_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "float32", "float64", "bool")


# --------------------------------------------------------------------------
# Trees of JSON + tensors
# --------------------------------------------------------------------------


def encode_tree(obj: Any, tensors: Dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-serialisable copy of ``obj``; its tensors go to ``tensors`` under names starting with ``prefix``."""
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}#{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        import numpy as np

        array = np.ascontiguousarray(obj)
        dtype = str(array.dtype)
        if dtype not in _SAVABLE_NUMPY_DTYPES:
            raise TrainingStateError(f"cannot save a numpy array of dtype {dtype} in a training state")
        if array.ndim == 0:
            return {"__npscalar__": array.item(), "dtype": dtype}
        name = f"{prefix}#{len(tensors)}"
        if array.dtype.kind in "iu" and array.dtype.itemsize < 8:
            array = array.astype(np.int64)  # exact, and every safetensors reader knows I64
        tensors[name] = torch.from_numpy(array.copy())
        return {"__ndarray__": name, "dtype": dtype}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, prefix) for k, v in obj.items()}
        return {"__dict__": [[encode_tree(k, tensors, prefix), encode_tree(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    raise TrainingStateError(
        f"cannot save a value of type {type(obj).__name__} in a training state (only tensors, numbers, strings, "
        f"lists, tuples and dicts)"
    )


def decode_tree(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        name = obj["__tensor__"]
        if name not in tensors:
            raise TrainingStateError(f"the training state refers to tensor {name!r}, which its tensor file lacks")
        return tensors[name]
    if "__ndarray__" in obj:
        import numpy as np

        name = obj["__ndarray__"]
        if name not in tensors:
            raise TrainingStateError(f"the training state refers to array {name!r}, which its tensor file lacks")
        return tensors[name].numpy().astype(np.dtype(obj["dtype"]), copy=True)
    if "__npscalar__" in obj:
        import numpy as np

        return np.dtype(obj["dtype"]).type(obj["__npscalar__"])
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__dict__"]}
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------


def capture_rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> Dict[str, Any]:
    """The states of torch (CPU and every CUDA device), python ``random``, numpy and ``generators``."""
    state: Dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is a dependency, but the state is optional
        pass
    state["generators"] = {name: g.get_state() for name, g in (generators or {}).items()}
    return state


def restore_rng_state(state: Dict[str, Any], generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Put back what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        saved = list(state["torch_cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in saved])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name].to(torch.uint8))


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def save_state_files(folder, stem: str, info: Dict[str, Any], tree: Dict[str, Any], *, kind: str = STATE_FORMAT) -> None:
    """Write ``<stem>.safetensors`` (the tensors of ``tree``) and ``<stem>.json`` (``info`` + the encoded tree).

    The JSON is written last and atomically: a folder whose JSON exists holds a complete state.
    """
    os.makedirs(folder, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    encoded = encode_tree(tree, tensors, "state")
    tensor_file = f"{stem}.safetensors"
    save_safetensors(os.path.join(folder, tensor_file), tensors, {"format": kind, "format_version": STATE_VERSION})
    document = {"format": kind, "format_version": STATE_VERSION, "tensors": tensor_file, **info, "state": encoded}
    atomic_write_text(os.path.join(folder, f"{stem}.json"),
                      json.dumps(document, indent=1, sort_keys=True, allow_nan=False))


def load_state_files(folder, stem: str, *, kind: str = STATE_FORMAT) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read what :func:`save_state_files` wrote: ``(info, tree)`` with tensors on the CPU."""
    json_path = os.path.join(folder, f"{stem}.json")
    if not os.path.isfile(json_path):
        raise TrainingStateError(f"{json_path} does not exist: {folder} holds no complete {kind} (was the save interrupted?)")
    try:
        with open(json_path, "r", encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as exc:
        raise TrainingStateError(f"cannot read {json_path} ({exc}); the training state is damaged") from None
    if not isinstance(document, dict) or document.get("format") != kind:
        raise TrainingStateError(f"{json_path} is not a {kind} file (its format is {document.get('format') if isinstance(document, dict) else None!r})")
    if document.get("format_version") != STATE_VERSION:
        raise TrainingStateError(f"{json_path} has format_version {document.get('format_version')!r}; this version reads {STATE_VERSION!r}")
    tensor_path = os.path.join(folder, document.get("tensors", f"{stem}.safetensors"))
    tensors, metadata = load_safetensors_checked(tensor_path, kind=kind, error_cls=TrainingStateError)
    if metadata.get("format") != kind:
        raise TrainingStateError(f"{tensor_path} is not a {kind} tensor file")
    tree = decode_tree(document.pop("state"), tensors)
    return document, tree


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` with a clear error when the parameters do not match."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise TrainingStateError(f"the saved optimizer state does not fit this adapter ({exc}); resume with the same adapter config") from None
