"""Learning concepts on diffusers' FLUX.1: the denoiser and what the CLI needs around it.

:class:`DiffusersDenoiser` implements :class:`.learn_concept.Denoiser` on a
``FluxTransformer2DModel`` with :class:`.diffusers_flux_host.DiffusersFluxConcepts`.
The rest is the `mod-adapter learn` command: it loads FLUX (:mod:`.flux_diffusers`,
the plumbing training shares), prepares the concept images and encodes the
caption and images once, so that only the transformer stays in memory while
learning.
"""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .concept_file import word_file_stem
from .devices import resolve_device
from .diffusers_flux_host import DiffusersFluxConcepts
from .dtypes import resolve_dtype
from .errors import ModAdapterError
from .flux_diffusers import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    DEFAULT_TRAINING_GUIDANCE,
    encode_caption,
    fit_image,
    flux_modulation_vector,
    flux_velocity,
    load_flux_pipeline,
    load_t5_tokenizer,
    resolve_flux_source,
    vae_encode,
)
from .token_modulation import TokenConcept

# --------------------------------------------------------------------------
# The denoiser
# --------------------------------------------------------------------------


class DiffusersDenoiser:
    """:class:`.learn_concept.Denoiser` on a diffusers ``FluxTransformer2DModel``.

    prompt_embeds: (1, L, joint_attention_dim) T5 output of the caption;
    pooled_prompt_embeds: (1, pooled_projection_dim) CLIP-L pooled output.
    The concept modulation is installed on ``transformer`` until :meth:`close`
    (or the end of a ``with`` block). Gradient checkpointing
    (``transformer.enable_gradient_checkpointing()``) is supported.
    """

    def __init__(self, transformer: torch.nn.Module, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                 *, guidance: float = DEFAULT_TRAINING_GUIDANCE, device=None):
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise ModAdapterError(f"prompt_embeds must be one caption's (1, tokens, dim), got {tuple(prompt_embeds.shape)}")
        if pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[0] != 1:
            raise ModAdapterError(
                f"pooled_prompt_embeds must be one caption's (1, dim), got {tuple(pooled_prompt_embeds.shape)}")
        self.transformer = transformer
        first = next(transformer.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.host = DiffusersFluxConcepts(transformer)
        self.layout = self.host.layout
        self.prompt_embeds = prompt_embeds.detach().to(self.device, self.dtype)
        self.pooled_prompt_embeds = pooled_prompt_embeds.detach().to(self.device, self.dtype)
        # Schnell has no guidance embedding: passing a guidance value would be ignored at best.
        self.guidance = float(guidance) if getattr(transformer.config, "guidance_embeds", False) else None

    def velocity(self, noisy_latents: torch.Tensor, sigma: torch.Tensor, deltas: Sequence[torch.Tensor],
                 token_positions: Sequence[Sequence[int]]) -> torch.Tensor:
        concepts = [TokenConcept(delta=delta, positions=list(pos), name=f"concept {k + 1}")
                    for k, (delta, pos) in enumerate(zip(deltas, token_positions))]
        with self.host.using(concepts):
            return flux_velocity(self.transformer, noisy_latents.to(self.device), sigma, self.prompt_embeds,
                                 self.pooled_prompt_embeds, self.guidance)

    def with_caption(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> "DiffusersDenoiser":
        """The same model and concept host on another caption (more images' own caption, or an isolation partner's
        composed caption). It shares
        this denoiser's host: close this one, not the copy."""
        other = copy.copy(self)
        other.prompt_embeds = prompt_embeds.detach().to(self.device, self.dtype)
        other.pooled_prompt_embeds = pooled_prompt_embeds.detach().to(self.device, self.dtype)
        return other

    @torch.no_grad()
    def modulation_vector(self, noisy_latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return flux_modulation_vector(self.transformer, sigma, self.pooled_prompt_embeds, self.guidance)

    def model_parameters(self) -> Iterable[torch.Tensor]:
        return self.transformer.parameters()

    def close(self) -> None:
        self.host.remove()

    def __enter__(self) -> "DiffusersDenoiser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# Concept images
# --------------------------------------------------------------------------


def load_concept_images(paths: Sequence[str], resolution: int) -> Tuple[torch.Tensor, List[str]]:
    """Load images as (N, 3, R, R) pixels in [-1, 1] (what FLUX's VAE encodes).

    Every image is made ``resolution`` × ``resolution`` by :func:`fit_image`
    (images of different sizes and aspect ratios are accepted); the returned
    notes say which ones changed.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise ModAdapterError(
            f"The resolution must be a multiple of 16 (FLUX: 8× VAE downsampling, then 2×2 patches), got {resolution!r}; "
            f"use e.g. 512."
        )
    if not paths:
        raise ModAdapterError("Give at least one concept image")
    pixels, notes = [], []
    for path in paths:
        if not os.path.isfile(path):
            raise ModAdapterError(f"Concept image '{path}' does not exist")
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ModAdapterError(f"Cannot read concept image '{path}' ({exc}); give a PNG, JPEG or WebP image") from None
        image, note = fit_image(image, resolution)
        if note:
            notes.append(f"{os.path.basename(path)}: {note}")
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
        pixels.append(data.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(pixels), notes


# --------------------------------------------------------------------------
# Images + caption + words -> concept files (the `mod-adapter learn` command)
# --------------------------------------------------------------------------


def plan_output_paths(out: str, words: Sequence[str], *, overwrite: bool = False) -> List[str]:
    """Concept file path of each word; checked before any work starts.

    ``out`` ending in .safetensors is the file of the only word; anything else
    is a folder (created if needed) that receives ``<word>.safetensors`` per word.
    """
    if out.lower().endswith(".safetensors"):
        if len(words) != 1:
            raise ModAdapterError(
                f"--out '{out}' is one file but {len(words)} words are learned; give a folder instead "
                f"(each word is saved as <folder>/<word>.safetensors)"
            )
        if os.path.isdir(out):
            raise ModAdapterError(f"--out '{out}' is an existing folder; give a file name or another folder")
        paths = [out]
    else:
        if os.path.exists(out) and not os.path.isdir(out):
            raise ModAdapterError(f"--out '{out}' exists and is not a folder; give a folder or a .safetensors file name")
        paths = [os.path.join(out, f"{word_file_stem(w)}.safetensors") for w in words]
        if len(set(paths)) != len(paths):
            raise ModAdapterError(f"The words {list(words)} give the same file names in '{out}'; learn them separately")
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise ModAdapterError(f"{', '.join(existing)} already exist(s); choose another --out or pass --overwrite")
    return paths


@dataclass
class LearnFilesReport:
    paths: List[str]  # the concept files written (empty when stopped)
    stopped: bool
    steps_done: int
    final_loss: Optional[float]
    eval_loss: Optional[float]  # held-out loss with the learned Δ
    eval_loss_without: Optional[float]  # the same draws without concepts


def resolve_device_dtype(device: str, dtype: str) -> Tuple[torch.device, torch.dtype]:
    resolved_device = resolve_device(device)
    return resolved_device, resolve_dtype(dtype, resolved_device)


def _check_request(words: Sequence[str], max_sequence_length: int) -> List[str]:
    """What a user can get wrong in the words and the text length; the words, stripped."""
    words = [w.strip() for w in words]
    if not words or not all(words):
        raise ModAdapterError("Give at least one concept word (--word), e.g. --word dog")
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not 16 <= max_sequence_length <= 512:
        raise ModAdapterError(f"max_sequence_length must be between 16 and 512 T5 tokens, got {max_sequence_length!r}")
    return words


@dataclass
class _EncodedRun:
    """What the learning run needs once the text encoders and the VAE are gone."""

    transformer: torch.nn.Module  # frozen, on the run's device
    texts: List[Tuple[torch.Tensor, torch.Tensor]]  # per distinct caption: (T5, CLIP-L pooled)
    latents: torch.Tensor  # the concept images
    flipped_latents: torch.Tensor  # their mirror images
    partners: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # isolation: (T5, pooled, latents (1, C, H, W))
    negatives: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # the same for each negative image


def _encode_and_keep_the_transformer(source, dtype: torch.dtype, device: torch.device, captions: Sequence[str],
                                     max_sequence_length: int, pixels: torch.Tensor, gradient_checkpointing: bool,
                                     partners: Sequence[Tuple[str, torch.Tensor]] = (),
                                     negatives: Sequence[Tuple[str, torch.Tensor]] = ()) -> _EncodedRun:
    """Encode the captions and the images (and their mirror images) once, and each isolation partner's composed
    caption and image and each negative image and its caption, then free the text encoders and the VAE."""
    pipe = load_flux_pipeline(source, dtype)
    texts = [encode_caption(pipe, text, device, max_sequence_length) for text in captions]
    pipe.vae.to(device)
    latents = vae_encode(pipe.vae, pixels, device, one_at_a_time=True).cpu()
    flipped_latents = vae_encode(pipe.vae, pixels.flip(-1), device, one_at_a_time=True).cpu()
    encoded_partners, encoded_negatives = ([(*encode_caption(pipe, text, device, max_sequence_length),
                                             vae_encode(pipe.vae, image[None], device, one_at_a_time=True).cpu())
                                            for text, image in pairs] for pairs in (partners, negatives))
    transformer = pipe.transformer
    del pipe  # the text encoders and the VAE are not needed any more
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    transformer.to(device)
    transformer.requires_grad_(False)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return _EncodedRun(transformer, texts, latents, flipped_latents, encoded_partners, encoded_negatives)


def _learned_source(result, config, images, captions, words, resolution, flux, isolation, negatives, eval_loss,
                    eval_without) -> dict:
    """The concept file's ``source``: how it was learned, from what (``caption``: the first image's; ``captions``,
    one per image, when they differ)."""
    source = {
        "kind": "learned", "method": "tokenverse", "steps": result.steps_done,
        "stage1_steps": min(config.stage1_steps, result.steps_done), "images": len(images),
        "image_files": [os.path.basename(p) for p in images], "caption": captions[0], "words": words,
        **result.rate_record(config), "batch_size": config.batch_size, "seed": config.seed, "resolution": resolution,
        "flux": os.path.basename(os.path.normpath(flux)),
    }
    if len(set(captions)) > 1:
        source["captions"] = list(captions)
    if isolation:
        source.update(isolation_images=[os.path.basename(p) for p, _ in isolation],
                      isolation_captions=[text for _, text in isolation],
                      isolation_probability=config.isolation_probability)
    if negatives:
        source.update(negative_images=[os.path.basename(p) for p, _ in negatives],
                      negative_captions=[text for _, text in negatives],
                      negative_probability=config.negative_probability, negative_weight=config.negative_weight)
    if eval_loss is not None:
        source.update(eval_loss=round(eval_loss, 6), eval_loss_without=round(eval_without, 6))
    return source


def learn_concept_files(
    flux: str,
    images: Sequence[str],
    caption: Union[str, Sequence[str]],
    words: Sequence[str],
    out: str,
    *,
    config=None,
    components: Optional[str] = None,
    resolution: int = 512,
    device: str = "auto",
    dtype: str = "auto",
    gradient_checkpointing: bool = True,
    guidance: float = DEFAULT_TRAINING_GUIDANCE,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    eval_draws: int = 8,
    overwrite: bool = False,
    show_progress: bool = True,
    should_stop=None,
    log=print,
    isolation: Sequence[Tuple[str, str]] = (),
    negatives: Sequence[Tuple[str, str]] = (),
) -> LearnFilesReport:
    """Learn one concept file per word of ``caption`` from ``images`` with FLUX.1 (diffusers).

    Everything a user can get wrong (paths, words, resolution, output files)
    is checked before the models are loaded. Files are written only after the
    whole run succeeded: a stop request or a diverging loss writes nothing.
    caption: one caption for every image, or one per image (the same concepts seen in other settings: each
    image is denoised under its own caption, :class:`~.learn_concept.CaptionedImages`). Every caption must
    contain every word.
    isolation: (image file, its caption) pairs for TokenVerse's concept-isolation loss
    (:class:`~.learn_concept.IsolationPartner`); they are composed with the images of the first image's caption.
    negatives: (image file, its caption) pairs of images without the concepts, each caption containing every
    word (``learn_concepts``' ``negatives``).
    """
    from .concept import Concept
    from .concept_file import save_concept
    from .learn_concept import (
        CaptionedImages,
        IsolationPartner,
        LearnConfig,
        captions_per_image,
        composed_caption,
        evaluate_loss,
        group_by_caption,
        learn_concepts,
    )
    from .token_positions import TextSequenceLayout, find_concept_positions

    config = config or LearnConfig()
    config.validate()
    words = _check_request(words, max_sequence_length)
    captions = captions_per_image(caption, len(images))
    paths = plan_output_paths(out, words, overwrite=overwrite)
    run_device, run_dtype = resolve_device_dtype(device, dtype)
    source = resolve_flux_source(flux, components)
    pixels, notes = load_concept_images(images, resolution)
    for note in notes:
        log(f"note: {note}")

    # FluxPipeline pads and truncates T5 to max_sequence_length: the layout says so.
    layout = TextSequenceLayout.from_hf_tokenizer(load_t5_tokenizer(source), "t5", min_length=max_sequence_length,
                                                  max_length=max_sequence_length)
    groups = group_by_caption(captions)  # caption -> its images; the first image's caption is the main one
    positions_of = {text: find_concept_positions(layout, text, words) for text in groups}
    main_caption = captions[0]
    positions = positions_of[main_caption]
    for text, text_positions in positions_of.items():
        where = f" in {text!r}" if len(groups) > 1 else ""
        for word, pos in zip(words, text_positions):
            log(f"word {word!r}{where}: T5 tokens {pos}")
    partner_pixels = load_concept_images([image for image, _ in isolation], resolution)[0] if isolation else []
    partners = [(composed_caption(layout, main_caption, text), image)
                for (_, text), image in zip(isolation, partner_pixels)]
    negative_positions = [find_concept_positions(layout, text, words) for _, text in negatives]
    negative_pixels = load_concept_images([image for image, _ in negatives], resolution)[0] if negatives else []

    log(f"loading FLUX.1 from {source.transformer_file or source.components} ({run_dtype}, {run_device})")
    run = _encode_and_keep_the_transformer(source, run_dtype, run_device, list(groups), max_sequence_length, pixels,
                                           gradient_checkpointing, partners,
                                           [(text, image) for (_, text), image in zip(negatives, negative_pixels)])
    # Per caption: (T5, pooled, positions, its images' latents, their mirror images').
    grouped = [(*run.texts[g], positions_of[text], run.latents[indices], run.flipped_latents[indices])
               for g, (text, indices) in enumerate(groups.items())]
    embeds, pooled, _, latents, flipped_latents = grouped[0]

    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="learn concept", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

    eval_loss = eval_without = None
    try:
        with DiffusersDenoiser(run.transformer, embeds, pooled, guidance=guidance,
                               device=run_device) as denoiser:
            isolation_partners = [IsolationPartner(denoiser.with_caption(partner_embeds, partner_pooled), positions,
                                                   image)
                                  for partner_embeds, partner_pooled, image in run.partners]
            more_images = [CaptionedImages(denoiser.with_caption(e, p), pos, lat, flip)
                           for e, p, pos, lat, flip in grouped[1:]]
            negative_images = [CaptionedImages(denoiser.with_caption(e, p), pos, lat)
                               for (e, p, lat), pos in zip(run.negatives, negative_positions)]
            result = learn_concepts(denoiser, latents, positions, config, words=words,
                                    flipped_latents=flipped_latents, progress=progress, should_stop=should_stop,
                                    isolation=isolation_partners, more_images=more_images,
                                    negatives=negative_images)
            if not result.stopped and eval_draws > 0:
                # The mean over every image, each under its own caption.
                views = [(denoiser, latents, positions)] + [(m.denoiser, m.latents, m.positions) for m in more_images]
                eval_loss = sum(evaluate_loss(d, x, result.deltas, pos, seed=config.seed, num_draws=eval_draws)
                                * x.shape[0] for d, x, pos in views) / len(images)
                eval_without = sum(evaluate_loss(d, x, None, pos, seed=config.seed, num_draws=eval_draws)
                                   * x.shape[0] for d, x, pos in views) / len(images)
            num_double_blocks = denoiser.layout.num_double_blocks
    finally:
        if bar is not None:
            bar.close()
    final_loss = result.losses[-1] if result.losses else None
    if result.vec_rms is not None:
        log(f"learning rate {result.lr:.4g}: {config.relative_lr:g} × this model's rms(vec), {result.vec_rms:.4g}")
    if result.stopped:
        log(f"stopped after {result.steps_done} of {config.steps} steps; nothing was saved")
        return LearnFilesReport([], True, result.steps_done, final_loss, None, None)
    if eval_loss is not None:
        change = 100.0 * (eval_loss - eval_without) / eval_without if eval_without else 0.0
        log(f"held-out denoising loss ({eval_draws} draws): {eval_loss:.5f} with the learned concepts, "
            f"{eval_without:.5f} without ({change:+.1f}%)")

    learned_source = _learned_source(result, config, images, captions, words, resolution, flux, isolation, negatives,
                                     eval_loss, eval_without)
    concepts = [Concept(word=w, delta=d, source=dict(learned_source)) for w, d in zip(words, result.deltas)]
    for path, concept in zip(paths, concepts):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        save_concept(path, concept, num_double_blocks=num_double_blocks)
        log(f"saved {concept.word!r} to {path}")
    return LearnFilesReport(paths, False, result.steps_done, final_loss, eval_loss, eval_without)
