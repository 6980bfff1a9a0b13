"""Learn a concept's Δ directions by tuning (TokenVerse mode), independent of the host.

TokenVerse (arXiv 2501.12224) optimises, for one concept image
and its caption, the modulation directions of the caption's concept words with
the ordinary FLUX flow-matching denoising loss:

* stage 1 (``stage1_steps``, paper: 800): one *global* direction per concept
  word, the same for every block; 92% of the timesteps come from
  t ∈ [0.8, 1.0] (the paper's [800, 1000] of 1000), the rest from [0, 1];
* stage 2 (the remaining steps, paper: 600): per-block offsets are added to
  the global direction (zero-initialised, both keep training); 92% of the
  timesteps come from t ∈ [0, 0.8].

Several words of one caption are learned at once (TokenVerse's decomposition:
"a *dog* on a *beach*" gives one Δ for "dog" and one for "beach").

Images of the same concepts under other captions (:class:`CaptionedImages`)
join the run as more training images: a step draws its images from all of
them, each denoised under its own caption. What the images share is then
what the concept words have to carry (a dog seen on a beach and in a room).

Negative images (ours; ``negatives``): images that do *not* show the
concept, under their own captions that name the word. A Δ may lower the
loss of every image, whatever it shows: a correction of the model that any
image takes, not the concept (docs/results.md measures this on the toy world,
where it is most of what a surface Δ learns). On a share of the steps one
negative image is also denoised with and without Δ, and the amount by which
Δ lowers its loss is added to the loss (a hinge: Δ may raise it, as a
concept Δ does on an image of something else).

TokenVerse's concept-isolation loss (:class:`IsolationPartner`): on a share of
the steps the concept image is composed, side by side, with another concept
image, under a caption that names both. The concept's half is denoised as
usual; on the other half the prediction with Δ must equal the model's own
prediction without Δ, so that Δ acts on its own concept only.

The model is reached through a small :class:`Denoiser` protocol, so the same
loop drives diffusers' FluxTransformer2DModel (:mod:`.learn_diffusers`) and
ComfyUI's FLUX (the Learn Concept node). Only Δ receives gradients; the
model's parameters are frozen for the duration of the run.

The loss is FLUX.1's flow-matching loss (:mod:`.flow_matching`); the
transformer receives σ itself as its timestep (diffusers' FluxPipeline passes
``timestep / 1000`` where its scheduler's timesteps are σ·1000).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import (
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

import torch
import torch.nn.functional as F

from .errors import ModAdapterError
from .flow_matching import flow_matching_pair
from .flux_layout import FluxLayout

logger = logging.getLogger(__name__)

# Held-out evaluation draws its noise from a generator seeded with
# seed + EVAL_SEED_OFFSET, so for every training seed below 2**32 the
# evaluation noise is a different stream from the training noise.
EVAL_SEED_OFFSET = 2**32

# The learning-rate rule. Adam moves every coordinate of Δ by about the
# learning rate per step, whatever the gradient's size, and Δ is added to
# FLUX's modulation vector ``vec``: a step means the same to any model when it
# is the same share of that model's own rms(vec). RELATIVE_LR is that share:
# the toy world's best learning rate, 1e-2 (docs/results.md, "The learning
# rate"), over its rms(vec) of 0.80 (learning captions, σ at the SCALE_SIGMAS
# midpoints), rounded. On FLUX.1 the rule gives RELATIVE_LR × FLUX.1's own
# rms(vec), measured on the artist's model when the run starts.
RELATIVE_LR = 0.0125
# rms(vec) is the mean over this many σ, the midpoints of equal bins of [0, 1]: vec changes with σ through the
# time embedding, and both stages together cover [0, 1].
SCALE_SIGMAS = 8


class LearningDivergedError(ModAdapterError):
    """The loss or the gradient became NaN or infinite; nothing was learned or saved."""


@dataclass
class LearnConfig:
    """Settings of one TokenVerse-style learning run.

    Paper numbers (TokenVerse, arXiv 2501.12224): steps 1400 = 800 + 600, the
    stage timestep ranges and their 0.92 probability. Our choices (the
    paper gives none we can cite): Adam with the learning-rate rule (``lr``
    None: ``relative_lr`` × the model's rms(vec), see :data:`RELATIVE_LR`) for
    the global direction and the per-block offsets, gradient-norm clipping at
    1.0, horizontal flips with probability 0.5, batch size 1, σ never below
    ``min_sigma``.
    """

    steps: int = 1400
    stage1_steps: int = 800
    lr: Optional[float] = None  # Adam, global directions; None = relative_lr × rms(vec) of the model
    relative_lr: float = RELATIVE_LR  # the rule's share of rms(vec), used when lr is None
    offset_lr: Optional[float] = None  # Adam, per-block offsets (stage 2); None = the global directions' rate
    stage1_sigma_range: Tuple[float, float] = (0.8, 1.0)
    stage2_sigma_range: Tuple[float, float] = (0.0, 0.8)
    # Probability of drawing σ from the stage's range; otherwise uniform over [0, 1].
    range_probability: float = 0.92
    # A σ of exactly 0 teaches nothing and makes v = (x − x0_pred)/σ (how a host
    # that predicts x0, such as ComfyUI's apply_model, gives v) undefined.
    min_sigma: float = 1e-3
    flip_probability: float = 0.5
    # Share of the steps that compose the concept image with an isolation partner (when partners are given).
    isolation_probability: float = 0.5
    # Negative images (ours, not TokenVerse's): share of the steps that also draw one, and the weight of its term.
    negative_probability: float = 0.5
    negative_weight: float = 1.0
    batch_size: int = 1
    # None disables clipping. With the rule (lr None) the norm is divided by rms(vec): the gradient of Δ scales as
    # 1/rms(vec), and a clipping norm fixed in absolute units would clip one model and not its rescaled twin.
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    log_every: int = 100  # steps between log lines (module logger, INFO); 0 = never

    def validate(self) -> None:
        def fail(message: str) -> ModAdapterError:
            return ModAdapterError(f"Invalid learning setting: {message}")

        for name in ("steps", "stage1_steps", "batch_size", "seed", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(f"{name} must be an integer, got {value!r}")
        if self.steps < 1:
            raise fail(f"steps must be at least 1, got {self.steps}")
        if self.stage1_steps < 0:
            raise fail(f"stage1_steps must be 0 or more, got {self.stage1_steps}")
        if self.batch_size < 1:
            raise fail(f"batch_size must be at least 1, got {self.batch_size}")
        if self.log_every < 0:
            raise fail(f"log_every must be 0 or more, got {self.log_every}")
        for name in ("lr", "relative_lr", "offset_lr"):
            value = getattr(self, name)
            if value is None and name != "relative_lr":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
                raise fail(f"{name} must be a positive number, got {value!r}")
        for name in ("stage1_sigma_range", "stage2_sigma_range"):
            low, high = getattr(self, name)
            if not (0.0 <= low < high <= 1.0):
                raise fail(f"{name} must be (low, high) with 0 <= low < high <= 1, got {(low, high)!r}")
        if not (isinstance(self.negative_weight, (int, float)) and math.isfinite(self.negative_weight)
                and self.negative_weight >= 0):
            raise fail(f"negative_weight must be 0 or more, got {self.negative_weight!r}")
        for name in ("range_probability", "flip_probability", "isolation_probability", "negative_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise fail(f"{name} must be between 0 and 1, got {value!r}")
        if not 0.0 <= self.min_sigma < 1.0:
            raise fail(f"min_sigma must be in [0, 1), got {self.min_sigma!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise fail(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Denoiser(Protocol):
    """What the learning loop needs from a FLUX.1 host.

    ``velocity(noisy_latents, sigma, deltas, token_positions)``:
        noisy_latents: (B, C, H, W) float32 latents in the model's normalised
            latent space (what the transformer denoises, after the VAE's
            shift/scale), on ``device``;
        sigma: (B,) float32 noise levels in [0, 1] (the transformer's timestep);
        deltas: one (layout.num_blocks, layout.hidden_size) float32 tensor per concept,
            which may require grad: gradients must flow back to it;
        token_positions: per concept, its token indices in the caption's text
            sequence as the host encoded it.
        Returns the predicted velocity ε − x0, (B, C, H, W), any float dtype.
        The caption's text conditioning is fixed when the denoiser is built.
    ``modulation_vector(noisy_latents, sigma)``: FLUX's modulation vector
        ``vec`` (B, hidden) for the caption at σ (B,), as every block's
        modulation receives it without concepts: the learning-rate rule's scale.
    ``model_parameters()``: every parameter of the model, so that the loop can
        freeze them and check that none receives a gradient.
    """

    layout: FluxLayout  # the model's blocks and width: the shape every Δ table must have
    device: torch.device

    def velocity(self, noisy_latents: torch.Tensor, sigma: torch.Tensor, deltas: Sequence[torch.Tensor],
                 token_positions: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def modulation_vector(self, noisy_latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...

    def model_parameters(self) -> Iterable[torch.Tensor]: ...


@dataclass
class LearnResult:
    """deltas: one (num_blocks, modulation_dim) float32 CPU tensor per word, in
    the order given. losses: the training loss of every step run. stopped:
    True when ``should_stop`` ended the run early (deltas are then the values
    after ``steps_done`` steps; the caller decides whether to keep them).
    lr: the learning rate the run used; vec_rms: the model's rms(vec) when the
    rule set it (None for an explicit ``lr``)."""

    deltas: List[torch.Tensor]
    losses: List[float] = field(default_factory=list)
    stopped: bool = False
    steps_done: int = 0
    words: List[str] = field(default_factory=list)
    lr: float = 0.0
    vec_rms: Optional[float] = None

    def rate_record(self, config: "LearnConfig") -> dict:
        """What a concept file's ``source`` keeps of the learning rate: the rate, and with the rule what it was
        computed from."""
        if self.vec_rms is None:
            return {"lr": self.lr}
        return {"lr": self.lr, "relative_lr": config.relative_lr, "vec_rms": round(self.vec_rms, 6)}


@dataclass
class IsolationPartner:
    """Another concept image for TokenVerse's concept-isolation loss.

    denoiser: the same model, built on the composed caption (the learned
        image's caption, then the partner's: "a dog on a beach and a red
        teapot"), which names both images;
    positions: per learned word, its token indices in the composed caption
        (the caption comes first, so they are its positions in the caption);
    latents: (1, C, H, W) the partner image, encoded as the concept images.
    The composed image is the concept image (left) beside the partner (right).
    """

    denoiser: Denoiser
    positions: Sequence[Sequence[int]]
    latents: torch.Tensor


@dataclass
class CaptionedImages:
    """More images of the concepts being learned, under a caption of their own.

    denoiser: the same model, built on these images' caption;
    positions: per learned word, its token indices in that caption;
    latents: (N, C, H, W) the images, encoded as the main concept images (same size);
    flipped_latents: their mirror images' encodings, or None to flip the latents.
    """

    denoiser: Denoiser
    positions: Sequence[Sequence[int]]
    latents: torch.Tensor
    flipped_latents: Optional[torch.Tensor] = None


def captions_per_image(caption: Union[str, Sequence[str]], num_images: int) -> List[str]:
    """One caption per image: ``caption`` is one caption for every image, or a list of one per image."""
    captions = [caption] * num_images if isinstance(caption, str) else list(caption)
    if len(captions) == 1:
        captions = captions * num_images
    if len(captions) != num_images:
        raise ModAdapterError(f"{len(captions)} captions for {num_images} images: give one caption for all the "
                              f"images, or one per image in the images' order")
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ModAdapterError("Give the caption of the concept image(s), containing every concept word")
    return [c.strip() for c in captions]


def caption_lines(text: str, num_images: int) -> List[str]:
    """One caption per image from a text box: the whole text for every image, or, when it has several non-empty
    lines, one line per image."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return captions_per_image(text or "", num_images)
    if len(lines) != num_images:
        raise ModAdapterError(f"The caption has {len(lines)} lines for {num_images} image(s): write one caption "
                              f"on one line for all the images, or one line per image in the batch's order")
    return captions_per_image(lines, num_images)


def group_by_caption(captions: Sequence[str]) -> Dict[str, List[int]]:
    """Image indices per distinct caption, in the order the captions first appear (the first image's is the main)."""
    groups: Dict[str, List[int]] = {}
    for index, text in enumerate(captions):
        groups.setdefault(text, []).append(index)
    return groups


def composed_caption(layout, caption: str, partner_caption: str) -> str:
    """The caption of a concept image beside an isolation partner: the caption, " and ", the partner's caption.

    layout: the :class:`~.token_positions.TextSequenceLayout` the concept words were found with. The caption
    comes first, so its words keep their positions; a partner text that would change the caption's tokens, or a
    composed caption longer than the model reads, is refused.
    """
    if not isinstance(partner_caption, str) or not partner_caption.strip():
        raise ModAdapterError("An isolation image needs a caption that says what it shows, e.g. 'a red teapot'")
    composed = f"{caption.strip()} and {partner_caption.strip()}"
    alone, both = layout.encode(caption.strip()), layout.encode(composed)
    if both[:len(alone)] != alone:
        raise ModAdapterError(f"The isolation caption {composed!r} tokenizes the concept caption differently from "
                              f"{caption!r} alone; end the caption with a whole word")
    if layout.max_text_position is not None and layout.prefix_len + len(both) - 1 > layout.max_text_position:
        raise ModAdapterError(f"The isolation caption {composed!r} is longer than the {layout.max_text_position + 1} "
                              f"text tokens the model reads; shorten the isolation image's caption")
    return composed


@torch.no_grad()
def modulation_scale(denoiser: Denoiser, latents: torch.Tensor) -> float:
    """rms(vec) of the model for the denoiser's caption: the mean over :data:`SCALE_SIGMAS` σ of the root mean
    square of ``vec``'s coordinates. ``latents``: any latents of the run (only their shape matters to ``vec``)."""
    sigma = (torch.arange(SCALE_SIGMAS, dtype=torch.float32) + 0.5) / SCALE_SIGMAS
    device = torch.device(denoiser.device)
    noisy = latents[:1].to(device=device, dtype=torch.float32).expand(SCALE_SIGMAS, *latents.shape[1:])
    vec = denoiser.modulation_vector(noisy, sigma.to(device)).float()
    if vec.ndim != 2 or vec.shape[0] != SCALE_SIGMAS:
        raise ModAdapterError(f"The model's modulation vector has shape {tuple(vec.shape)}, expected one row per σ "
                              f"({SCALE_SIGMAS}, hidden): give Learn Concept an explicit learning rate")
    scale = float(vec.pow(2).mean(dim=-1).sqrt().mean())
    if not (math.isfinite(scale) and scale > 0):
        raise ModAdapterError(f"The model's modulation vector has rms {scale}, so the learning-rate rule cannot "
                              f"scale to it: give Learn Concept an explicit learning rate")
    return scale


def resolve_learning_rate(denoiser: Denoiser, latents: torch.Tensor, config: LearnConfig) -> Tuple[float, Optional[float]]:
    """(learning rate, rms(vec) or None): ``config.lr`` when given, else ``relative_lr`` × rms(vec) of the model."""
    if config.lr is not None:
        return float(config.lr), None
    scale = modulation_scale(denoiser, latents)
    return config.relative_lr * scale, scale


def sample_sigmas(generator: torch.Generator, batch_size: int, sigma_range: Tuple[float, float],
                  range_probability: float, min_sigma: float = 0.0) -> torch.Tensor:
    """σ per sample: from ``sigma_range`` with ``range_probability``, else uniform on [0, 1].

    Always draws the same amount of random numbers, so the stream (and hence
    every later noise draw) does not depend on which branch was taken.
    """
    pick_range = torch.rand(batch_size, generator=generator) < range_probability
    unit = torch.rand(batch_size, generator=generator)
    low, high = sigma_range
    sigma = torch.where(pick_range, low + (high - low) * unit, unit)
    return sigma.clamp_min(min_sigma)


def _check_latents(latents: torch.Tensor, name: str = "latents") -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] < 1:
        raise ModAdapterError(
            f"{name} must be a (images, channels, height, width) tensor of VAE-encoded images, "
            f"got {getattr(latents, 'shape', type(latents).__name__)}"
        )
    if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
        raise ModAdapterError(f"{name} must hold finite floating-point values; re-encode the images")


def _check_positions(positions: Sequence[Sequence[int]], words: Sequence[str]) -> List[List[int]]:
    checked = []
    for word, pos in zip(words, positions):
        pos = [int(p) for p in pos]
        if not pos:
            raise ModAdapterError(f"Concept word {word!r} has no token positions: it was not found in the caption")
        if min(pos) < 0:
            raise ModAdapterError(f"Concept word {word!r} has negative token positions {pos}")
        checked.append(pos)
    return checked


def _check_deltas(deltas: Sequence[torch.Tensor], layout: FluxLayout, what: str, words: Sequence[str]) -> None:
    for word, delta in zip(words, deltas):
        if not isinstance(delta, torch.Tensor):
            raise ModAdapterError(f"{what} for {word!r} must be a ({layout.num_blocks}, {layout.hidden_size}) tensor, "
                                  f"got {type(delta).__name__}")
        layout.check_delta(delta.shape, word, what=f"{what} for")  # the one fit rule of every host
        if not bool(torch.isfinite(delta).all()):
            raise ModAdapterError(f"{what} for {word!r} contains NaN or infinite values")


class _FrozenModel:
    """Freezes the model's parameters for the run and puts requires_grad back afterwards."""

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.parameters = list(parameters)

    def __enter__(self) -> "_FrozenModel":
        self.saved = [p.requires_grad for p in self.parameters]
        for p in self.parameters:
            p.requires_grad_(False)
        return self

    def check_no_gradients(self) -> None:
        touched = sum(1 for p in self.parameters if p.grad is not None)
        if touched:
            raise RuntimeError(
                f"{touched} model parameter(s) received a gradient while learning a concept; only Δ may be trained. "
                f"This is a bug in the denoiser host."
            )

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.parameters, self.saved):
            if flag and p.is_inference():
                # ComfyUI loads weights under inference mode, and such a tensor can be switched back to
                # requires_grad=True only there (switching it off works anywhere).
                with torch.inference_mode():
                    p.requires_grad_(True)
            else:
                p.requires_grad_(flag)


def _check_partners(partners: Sequence[IsolationPartner], latents: torch.Tensor,
                    words: Sequence[str]) -> List[IsolationPartner]:
    checked = []
    for index, partner in enumerate(partners):
        if not isinstance(partner, IsolationPartner) or not isinstance(partner.denoiser, Denoiser):
            raise TypeError(f"isolation partner {index} must be an IsolationPartner with a Denoiser")
        _check_latents(partner.latents, f"isolation partner {index}'s latents")
        if partner.latents.shape[0] != 1 or partner.latents.shape[1:] != latents.shape[1:]:
            raise ModAdapterError(
                f"isolation partner {index} is {tuple(partner.latents.shape)}, the concept images "
                f"{tuple(latents.shape)}: give one partner image of the concept images' size")
        if len(partner.positions) != len(words):
            raise ModAdapterError(f"isolation partner {index} has {len(partner.positions)} position lists for "
                                  f"{len(words)} concept words")
        checked.append(IsolationPartner(partner.denoiser, _check_positions(partner.positions, words),
                                        partner.latents))
    return checked


def _check_more_images(more_images: Sequence[CaptionedImages], latents: torch.Tensor, words: Sequence[str],
                       noun: str = "image group", first: int = 2) -> List[CaptionedImages]:
    """``first``: the number of the first group in messages (the main caption's images are image group 1)."""
    checked = []
    for index, group in enumerate(more_images):
        what = f"{noun} {index + first}"
        if not isinstance(group, CaptionedImages) or not isinstance(group.denoiser, Denoiser):
            raise TypeError(f"{what} must be CaptionedImages with a Denoiser")
        _check_latents(group.latents, f"{what}'s latents")
        if group.latents.shape[1:] != latents.shape[1:]:
            raise ModAdapterError(f"{what}'s images are {tuple(group.latents.shape[1:])}, the concept images "
                                  f"{tuple(latents.shape[1:])}: give every image at the same resolution")
        if group.flipped_latents is not None:
            _check_latents(group.flipped_latents, f"{what}'s flipped latents")
            if group.flipped_latents.shape != group.latents.shape:
                raise ModAdapterError(f"{what}'s flipped latents have shape {tuple(group.flipped_latents.shape)}, "
                                      f"its latents {tuple(group.latents.shape)}: give one flipped encoding per image")
        if len(group.positions) != len(words):
            raise ModAdapterError(f"{what} has {len(group.positions)} position lists for {len(words)} concept words")
        checked.append(CaptionedImages(group.denoiser, _check_positions(group.positions, words), group.latents,
                                       group.flipped_latents))
    return checked


def _check_learn_inputs(denoiser, latents, positions, words, flipped_latents, init) -> Tuple[List[str], List[List[int]]]:
    """learn_concepts' inputs, checked: (the words, named if not given; the positions)."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"learn_concepts needs a Denoiser (velocity, modulation_vector, model_parameters, layout, "
                        f"device), got {type(denoiser).__name__}")
    if words is None:
        words = [f"concept {k + 1}" for k in range(len(positions))]
    words = list(words)
    if len(positions) == 0:
        raise ModAdapterError("Give at least one concept word to learn")
    if len(words) != len(positions):
        raise ModAdapterError(f"{len(words)} words but {len(positions)} position lists were given")
    positions = _check_positions(positions, words)
    _check_latents(latents)
    if flipped_latents is not None:
        _check_latents(flipped_latents, "flipped_latents")
        if flipped_latents.shape != latents.shape:
            raise ModAdapterError(f"flipped_latents has shape {tuple(flipped_latents.shape)}, latents "
                                  f"{tuple(latents.shape)}: give one flipped encoding per image")
    if init is not None:
        if len(init) != len(words):
            raise ModAdapterError(f"init has {len(init)} entries for {len(words)} concept words")
        given = [(w, d) for w, d in zip(words, init) if d is not None]
        _check_deltas([d for _, d in given], denoiser.layout, "The starting Δ", [w for w, _ in given])
    return words, positions


def _starting_directions(init, num_concepts: int, layout: FluxLayout,
                         device: torch.device) -> Tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(global directions (K, D), per-block offsets (K, blocks, D), frozen until stage 2) that add up to ``init``
    (zero where it gives None)."""
    start = torch.zeros(num_concepts, layout.num_blocks, layout.hidden_size)
    if init is not None:
        for k, delta in enumerate(init):
            if delta is not None:
                start[k] = delta.detach().float().cpu()
    start_global = start.mean(dim=1)  # (K, D)
    global_directions = torch.nn.Parameter(start_global.to(device))
    block_offsets = torch.nn.Parameter((start - start_global[:, None]).to(device), requires_grad=False)
    return global_directions, block_offsets


def _diverged(step: int, config: LearnConfig, lr: float, what: str, advice: str = "") -> LearningDivergedError:
    return LearningDivergedError(
        f"Learning diverged at step {step + 1} of {config.steps}: {what}. Nothing was saved. Lower the learning "
        f"rate (now {lr:g}), {advice}and run the model in bfloat16 or float32 (float16 overflows in FLUX).")


def _draw_images_and_sigmas(generator: torch.Generator, config: LearnConfig, in_stage1: bool,
                            num_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A step's first draws, in this order: which images (with replacement), then σ from the stage's range."""
    image_index = torch.randint(num_images, (config.batch_size,), generator=generator)
    sigma = sample_sigmas(generator, config.batch_size,
                          config.stage1_sigma_range if in_stage1 else config.stage2_sigma_range,
                          config.range_probability, config.min_sigma)
    return image_index, sigma


def _isolation_loss(partner: IsolationPartner, generator: torch.Generator, config: LearnConfig, in_stage1: bool,
                    clean: torch.Tensor, deltas: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One isolation step: a concept image (drawn as a training batch draws it) left of the partner, both noised
    with one σ; the concept's half learns as usual, the partner's half must match the model without Δ."""
    batch = config.batch_size
    image_index, sigma = _draw_images_and_sigmas(generator, config, in_stage1, clean.shape[0])
    width = clean.shape[-1]
    composed = torch.cat([clean[image_index.to(device)], partner.latents.to(device).expand(batch, -1, -1, -1)], dim=-1)
    noise = torch.randn(composed.shape, generator=generator).to(device)
    sigma = sigma.to(device)
    noisy, target = flow_matching_pair(composed, noise, sigma)
    # The model without Δ first: a host may recompute the forward with Δ during backward (activation
    # checkpointing), and it recomputes with the concepts of the last forward it ran.
    with torch.no_grad():
        without = partner.denoiser.velocity(noisy, sigma, [], []).float()
    prediction = partner.denoiser.velocity(noisy, sigma, deltas, partner.positions).float()
    concept_half = F.mse_loss(prediction[..., :width], target[..., :width])
    partner_half = F.mse_loss(prediction[..., width:], without[..., width:])
    return 0.5 * (concept_half + partner_half)  # the mean over the composed image


def _training_batch(generator: torch.Generator, config: LearnConfig, in_stage1: bool, clean: torch.Tensor,
                    flipped: Optional[torch.Tensor],
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's (x_σ, σ, target v, which images): images drawn with replacement, σ from the stage's range, flips,
    noise (in this order from ``generator``, so that a seed gives the same run on every device)."""
    batch = config.batch_size
    image_index, sigma = _draw_images_and_sigmas(generator, config, in_stage1, clean.shape[0])
    flip = (torch.rand(batch, generator=generator) < config.flip_probability).tolist()
    noise = torch.randn((batch, *clean.shape[1:]), generator=generator).to(device)
    x0 = clean[image_index.to(device)]
    for b, (i, do_flip) in enumerate(zip(image_index.tolist(), flip)):
        if do_flip:
            x0[b] = flipped[i] if flipped is not None else clean[i].flip(-1)
    sigma = sigma.to(device)
    noisy, target = flow_matching_pair(x0, noise, sigma)
    return noisy, sigma, target, image_index


def _group_of_each_image(groups: Sequence[CaptionedImages]) -> torch.Tensor:
    """(images,) the index of each image's group, the groups' images stacked in order."""
    return torch.cat([torch.full((group.latents.shape[0],), g) for g, group in enumerate(groups)])


def _rows_of_each_group(owners: torch.Tensor, device: torch.device) -> Iterator[Tuple[int, torch.Tensor]]:
    """(group, the batch rows whose image is that group's) for each group among ``owners`` (a group per row)."""
    for g in owners.unique().tolist():
        yield g, (owners == g).nonzero().flatten().to(device)


def _negative_terms(negatives: Sequence[CaptionedImages], group_of_negative: torch.Tensor, clean: torch.Tensor,
                    generator: torch.Generator, config: LearnConfig, in_stage1: bool,
                    deltas: Sequence[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """A batch of negative images (drawn as a training batch draws its images, no flips), each under its own
    caption: the hinge relu(loss without Δ − loss with Δ) per image, averaged over the batch, in one part per
    caption."""
    image_index, sigma = _draw_images_and_sigmas(generator, config, in_stage1, clean.shape[0])
    noise = torch.randn((config.batch_size, *clean.shape[1:]), generator=generator).to(device)
    sigma = sigma.to(device)
    noisy, target = flow_matching_pair(clean[image_index.to(device)], noise, sigma)
    for g, rows in _rows_of_each_group(group_of_negative[image_index], device):
        group = negatives[g]
        # Without Δ first: a checkpointing host recomputes the forward with the concepts of the last forward it ran.
        with torch.no_grad():
            without = group.denoiser.velocity(noisy[rows], sigma[rows], [], []).float()
        prediction = group.denoiser.velocity(noisy[rows], sigma[rows], deltas, group.positions).float()
        loss_without = (without - target[rows]).pow(2).flatten(1).mean(dim=1)
        loss_with = (prediction - target[rows]).pow(2).flatten(1).mean(dim=1)
        yield F.relu(loss_without - loss_with).sum() / config.batch_size


def _denoising_losses(groups: Sequence[CaptionedImages], group_of_image: torch.Tensor, noisy: torch.Tensor,
                      sigma: torch.Tensor, target: torch.Tensor, image_index: torch.Tensor,
                      deltas: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batch's mean squared error in parts, one per caption among the batch's images, each denoised under its
    own caption; the parts add up to the batch's mean."""
    if len(groups) == 1:
        main = groups[0]
        yield F.mse_loss(main.denoiser.velocity(noisy, sigma, deltas, main.positions).float(), target)
        return
    for g, rows in _rows_of_each_group(group_of_image[image_index], noisy.device):
        group = groups[g]
        prediction = group.denoiser.velocity(noisy[rows], sigma[rows], deltas, group.positions).float()
        yield F.mse_loss(prediction, target[rows], reduction="sum") / target.numel()


def _backward_each(parts: Iterator[torch.Tensor], step: int, config: LearnConfig, lr: float) -> float:
    """Backpropagate each part of a step's loss before the next part's forward runs; the step's loss.

    A host under activation checkpointing recomputes a forward during the backward with the concepts (token
    positions, batch) of the last forward it ran, so a step whose parts run several forwards with Δ (images
    under other captions, negatives) takes each part's backward at once: the gradients add up as for their sum."""
    total = 0.0
    for part in parts:
        value = float(part.detach())
        if not math.isfinite(value):
            raise _diverged(step, config, lr, f"the loss is {value}", "keep gradient clipping on, and ")
        part.backward()
        total += value
    return total


def learn_concepts(
    denoiser: Denoiser,
    latents: torch.Tensor,
    positions: Sequence[Sequence[int]],
    config: Optional[LearnConfig] = None,
    *,
    words: Optional[Sequence[str]] = None,
    flipped_latents: Optional[torch.Tensor] = None,
    init: Optional[Sequence[Optional[torch.Tensor]]] = None,
    progress: Optional[Callable[[int, int, float], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    isolation: Sequence[IsolationPartner] = (),
    more_images: Sequence[CaptionedImages] = (),
    negatives: Sequence[CaptionedImages] = (),
) -> LearnResult:
    """Learn one Δ table per concept word on the images ``latents`` (TokenVerse recipe).

    latents: (N, C, H, W) clean latents of the concept images in the model's
        normalised latent space (VAE-encoded, shift/scale applied).
    positions: per word, its token indices in the caption the denoiser was built with.
    words: names of the concepts (messages, :attr:`LearnResult.words`).
    flipped_latents: the VAE encodings of the horizontally flipped images. A
        flip augmentation uses them when given; otherwise it flips the latent
        itself (``latents.flip(-1)``). FLUX's VAE is convolutional, so the
        flipped latent is close to, but not exactly, the encoding of the flipped
        image; hosts that can encode cheaply should pass the real one.
    init: per word, a Δ to start from (e.g. the adapter's prediction) or None
        for zero. It is split into its mean over blocks (the stage-1 global
        direction) and the per-block remainder (the stage-2 offsets, frozen
        during stage 1), so the run starts exactly at ``init``.
    progress: called after every step with (step, total_steps, loss).
    should_stop: polled before every step; True ends the run with ``stopped=True``.
    isolation: TokenVerse's concept-isolation partners. On ``config.isolation_probability``
        of the steps, one of them (uniformly) is composed with a concept image
        (:class:`IsolationPartner`); no flips on those steps. Without partners
        the run draws exactly the random numbers it drew before they existed.
        A partner is composed with a main concept image (``latents``): its
        composed caption begins with their caption.
    more_images: more images of the same concepts under captions of their own
        (:class:`CaptionedImages`). A step draws its images uniformly from all
        the images, main and more, and denoises each under its own caption.
    negatives: images without the concepts, each group under its own caption
        that contains the words (:class:`CaptionedImages`; positions: the
        words' in that caption). On ``config.negative_probability`` of the
        steps one batch of them (drawn uniformly) adds ``negative_weight`` ×
        the hinge relu(loss without Δ − loss with Δ). Without negatives the
        run draws what it drew before they existed.

    Raises :class:`LearningDivergedError` when the loss or the gradient is NaN
    or infinite (lower the learning rate), :class:`ModAdapterError` for
    inconsistent inputs. Never writes files.
    """
    config = config or LearnConfig()
    config.validate()
    words, positions = _check_learn_inputs(denoiser, latents, positions, words, flipped_latents, init)
    partners = _check_partners(isolation, latents, words)
    groups = [CaptionedImages(denoiser, positions, latents, flipped_latents),
              *_check_more_images(more_images, latents, words)]
    negatives = _check_more_images(negatives, latents, words, noun="negative image group", first=1)
    device = torch.device(denoiser.device)
    num_concepts = len(words)
    global_directions, block_offsets = _starting_directions(init, num_concepts, denoiser.layout, device)

    # Copies: a host may hand over inference-mode tensors (ComfyUI), which autograd must not see.
    def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x.detach().to(device=device, dtype=torch.float32) for x in tensors]).clone()

    clean = stacked([group.latents for group in groups])  # every image; the main ones first
    main_clean = clean[:latents.shape[0]]
    lr, vec_rms = resolve_learning_rate(denoiser, main_clean, config)
    if vec_rms is not None:
        logger.info("learn concept: learning rate %.4g = %g x rms(vec) %.4g of this model", lr, config.relative_lr,
                    vec_rms)
    optimizer = torch.optim.Adam([global_directions], lr=lr)
    clip_norm = math.inf if config.max_grad_norm is None else config.max_grad_norm / (vec_rms or 1.0)
    flipped = None
    if any(group.flipped_latents is not None for group in groups):
        flipped = stacked([group.latents.flip(-1) if group.flipped_latents is None else group.flipped_latents
                           for group in groups])
    group_of_image = _group_of_each_image(groups)
    negative_clean = stacked([group.latents for group in negatives]) if negatives else None
    group_of_negative = _group_of_each_image(negatives) if negatives else None
    generator = torch.Generator().manual_seed(config.seed)  # CPU: the same draws on every device

    result = LearnResult(deltas=[], words=words, lr=lr, vec_rms=vec_rms)
    with _FrozenModel(denoiser.model_parameters()) as frozen:
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                result.stopped = True
                break
            in_stage1 = step < config.stage1_steps
            if not in_stage1 and not block_offsets.requires_grad:
                block_offsets.requires_grad_(True)
                optimizer.add_param_group({"params": [block_offsets],
                                           "lr": config.offset_lr if config.offset_lr is not None else lr})

            # The parts of a step backpropagate one at a time into Δ tables that are leaves of their own, then Δ's
            # gradient flows once into the global directions and offsets (their sum's graph is used once).
            tables = [global_directions[k][None, :] + block_offsets[k] for k in range(num_concepts)]
            deltas = [table.detach().requires_grad_(True) for table in tables]

            def step_losses():
                """The step's loss in parts, each yielded right after its forward (see _backward_each)."""
                if bool(partners) and float(torch.rand((), generator=generator)) < config.isolation_probability:
                    partner = partners[int(torch.randint(len(partners), (), generator=generator))]
                    yield _isolation_loss(partner, generator, config, in_stage1, main_clean, deltas, device)
                else:
                    noisy, sigma, target, image_index = _training_batch(generator, config, in_stage1, clean, flipped,
                                                                        device)
                    yield from _denoising_losses(groups, group_of_image, noisy, sigma, target, image_index, deltas)
                if negatives and float(torch.rand((), generator=generator)) < config.negative_probability:
                    for part in _negative_terms(negatives, group_of_negative, negative_clean, generator, config,
                                                in_stage1, deltas, device):
                        yield config.negative_weight * part

            optimizer.zero_grad(set_to_none=True)
            loss_value = _backward_each(step_losses(), step, config, lr)
            torch.autograd.backward(tables, [d.grad if d.grad is not None else torch.zeros_like(d) for d in deltas])
            if step == 0:
                frozen.check_no_gradients()
            trainable = [p for p in (global_directions, block_offsets) if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
            if not math.isfinite(float(grad_norm)):
                raise _diverged(step, config, lr, f"the gradient of Δ is {float(grad_norm)}")
            optimizer.step()

            result.losses.append(loss_value)
            result.steps_done = step + 1
            if progress is not None:
                progress(step + 1, config.steps, loss_value)
            if config.log_every and (step + 1) % config.log_every == 0:
                recent = result.losses[-config.log_every:]
                logger.info("learn concept step %d/%d (stage %d): loss %.5f (mean of last %d: %.5f)", step + 1,
                            config.steps, 1 if in_stage1 else 2, loss_value, len(recent), sum(recent) / len(recent))
        frozen.check_no_gradients()

    with torch.no_grad():
        final = global_directions[:, None, :] + block_offsets  # (K, num_blocks, D)
        result.deltas = [final[k].detach().float().cpu().clone() for k in range(num_concepts)]
    return result


@torch.no_grad()
def evaluate_loss(
    denoiser: Denoiser,
    latents: torch.Tensor,
    deltas: Optional[Sequence[torch.Tensor]],
    positions: Sequence[Sequence[int]],
    *,
    seed: int = 0,
    num_draws: int = 8,
    sigma_range: Tuple[float, float] = (0.0, 1.0),
) -> float:
    """Mean denoising loss of ``deltas`` on held-out noise draws.

    Every image is evaluated at ``num_draws`` noise levels evenly spaced over
    ``sigma_range`` (the midpoints of ``num_draws`` equal bins, so no σ is 0),
    each with fresh noise from a generator seeded with ``seed +
    EVAL_SEED_OFFSET``: a stream the training loop (seeded with ``seed``) never
    uses. The draws depend only on ``seed``, the latents' shape and
    ``num_draws``, so two Δ tables (e.g. learned vs. zero) are compared on
    exactly the same noise. ``deltas=None`` evaluates the model without concepts.
    """
    _check_latents(latents)
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ModAdapterError(f"num_draws must be a positive integer, got {num_draws!r}")
    low, high = sigma_range
    if not 0.0 <= low < high <= 1.0:
        raise ModAdapterError(f"sigma_range must be (low, high) with 0 <= low < high <= 1, got {sigma_range!r}")
    words = [f"concept {k + 1}" for k in range(len(positions))]
    if deltas is None:
        deltas, positions = [], []
    else:
        if len(deltas) != len(positions):
            raise ModAdapterError(f"{len(deltas)} Δ tables but {len(positions)} position lists were given")
        _check_deltas(deltas, denoiser.layout, "Δ", words)
        positions = _check_positions(positions, words)
    device = torch.device(denoiser.device)
    clean = latents.detach().to(device=device, dtype=torch.float32).clone()
    deltas = [d.detach().to(device=device, dtype=torch.float32) for d in deltas]
    generator = torch.Generator().manual_seed(int(seed) + EVAL_SEED_OFFSET)
    total = 0.0
    for draw in range(num_draws):
        sigma_value = low + (high - low) * (draw + 0.5) / num_draws
        sigma = torch.full((clean.shape[0],), sigma_value, dtype=torch.float32)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        noisy, target = flow_matching_pair(clean, noise, sigma.to(device))
        prediction = denoiser.velocity(noisy, sigma.to(device), deltas, positions)
        total += float(F.mse_loss(prediction.float(), target))
    return total / num_draws
