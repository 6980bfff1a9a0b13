"""Learn Concept: tune concept directions on reference images (TokenVerse mode), no adapter needed."""

import contextlib

import comfy.model_management as mm
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io

from ..modules.comfy_learn_host import ComfyFluxDenoiser
from ..modules.concept import Concept
from ..modules.concept_file import new_concept_path, save_concept
from ..modules.concept_images import check_image_batch
from ..modules.concept_set import ConceptList, comma_separated_words, resolve_concepts
from ..modules.curve_plot import loss_panel, render_panels
from ..modules.errors import ModAdapterError
from ..modules.learn_concept import (
    RELATIVE_LR,
    CaptionedImages,
    IsolationPartner,
    LearnConfig,
    caption_lines,
    composed_caption,
    group_by_caption,
    learn_concepts,
)
from ..modules.learn_memory import check_learn_fits, estimate_learn_peak
from ..modules.token_positions import find_concept_positions
from .model_folders import CONCEPT_FOLDER, default_folder
from .modulation_apply import clip_t5_layout
from .sockets import CATEGORY, ConceptsSocket


def parse_words(words: str):
    parsed = comma_separated_words(words)
    if not parsed:
        raise ModAdapterError("Give at least one concept word to learn (comma-separated, e.g. 'dog, beach').")
    return parsed


def encode_caption(clip, text: str):
    """(T5 context, CLIP-L pooled) of one caption, as FLUX's conditioning carries them."""
    with torch.no_grad():
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return conditioning[0][0].clone(), conditioning[0][1]["pooled_output"]


def isolation_partners(denoiser, clip, vae, model, caption: str, positions, images, captions: str, resolution: int):
    """TokenVerse's isolation partners from the node's optional second image set: one caption per line, one per
    image, or one line for every image."""
    lines = [line.strip() for line in (captions or "").splitlines() if line.strip()]
    if len(lines) == 1:
        lines = lines * images.shape[0]
    if len(lines) != images.shape[0]:
        raise ModAdapterError(f"{images.shape[0]} isolation image(s) need isolation_captions: one line that says what "
                              f"they show, or one line per image (got {len(lines)} lines).")
    latents, _ = images_to_latents(vae, model, images, resolution, mirrored=False)
    layout = clip_t5_layout(clip)
    partners = []
    for index, text in enumerate(lines):
        partner = denoiser.with_caption(*encode_caption(clip, composed_caption(layout, caption, text)))
        partners.append(IsolationPartner(partner, positions, latents[index:index + 1].to(denoiser.device)))
    return partners, lines


OFFLOAD_WEIGHTS_HINT = "turn on offload_weights"


def refuse_runs_that_cannot_fit(layout, weight_dtype, compute_dtype, device, total_bytes: int, resolution: int,
                                gradient_checkpointing: bool, isolation: bool, concepts: int,
                                offload_weights: bool = False):
    """Before anything runs: an error naming the setting that would fit when the estimated peak
    (:func:`~..modules.learn_memory.estimate_learn_peak`) exceeds the GPU's memory. The CPU is not refused:
    its memory is the machine's, which ComfyUI does not budget."""
    if offload_weights and not gradient_checkpointing:
        # Without the rebuild, autograd keeps every layer's device copy of its weight until the backward: all of them.
        raise ModAdapterError("offload_weights saves memory only with gradient_checkpointing: turn "
                              "gradient_checkpointing on, or offload_weights off.")
    if torch.device(device).type != "cuda":
        return None
    estimate = estimate_learn_peak(resolution, weight_dtype, compute_dtype, gradient_checkpointing=gradient_checkpointing,
                                   offload_weights=offload_weights, layout=layout, concepts=concepts,
                                   isolation=isolation,
                                   weights_copied=True)  # the ComfyUI host copies every weight for autograd
    return check_learn_fits(estimate, total_bytes, device_name=f"this GPU ({device})", can_offload=True,
                            offload_hint=OFFLOAD_WEIGHTS_HINT)


def load_for_learning(model_patcher, offload_weights: bool) -> None:
    """Put the model on its device for the learning loop.

    offload_weights, as ComfyUI's own trainer does it (comfy_extras/nodes_train.py): asking for more memory than
    any GPU has leaves resident only the share of the weights ComfyUI's low-VRAM loader allows, and the rest
    stays in CPU RAM and is cast to the device layer by layer, in the forward and again in each checkpointed
    block's rebuild during the backward, so that at most one block's copies are held at a time."""
    if offload_weights:
        mm.load_models_gpu([model_patcher], memory_required=1e20, force_full_load=False)
    else:
        mm.load_models_gpu([model_patcher])


def images_to_latents(vae, model, image, resolution: int, mirrored: bool = True):
    """Resize + centre-crop every image to resolution², VAE-encode, and bring into the model's latent space:
    (latents, latents of the mirror images, or None without ``mirrored``)."""
    image = check_image_batch(image)
    pixels = comfy.utils.common_upscale(image.movedim(-1, 1), resolution, resolution, "bilinear", "center").movedim(1, -1)
    with torch.no_grad():
        latents = model.model.process_latent_in(vae.encode(pixels)).float().clone()
        if not mirrored:
            return latents, None
        flipped = model.model.process_latent_in(vae.encode(pixels.flip(2)))
    return latents, flipped.float().clone()


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's training switch, on for exactly the enclosed learning loop.

    Since 0.3.7x ComfyUI's FLUX runs RoPE through comfy-kitchen kernels that have
    no autograd formula unless `comfy.model_management.in_training` is set; its own
    trainer (comfy_extras/nodes_train.py) sets it around its loop the same way.
    The previous value comes back on success, error and Cancel, so that sampling
    afterwards takes the fast inference kernels again. Versions without the
    switch need none.
    """
    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def loss_curve_image(losses, stage1_steps: int = 0) -> torch.Tensor:
    markers = [(stage1_steps + 1, "stage 2: per-block offsets")] if 0 < stage1_steps < len(losses) else []
    image = render_panels([loss_panel(list(range(1, len(losses) + 1)), losses, markers)], "Learn Concept",
                          panel_height=260)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def images_under_other_captions(denoiser, clip, images_of, positions_of, latents, flipped):
    """The batch's images whose caption line is not the first image's, one group per caption
    (:class:`CaptionedImages`), each under its own caption. images_of: caption -> its images' indices, the first
    image's caption first (:func:`group_by_caption`); positions_of: caption -> the words' token positions."""
    return [CaptionedImages(denoiser.with_caption(*encode_caption(clip, text)), positions_of[text],
                            latents[indices], flipped[indices])
            for text, indices in list(images_of.items())[1:]]


def learn_concept(model, clip, vae, image, caption, words, steps, stage1_steps, learning_rate, seed,
                  resolution=512, stage1_t_min=0.8, stage2_t_max=0.8, guidance=3.5, gradient_checkpointing=True,
                  init_concepts=None, save=False, filename_prefix="learned", flip_images=True, isolation_images=None,
                  isolation_captions="", offload_weights=False):
    words = parse_words(words)
    image = check_image_batch(image)
    captions = caption_lines(caption, image.shape[0])  # one per image
    caption = captions[0]  # the first image's: the main caption, which isolation partners extend
    images_of = group_by_caption(captions)
    layout = clip_t5_layout(clip)
    # every caption is checked before anything is encoded or learned
    positions_of = {text: find_concept_positions(layout, text, words) for text in images_of}
    positions = positions_of[caption]
    denoiser = ComfyFluxDenoiser(model, *encode_caption(clip, caption), guidance,
                                 gradient_checkpointing=gradient_checkpointing)
    refuse_runs_that_cannot_fit(denoiser.layout, model.model.get_dtype(), denoiser.compute_dtype, denoiser.device,
                                mm.get_total_memory(denoiser.device), resolution, gradient_checkpointing,
                                isolation_images is not None, len(words), offload_weights)

    init = None
    if init_concepts is not None:
        by_word = {c.word.strip().lower(): c for c in resolve_concepts(init_concepts)}
        init = [by_word[w.lower()].delta * by_word[w.lower()].strength if w.lower() in by_word else None for w in words]

    latents, flipped = images_to_latents(vae, model, image, resolution)
    more_images = images_under_other_captions(denoiser, clip, images_of, positions_of, latents.to(denoiser.device),
                                              flipped.to(denoiser.device))
    main = images_of[caption]
    # 0 asks for the learning-rate rule: RELATIVE_LR × this model's rms(vec), measured when the run starts.
    config = LearnConfig(steps=steps, stage1_steps=min(stage1_steps, steps), lr=learning_rate or None, seed=seed,
                         stage1_sigma_range=(stage1_t_min, 1.0), stage2_sigma_range=(0.0, stage2_t_max),
                         flip_probability=0.5 if flip_images else 0.0)
    partners, partner_captions = [], []
    if isolation_images is not None:
        partners, partner_captions = isolation_partners(denoiser, clip, vae, model, caption, positions,
                                                        isolation_images, isolation_captions, resolution)
    load_for_learning(denoiser.model_patcher, offload_weights)
    progress = comfy.utils.ProgressBar(steps)
    with comfy_training_mode():
        result = learn_concepts(
            denoiser, latents[main].to(denoiser.device), positions, config, words=words,
            flipped_latents=flipped[main].to(denoiser.device), init=init,
            progress=lambda step, total, loss: progress.update_absolute(step, total),
            should_stop=mm.processing_interrupted, isolation=partners, more_images=more_images,
        )
    if result.stopped:
        mm.throw_exception_if_processing_interrupted()  # ComfyUI's own interrupt: nothing is returned or saved
        raise ModAdapterError("Learning stopped before the last step; nothing was saved.")

    source = {"kind": "learned", "method": "tokenverse", "steps": result.steps_done,
              "images": int(image.shape[0]), "caption": caption, **result.rate_record(config)}
    if more_images:
        source["captions"] = captions
    if partners:
        source.update(isolation_captions=partner_captions, isolation_probability=config.isolation_probability)
    concepts = [Concept(word=w, delta=d, strength=1.0, source=source, num_double_blocks=_double_blocks(model))
                for w, d in zip(words, result.deltas)]
    if save:
        folder = default_folder(CONCEPT_FOLDER)
        for concept in concepts:
            save_concept(new_concept_path(folder, filename_prefix, concept.word), concept)
    return ConceptList(tuple(concepts)), loss_curve_image(result.losses, config.stage1_steps)


def _double_blocks(model) -> int:
    return len(model.get_model_object("diffusion_model").double_blocks)


class ModAdapterLearnConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ModAdapterLearnConcept",
            display_name="Mod-Adapter Learn Concept",
            category=f"{CATEGORY}/concepts",
            description="Learns concept directions from one or a few images by tuning (TokenVerse recipe): "
                        "no Mod-Adapter checkpoint needed. Slow: minutes on a large GPU.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.1 model (also fp8 / GGUF); it is not changed."),
                io.Clip.Input("clip", tooltip="FLUX's text encoders (clip_l + t5xxl)."),
                io.Vae.Input("vae", tooltip="FLUX's VAE, to encode the images."),
                io.Image.Input("image", tooltip="The concept image(s); a batch is several views of the same "
                                                "concepts. For a lighting or a pose, two or three images that share "
                                                "it (with stage2_t_max 1.0) carried it further than one on the toy "
                                                "world."),
                io.String.Input("caption", multiline=True, default="a photo of a dog on a beach",
                                tooltip="A caption of the image that contains every concept word. For a batch of "
                                        "views in different settings, one line per image in the batch's order "
                                        "(each image is learned under its own line; every line names every word)."),
                io.String.Input("words", default="dog", tooltip="Concept words to learn, comma-separated. Several "
                                "words from one image decompose it (e.g. 'dog, beach')."),
                io.Int.Input("steps", default=1400, min=1, max=20000, tooltip="Total optimisation steps (paper: 1400)."),
                io.Int.Input("stage1_steps", default=800, min=0, max=20000,
                             tooltip="Steps of stage 1: one global direction per word (paper: 800). The rest add "
                                     "per-block offsets."),
                # step and round 1e-6: the frontend rounds to the step's decimals (1e-4 made 5e-5 into 1e-4)
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-6,
                               tooltip=f"Adam learning rate of the directions. 0 (default) = automatic: "
                                       f"{RELATIVE_LR:g} × the scale (rms) of this model's modulation vector, which "
                                       f"Δ is added to, so one default fits the toy world and FLUX.1. A number "
                                       f"(down to 0.000001) overrides it; if the loss diverges, lower it."),
                # No "control after generate": the frontend would re-seed (and so re-learn) on every Run.
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Same seed, same result: the seed stays as set, so running the graph again "
                                     "reuses the learned concepts instead of learning again."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=16,
                             tooltip="Images are resized and centre-cropped to this square size."),
                io.Float.Input("stage1_t_min", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Stage 1 draws 92% of its timesteps from [this, 1] (paper: 0.8)."),
                io.Float.Input("stage2_t_max", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Stage 2 draws 92% of its timesteps from [0, this] (paper: 0.8). 1.0 carried a "
                                       "lighting and a pose better on the toy world, most with two or three images "
                                       "(docs/results.md)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute blocks in the backward pass: much less memory, ~30% slower."),
                io.Boolean.Input("save", default=False, tooltip="Also save the learned concepts to models/mod_concepts."),
                io.String.Input("filename_prefix", default="learned", tooltip="File name start when saving."),
                io.Boolean.Input("flip_images", default=True,
                                 tooltip="Also learn from the images mirrored left to right (half the steps). Turn it "
                                         "off for concepts that have a side: a pose, a light from the left."),
                io.Image.Input("isolation_images", optional=True,
                               tooltip="Optional other concept images (TokenVerse's concept isolation): on half the "
                                       "steps the concept image is learned beside one of them, and the learned "
                                       "concepts must leave it as the model draws it, so that they stay on their "
                                       "own subject when combined with other concepts. Twice the cost of a step."),
                io.String.Input("isolation_captions", optional=True, multiline=True, default="",
                                tooltip="What the isolation images show: one line for all, or one line per image "
                                        "(e.g. 'a red teapot'). The learning caption is extended with ' and <line>'."),
                io.Boolean.Input("offload_weights", default=False, optional=True,
                                 tooltip="Keep the weights that do not fit in CPU RAM and bring them to the GPU layer "
                                         "by layer (ComfyUI's low-VRAM loading, as its own trainer offloads): for "
                                         "GPUs the run does not fit otherwise. Slower; needs gradient_checkpointing."),
                ConceptsSocket.Input("init_concepts", optional=True,
                                     tooltip="Optional starting point, e.g. a Mod-Adapter prediction of the same words: "
                                             "a few refinement steps then suffice."),
            ],
            outputs=[
                ConceptsSocket.Output(display_name="CONCEPTS", tooltip="One learned concept per word: connect them to "
                                      "Modulation Apply, or save them with Save Concept."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, caption, words, steps, stage1_steps, learning_rate, seed, resolution,
                stage1_t_min, stage2_t_max, gradient_checkpointing, save, filename_prefix, flip_images=True,
                init_concepts=None, isolation_images=None, isolation_captions="", offload_weights=False) -> io.NodeOutput:
        with torch.inference_mode(False):  # ComfyUI executes nodes under inference mode; learning needs autograd
            concepts, curve = learn_concept(model, clip, vae, image, caption, words, steps, stage1_steps,
                                            learning_rate, seed, resolution, stage1_t_min, stage2_t_max,
                                            gradient_checkpointing=gradient_checkpointing,
                                            init_concepts=init_concepts, save=save, filename_prefix=filename_prefix,
                                            flip_images=flip_images, isolation_images=isolation_images,
                                            isolation_captions=isolation_captions, offload_weights=offload_weights)
        return io.NodeOutput(concepts, curve)
