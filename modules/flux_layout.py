"""FLUX.1's block layout, from any host, and the one check that a Δ table or an adapter fits a model.

A Mod-Adapter Δ table has one row per block (double-stream blocks first) of the
model's width; an adapter predicts such tables. Every host builds the same
:class:`FluxLayout`: from a ComfyUI MODEL (duck-typed, ComfyUI is never
imported), a diffusers ``FluxTransformer2DModel``, or a diffusers config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import ModelMismatchError


@dataclass(frozen=True)
class FluxLayout:
    num_double_blocks: int
    num_single_blocks: int
    hidden_size: int

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + self.num_single_blocks

    def describe(self) -> str:
        return f"{self.num_double_blocks}+{self.num_single_blocks} blocks of width {self.hidden_size}"

    # -- constructors -------------------------------------------------------------

    @classmethod
    def from_comfy_model(cls, model_patcher) -> "FluxLayout":
        """The layout of a ComfyUI MODEL (a ModelPatcher), checked to be FLUX.1: per-block text modulation
        layers (`double_blocks.i.txt_mod`, `single_blocks.j.modulation`), each with a `lin` projection.

        Raises ModelMismatchError with what was found and what to load instead.
        """
        get = getattr(model_patcher, "get_model_object", None)
        if get is None:
            raise ModelMismatchError(f"Expected a ComfyUI MODEL, got {type(model_patcher).__name__}")
        diffusion_model = get("diffusion_model")
        kind = type(diffusion_model).__name__
        double_blocks = getattr(diffusion_model, "double_blocks", None)
        single_blocks = getattr(diffusion_model, "single_blocks", None)
        if double_blocks is None or single_blocks is None:
            raise ModelMismatchError(
                f"Mod-Adapter needs a FLUX.1 model (dev, schnell or a fine-tune of them), but this MODEL is {kind} "
                f"({type(getattr(model_patcher, 'model', None)).__name__}), which has no FLUX double/single stream "
                f"blocks. Load a FLUX.1 checkpoint with Load Diffusion Model (UNETLoader) or Load Checkpoint."
            )
        if kind == "Chroma" or not all(hasattr(b, "txt_mod") for b in double_blocks):
            raise ModelMismatchError(
                f"This MODEL ({kind}) is FLUX-like but its blocks have no per-block text modulation layer "
                f"(Chroma and FLUX.2 compute modulation once for the whole model). Mod-Adapter predicts one direction "
                f"per FLUX.1 block: load a FLUX.1 model."
            )
        layout = cls(len(double_blocks), len(single_blocks), int(double_blocks[0].txt_mod.lin.in_features))
        for key in comfy_text_modulation_keys(layout):
            if not hasattr(get(key), "lin"):
                raise ModelMismatchError(f"{kind}: {key} is not a modulation layer with a `lin` projection; "
                                         f"this is not FLUX.1")
        return layout

    @classmethod
    def from_diffusers(cls, transformer) -> "FluxLayout":
        """The layout of a diffusers FluxTransformer2DModel (its `norm1_context` / `norm` modulation layers)."""
        double = getattr(transformer, "transformer_blocks", None)
        single = getattr(transformer, "single_transformer_blocks", None)
        if double is None or single is None or not all(hasattr(b, "norm1_context") for b in double) \
                or not all(hasattr(b, "norm") for b in single):
            raise ModelMismatchError(f"Expected a diffusers FluxTransformer2DModel (FLUX.1), got {type(transformer).__name__}")
        return cls(len(double), len(single), int(double[0].norm1_context.linear.in_features))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FluxLayout":
        """From a transformer's sizes (``num_layers``, ``num_single_layers``, ``width``), read without loading it."""
        return cls(int(config["num_layers"]), int(config["num_single_layers"]), int(config["width"]))

    # -- the fit check ----------------------------------------------------------------

    def check_delta(self, shape: Sequence[int], name: str, what: str = "Concept") -> None:
        """A concept's Δ table must have one row per block of this model's width."""
        if tuple(shape) != (self.num_blocks, self.hidden_size):
            found = "×".join(str(n) for n in shape) if len(shape) else "a scalar"
            raise ModelMismatchError(
                f"{what} {name!r} has a Δ table of {found}, but this FLUX model has "
                f"{self.num_double_blocks}+{self.num_single_blocks} = {self.num_blocks} blocks of width "
                f"{self.hidden_size}: it needs ({self.num_blocks}, {self.hidden_size}); every Δ for this model must be a "
                f"({self.num_blocks}, {self.hidden_size}) tensor. The concept was made for a different base model: "
                f"re-create it for this one."
            )

    def check_adapter(self, config, name: str) -> None:
        """An adapter (its ModAdapterConfig) must predict Δ tables of this layout."""
        adapter = FluxLayout(config.num_double_blocks, config.num_blocks - config.num_double_blocks, config.modulation_dim)
        if adapter != self:
            raise ModelMismatchError(
                f"The adapter {name} predicts {adapter.describe()}, but this MODEL has {self.describe()}: use an "
                f"adapter trained for this base model."
            )


def comfy_text_modulation_keys(layout: FluxLayout):
    """ComfyUI's object keys of every block's text modulation layer, in block order."""
    return ([f"diffusion_model.double_blocks.{i}.txt_mod" for i in range(layout.num_double_blocks)]
            + [f"diffusion_model.single_blocks.{j}.modulation" for j in range(layout.num_single_blocks)])
