"""Which torch device a command or a run uses: one rule for "auto" and for a device that is not there.

ComfyUI picks its own device (comfy.model_management); this rule is for the library and the `mod-adapter`
command: Learn Concept, the training loop and the captioner.
"""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ModAdapterError


def resolve_device(device: Optional[str] = "auto", *, error_cls=ModAdapterError) -> torch.device:
    """``auto`` (or None): the current CUDA GPU when there is one, else the CPU. Otherwise the named device
    (cpu, cuda, cuda:1, mps, ...), which must exist here: one clear error otherwise."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise error_cls(f"Unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise error_cls(f"Device {device!r} asked for, but this torch has no CUDA GPU (CUDA is not available); "
                        f"use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise error_cls(f"Device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved
