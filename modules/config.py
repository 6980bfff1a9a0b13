"""Configuration of the Mod-Adapter network.

Every size of the network is a field here, so that one class builds both the
paper-sized adapter and the tiny one the tests use, and so that a checkpoint
can describe the network it holds (the config is stored in its metadata).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Dict

from .errors import ConfigError


ROUTERS = ("kmeans", "linear")
IMAGE_READINGS = ("cross_attention", "pooled")
# Keys added after the format's first version: a checkpoint without them holds the paper's design.
ADDED_WITH_DEFAULTS = ("router", "image_reading")


@dataclass(frozen=True)
class ModAdapterConfig:
    # Target DiT. The Δ table has one row per block: the double-stream blocks
    # first (rows 0 .. num_double_blocks-1), then the single-stream blocks.
    num_blocks: int = 57
    num_double_blocks: int = 19
    modulation_dim: int = 3072  # width of FLUX's `vec`, of the neutral feature and of every Δ

    # Image encoder: width of its penultimate-layer tokens (1024 for CLIP ViT-L/14,
    # 1280 for ViT-H/14). The token count is free.
    image_token_dim: int = 1024

    # Adapter body.
    hidden_dim: int = 1536  # width of the block queries and the cross-attention blocks
    num_heads: int = 12  # head width 128
    num_cross_attention_blocks: int = 4  # N' in the paper
    mlp_ratio: float = 4.0  # feed-forward width of the cross-attention blocks, as a multiple of hidden_dim

    # Mixture of experts: each maps a block feature (hidden_dim) to F+ (modulation_dim).
    num_experts: int = 12
    expert_hidden_dim: int = 23296  # sized so the paper preset has ~1.67B parameters (paper: 1.67B)

    # The paper's design, and the ablations it measures against (its Table 3):
    # routing "kmeans" (parameter-free, fitted centroids of the neutral feature) or "linear" (a learned linear
    # gate over the experts, softmax-weighted); image reading "cross_attention" (the block queries attend to
    # the image tokens) or "pooled" (one mean image feature added to every query, no attention).
    router: str = "kmeans"
    image_reading: str = "cross_attention"

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                problems.append(f"{f.name} must be a positive integer, got {value!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if isinstance(self.num_double_blocks, int) and isinstance(self.num_blocks, int) and self.num_double_blocks > self.num_blocks:
            problems.append(f"num_double_blocks ({self.num_double_blocks}) cannot exceed num_blocks ({self.num_blocks})")
        if isinstance(self.hidden_dim, int) and isinstance(self.num_heads, int) and self.num_heads > 0 and self.hidden_dim % self.num_heads:
            problems.append(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.router not in ROUTERS:
            problems.append(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.image_reading not in IMAGE_READINGS:
            problems.append(f"image_reading must be one of {IMAGE_READINGS}, got {self.image_reading!r}")
        if problems:
            raise ConfigError("Invalid Mod-Adapter config: " + "; ".join(problems))

    @property
    def needs_fitted_router(self) -> bool:
        """Whether concepts are routed by fitted k-means centroids (`mod-adapter fit-router`): the paper's design
        with more than one expert."""
        return self.router == "kmeans" and self.num_experts > 1

    @property
    def num_single_blocks(self) -> int:
        return self.num_blocks - self.num_double_blocks

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModAdapterConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"A Mod-Adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown Mod-Adapter config keys {unknown}; known keys are {sorted(known)}")
        missing = sorted(known - set(data) - set(ADDED_WITH_DEFAULTS))  # files written before these existed
        if missing:
            raise ConfigError(f"Mod-Adapter config is missing keys {missing}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str) -> "ModAdapterConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"Unknown Mod-Adapter preset {name!r}; choose one of {sorted(PRESETS)}") from None


PRESETS: Dict[str, ModAdapterConfig] = {
    # The paper's adapter: 57 FLUX.1 blocks, 4 cross-attention blocks, 12 experts,
    # CLIP ViT-L/14 image tokens. Sized to land near the paper's 1.67B parameters
    # (exact count: `mod-adapter info --preset paper`, recorded in docs/benchmarks.md).
    "paper": ModAdapterConfig(),
    # A network small enough for CPU tests, with the same structure.
    "tiny": ModAdapterConfig(
        num_blocks=6,
        num_double_blocks=2,
        modulation_dim=64,
        image_token_dim=32,
        hidden_dim=32,
        num_heads=2,
        num_cross_attention_blocks=2,
        mlp_ratio=2.0,
        num_experts=3,
        expert_hidden_dim=48,
    ),
    # The toy world's FLUX.1 (3 double + 6 single blocks of width 128) and its CLIP vision tokens (width 128):
    # the paper's structure at the world's size (docs/results.md).
    "world": ModAdapterConfig(
        num_blocks=9,
        num_double_blocks=3,
        modulation_dim=128,
        image_token_dim=128,
        hidden_dim=128,
        num_heads=4,
        num_cross_attention_blocks=2,
        mlp_ratio=4.0,
        num_experts=4,
        expert_hidden_dim=512,
    ),
}
