"""The weight files of the world's models during training: float32 safetensors with a format tag, the model's
configs as JSON and the training summary in the metadata (the shipped world is the diffusers export)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import ModAdapterError
from ..safetensors_io import load_safetensors_checked, save_safetensors


def save_world_checkpoint(path: str, module: torch.nn.Module, file_format: str, configs: Dict[str, Any],
                          summary: Dict[str, Any]) -> None:
    # clone: tied weights (T5's embeddings) share storage, which safetensors refuses
    state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    metadata = {"format": file_format, **{name: json.dumps(value) for name, value in configs.items()},
                "training": json.dumps(summary, default=str)}
    save_safetensors(path, state, metadata)


def load_world_checkpoint(path: str, file_format: str, kind: str,
                          configs: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, configs read from the metadata); refuses another format, or other ``configs`` than given."""
    tensors, metadata = load_safetensors_checked(path, kind=kind, error_cls=ModAdapterError)
    if metadata.get("format") != file_format:
        raise ModAdapterError(f"{path} is not a {kind} checkpoint (format {metadata.get('format')!r})")
    read = {name: json.loads(value) for name, value in metadata.items() if name not in ("format", "training")}
    for name, value in (configs or {}).items():
        if read.get(name) != json.loads(json.dumps(value)):
            raise ModAdapterError(f"{path} holds a {kind} of other sizes than this version's ({name} differs)")
    return tensors, read
