"""Concept Encoder: reference image(s) + concept word -> CONCEPT_EMBEDS."""

import comfy.clip_vision
import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..modules.adapter import image_mask_to_token_mask
from ..modules.concept_images import check_image_batch, fit_mask_to_images, preview_with_mask, vit_grid_size
from ..modules.concept_set import ConceptEmbeds
from ..modules.errors import ModAdapterError
from .sockets import CATEGORY, ConceptEmbedsSocket

CROP_MODES = ["center", "none"]


def encode_concept(image, word, clip_vision, clip, mask=None, crop="center"):
    """Returns (ConceptEmbeds, preview IMAGE of exactly what the image encoder saw)."""
    image = check_image_batch(image)
    center_crop = crop == "center"
    output = clip_vision.encode_image(image, crop=center_crop)
    tokens = output["penultimate_hidden_states"].float().cpu()

    size = getattr(clip_vision, "image_size", 224)
    mean = getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073])
    std = getattr(clip_vision, "image_std", [0.26862954, 0.26130258, 0.27577711])
    seen = comfy.clip_vision.clip_preprocess(image.cpu().float(), size=size, mean=mean, std=std, crop=center_crop)
    seen = (seen * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1).movedim(1, -1)

    token_mask = seen_mask = None
    if mask is not None:
        fitted = fit_mask_to_images(mask.cpu(), image)
        # The same resize and crop as the image, so the mask lines up with the patches the encoder saw.
        seen_mask = comfy.clip_vision.clip_preprocess(fitted[..., None].expand(-1, -1, -1, 3), size=size,
                                                      mean=[0.0] * 3, std=[1.0] * 3, crop=center_crop)[:, 0]
        token_mask = image_mask_to_token_mask(seen_mask, grid_size=vit_grid_size(tokens.shape[1]), center_crop=False)

    word = (word or "").strip()
    if not word:
        raise ModAdapterError("The concept word is empty: type the word the prompt uses for this concept (e.g. 'dog').")
    _, pooled = clip.encode_from_tokens(clip.tokenize(word), return_pooled=True)
    if pooled is None:
        raise ModAdapterError("This CLIP gives no pooled embedding; load FLUX's text encoders (clip_l + t5xxl, type flux).")
    embeds = ConceptEmbeds(word=word, image_tokens=tokens, word_pooled=pooled.float().cpu().reshape(1, -1),
                           token_mask=token_mask)
    return embeds, preview_with_mask(seen, seen_mask).to(mm.intermediate_device())


class ModAdapterConceptEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterConceptEncoder",
            display_name="Mod-Adapter Concept Encoder",
            category=f"{CATEGORY}/concepts",
            description="Encodes a concept image (or a batch of references of one concept) and its concept word.",
            inputs=[
                io.Image.Input("image", tooltip="The concept image; a batch is several references of the same concept."),
                io.String.Input("word", default="dog", tooltip="The concept word as it appears in the prompt: an "
                                "object ('dog') or an attribute ('pose', 'lighting', 'surface', 'style')."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter was trained with "
                                    "(e.g. CLIP ViT-L/14), from Load CLIP Vision."),
                io.Clip.Input("clip", tooltip="FLUX's text encoders: the word's CLIP-L pooled embedding is used."),
                io.Combo.Input("crop", options=CROP_MODES, default="center",
                               tooltip="center: resize the short side and crop the middle square (CLIP's default); "
                                       "none: squash the whole image to a square."),
                io.Mask.Input("mask", optional=True, tooltip="Optional: where the concept is in the image (white). "
                              "Image tokens outside it are ignored."),
            ],
            outputs=[
                ConceptEmbedsSocket.Output(display_name="CONCEPT_EMBEDS", tooltip="The concept image's tokens and its "
                                            "word, for one Predictor."),
                io.Image.Output(display_name="encoder_view", tooltip="Exactly what the image encoder saw "
                                "(crop, resize; masked-out areas dimmed)."),
            ],
        )

    @classmethod
    def execute(cls, image, word, clip_vision, clip, crop="center", mask=None) -> io.NodeOutput:
        embeds, preview = encode_concept(image, word, clip_vision, clip, mask=mask, crop=crop)
        return io.NodeOutput(embeds, preview)
