"""Modulation Apply: the prompt's concept tokens get vec + s·Δ_i; returns the patched MODEL and the prompt's CONDITIONING."""

import torch
from comfy_api.latest import io

from ..modules.comfy_flux_host import ComfyConcept, apply_concepts, prompt_fingerprint
from ..modules.concept_set import check_unique_words, resolve_concepts
from ..modules.errors import ModAdapterError, ModelMismatchError
from ..modules.token_positions import ConceptQuery, TextSequenceLayout, find_concept_positions
from .sockets import CATEGORY, ConceptsSocket


def clip_t5_layout(clip) -> TextSequenceLayout:
    t5 = getattr(getattr(clip, "tokenizer", None), "t5xxl", None)
    if t5 is None:
        raise ModelMismatchError("Modulation Apply needs FLUX's text encoders (DualCLIPLoader with clip_l + t5xxl, "
                                 "type flux, or a FLUX checkpoint's CLIP): this CLIP has no T5 tokenizer.")
    return TextSequenceLayout.from_comfy_tokenizer(t5)


def modulation_apply(model, clip, text, concepts, start_percent=0.0, end_percent=1.0, occurrence=0,
                     conditioning=None):
    """Returns (patched MODEL, CONDITIONING). A given `conditioning` must encode `text` and is passed
    through unchanged, so that bypassing this node gives back exactly the unpatched graph."""
    if start_percent > end_percent:
        raise ModAdapterError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): "
                              f"the concepts would never act. Set start_percent <= end_percent.")
    encoded = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    if conditioning is None:
        conditioning = encoded
    elif not _same_prompt(conditioning, encoded):
        raise ModAdapterError("The CONDITIONING connected to Modulation Apply is not the encoding of its text: "
                              "connect the CLIP Text Encode of the same prompt, or leave the input empty.")
    resolved = resolve_concepts(concepts)
    if not resolved:
        return model, conditioning
    check_unique_words([c.word for c in resolved])
    queries = [ConceptQuery(c.word, occurrence or None) for c in resolved]
    positions = find_concept_positions(clip_t5_layout(clip), text, queries)
    patched = apply_concepts(
        model,
        [ComfyConcept(delta=c.delta, positions=p, strength=c.strength, start_percent=start_percent,
                      end_percent=end_percent, name=c.word, region=concepts.regions[i])
         for i, (c, p) in enumerate(zip(resolved, positions))],
        prompt_fingerprint=prompt_fingerprint(encoded[0][0]),
    )
    return patched, conditioning


def _same_prompt(conditioning, encoded) -> bool:
    try:
        given, expected = conditioning[0][0], encoded[0][0]
    except (TypeError, IndexError, KeyError):
        return False
    return tuple(given.shape) == tuple(expected.shape) and bool(
        torch.allclose(prompt_fingerprint(given), prompt_fingerprint(expected), rtol=1e-3, atol=1e-4))


def _common_inputs():
    return [
        io.Model.Input("model", tooltip="A FLUX.1 model (dev, schnell or a fine-tune); it is cloned, not changed."),
        io.Clip.Input("clip", tooltip="FLUX's text encoders (clip_l + t5xxl)."),
        io.String.Input("text", multiline=True, dynamic_prompts=True, default="a photo of a dog",
                        tooltip="The prompt. Every concept word must appear in it; its tokens carry the concept."),
        ConceptsSocket.Input("concepts", tooltip="From Mod-Adapter Predictor or Load Concept."),
        io.Conditioning.Input("conditioning", optional=True,
                              tooltip="Optional: the CLIP Text Encode of this same text. It is passed through, so "
                                      "bypassing this node leaves the graph exactly as without Mod-Adapter."),
    ]


_OUTPUTS = [
    io.Model.Output(display_name="MODEL", tooltip="The model with the concepts applied to the prompt's tokens."),
    io.Conditioning.Output(display_name="CONDITIONING", tooltip="The prompt's conditioning: use it as the "
                           "positive input of the sampler (the concepts act only on this prompt)."),
]


class ModAdapterModulationApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterModulationApply",
            display_name="Mod-Adapter Modulation Apply",
            category=CATEGORY,
            description="Applies the concepts to the prompt's concept words for the whole sampling schedule.",
            inputs=_common_inputs(),
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, clip, text, concepts, conditioning=None) -> io.NodeOutput:
        return io.NodeOutput(*modulation_apply(model, clip, text, concepts, conditioning=conditioning))


class ModAdapterModulationApplyAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterModulationApplyAdvanced",
            display_name="Mod-Adapter Modulation Apply (Advanced)",
            category=CATEGORY,
            description="Applies the concepts for part of the schedule, optionally to one occurrence of each word.",
            inputs=_common_inputs() + [
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the schedule where the concepts act (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the schedule where the concepts act (1 = last step)."),
                io.Int.Input("occurrence", default=0, min=0, max=16,
                             tooltip="0: every occurrence of each concept word; n: only the n-th."),
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, clip, text, concepts, start_percent, end_percent, occurrence,
                conditioning=None) -> io.NodeOutput:
        return io.NodeOutput(*modulation_apply(model, clip, text, concepts, start_percent, end_percent, occurrence,
                                               conditioning=conditioning))
