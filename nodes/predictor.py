"""Mod-Adapter Predictor: adds a concept to the CONCEPTS chain, predicted lazily and batched."""

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..modules.concept_set import PredictionRequest, chain
from ..modules.errors import ModelMismatchError
from ..modules.flux_layout import FluxLayout
from .sockets import CATEGORY, ConceptEmbedsSocket, ConceptsSocket, ModAdapterSocket


def neutral_feature(model, word_pooled: torch.Tensor) -> torch.Tensor:
    """n = FLUX's own vector_in(CLIP-L pooled(word)), (modulation_dim,), computed with the model's weights
    wherever ComfyUI's model management puts them (fp8/GGUF layers cast themselves)."""
    mm.load_models_gpu([model])
    diffusion_model = model.get_model_object("diffusion_model")
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    vec_in_dim = diffusion_model.params.vec_in_dim
    if word_pooled.shape[-1] < vec_in_dim:
        raise ModelMismatchError(f"The word embedding is {word_pooled.shape[-1]} wide but FLUX's vector_in needs "
                                 f"{vec_in_dim}: encode the word with FLUX's CLIP (clip_l + t5xxl, type flux).")
    with torch.no_grad():
        pooled = word_pooled[:, :vec_in_dim].to(model.load_device, dtype)
        return diffusion_model.vector_in(pooled)[0].float().cpu()


def check_adapter_fits(runner, model, embeds) -> None:
    config = runner.config
    FluxLayout.from_comfy_model(model).check_adapter(config, runner.name)
    width = embeds.image_tokens.shape[-1]
    if width != config.image_token_dim:
        encoder = runner.metadata.get("image_encoder", {}) if isinstance(runner.metadata, dict) else {}
        name = encoder.get("name", "its image encoder") if isinstance(encoder, dict) else "its image encoder"
        raise ModelMismatchError(
            f"The CLIP vision model gives {width}-wide image tokens, but the adapter {runner.name} was trained on "
            f"{config.image_token_dim}-wide tokens ({name}): load that CLIP vision model in Load CLIP Vision."
        )


class ModAdapterPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterPredictor",
            display_name="Mod-Adapter Predictor",
            category=f"{CATEGORY}/concepts",
            description="Adds one concept to CONCEPTS. Chain one Predictor per concept: all chained concepts are "
                        "predicted in one batched adapter call when they are applied or saved.",
            inputs=[
                ModAdapterSocket.Input("mod_adapter", tooltip="From Mod-Adapter Loader."),
                io.Model.Input("model", tooltip="The FLUX.1 model you sample with: its vector_in makes the word's "
                               "neutral feature."),
                ConceptEmbedsSocket.Input("concept_embeds", tooltip="From Mod-Adapter Concept Encoder."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=3.0, step=0.05,
                               tooltip="s in vec + s·Δ: 1 is the paper's setting; lower to loosen the concept."),
                ConceptsSocket.Input("concepts", optional=True, tooltip="Concepts to chain onto (e.g. from "
                                     "another Predictor or Load Concept)."),
            ],
            outputs=[ConceptsSocket.Output(display_name="CONCEPTS", tooltip="The chain with this concept added "
                                              "(predicted when applied or saved): connect it to Modulation Apply "
                                              "or to the next Predictor.")],
        )

    @classmethod
    def execute(cls, mod_adapter, model, concept_embeds, strength, concepts=None) -> io.NodeOutput:
        check_adapter_fits(mod_adapter, model, concept_embeds)
        request = PredictionRequest(runner=mod_adapter, embeds=concept_embeds,
                                    neutral=neutral_feature(model, concept_embeds.word_pooled), strength=float(strength))
        return io.NodeOutput(chain(concepts, request))
