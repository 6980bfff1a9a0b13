"""A concept: one word of the prompt and its per-block modulation directions.

Both ways of getting a concept produce this object: the adapter predicts Δ from
a concept image (source kind "predicted"), TokenVerse-style tuning learns it
(source kind "learned"). The modulation engine applies ``strength * delta[i]``
to the modulation input of the word's text tokens in block ``i``; the Δ table
has the double-stream blocks first, then the single-stream blocks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .errors import ModAdapterError


def _default_source() -> Dict[str, Any]:
    return {"kind": "unspecified"}


@dataclass
class Concept:
    word: str
    delta: torch.Tensor  # (num_blocks, modulation_dim), floating point
    strength: float = 1.0
    # Where Δ came from, stored in the concept file as JSON, e.g.
    # {"kind": "predicted", "adapter": "mod_adapter.safetensors", "adapter_sha256": "..."}
    # or {"kind": "learned", "steps": 1400, "images": 1}.
    source: Dict[str, Any] = field(default_factory=_default_source)
    base_model: str = "flux1"
    # How many leading Δ rows belong to double-stream blocks (19 for FLUX.1);
    # None = unknown (the concept file writer then assumes FLUX.1).
    num_double_blocks: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ModAdapterError if a field is invalid (also after fields were reassigned)."""
        if not isinstance(self.word, str) or not self.word.strip():
            raise ModAdapterError(
                f"A concept needs a non-empty concept word (the word of the prompt it applies to), got {self.word!r}"
            )
        if not isinstance(self.delta, torch.Tensor):
            raise ModAdapterError(f"Concept {self.word!r}: delta must be a torch.Tensor, got {type(self.delta).__name__}")
        if self.delta.dim() != 2 or self.delta.shape[0] < 1 or self.delta.shape[1] < 1:
            raise ModAdapterError(
                f"Concept {self.word!r}: delta must be a non-empty 2-D table (num_blocks, modulation_dim), "
                f"got shape {tuple(self.delta.shape)}"
            )
        if not self.delta.is_floating_point():
            raise ModAdapterError(f"Concept {self.word!r}: delta must be floating point, got {self.delta.dtype}")
        if not bool(torch.isfinite(self.delta).all()):
            raise ModAdapterError(f"Concept {self.word!r}: delta contains NaN or infinite values")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not math.isfinite(self.strength):
            raise ModAdapterError(f"Concept {self.word!r}: strength must be a finite number, got {self.strength!r}")
        self.strength = float(self.strength)
        if not isinstance(self.source, dict) or not isinstance(self.source.get("kind"), str):
            raise ModAdapterError(
                f"Concept {self.word!r}: source must be a dict with a string 'kind' "
                f"(e.g. 'predicted' or 'learned'), got {self.source!r}"
            )
        try:
            json.dumps(self.source, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ModAdapterError(f"Concept {self.word!r}: source must be JSON-serialisable ({exc})") from None
        if self.num_double_blocks is not None and (
            isinstance(self.num_double_blocks, bool) or not isinstance(self.num_double_blocks, int)
            or not 0 <= self.num_double_blocks <= self.delta.shape[0]
        ):
            raise ModAdapterError(
                f"Concept {self.word!r}: num_double_blocks must be an integer between 0 and {self.delta.shape[0]}, "
                f"got {self.num_double_blocks!r}"
            )
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ModAdapterError(f"Concept {self.word!r}: base_model must be a non-empty string, got {self.base_model!r}")

    @property
    def num_blocks(self) -> int:
        return int(self.delta.shape[0])

    @property
    def modulation_dim(self) -> int:
        return int(self.delta.shape[1])
