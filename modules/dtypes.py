"""Torch dtypes from the names users type, and the one "auto" rule.

Every command-line option, setting and loader of the pack goes through
:func:`resolve_dtype`: the same names everywhere (``bf16`` = ``bfloat16``,
``fp16`` = ``float16`` = ``half``, ``fp32`` = ``float32``) and one ``auto``:
bfloat16 on CUDA, float32 elsewhere (the CPU has no fast bfloat16 matmul and
float16 overflows in FLUX's activations).
"""

from __future__ import annotations

from typing import Optional, Type, Union

import torch

from .errors import ModAdapterError

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def auto_dtype(device: Union[str, torch.device, None]) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(value: Union[str, torch.dtype, None], device: Union[str, torch.device, None] = None, *,
                  what: str = "dtype", error_cls: Type[ModAdapterError] = ModAdapterError) -> torch.dtype:
    """A torch dtype from a dtype, a name, or "auto"/None (then :func:`auto_dtype` of ``device``)."""
    if isinstance(value, torch.dtype):
        return value
    if value is None or str(value).lower() == "auto":
        return auto_dtype(device)
    try:
        return DTYPE_NAMES[str(value).lower()]
    except KeyError:
        raise error_cls(f"unknown {what} {value!r}; use one of {', '.join(sorted(DTYPE_NAMES))} or auto") from None


def optional_dtype(value: Union[str, torch.dtype, None], **kwargs) -> Optional[torch.dtype]:
    """None stays None (keep the stored dtype); anything else as :func:`resolve_dtype`."""
    return None if value is None else resolve_dtype(value, **kwargs)
