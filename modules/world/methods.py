"""The rows of the world's table: how each method turns a test case's concepts into Δ tables.

Every method returns, for a :class:`~.table.Case`, the prompt to generate and
the concepts (Δ on the tokens of each concept word). They share one loaded
world (:class:`WorldModels`): the diffusers FLUX.1 pipeline, its CLIP text
model and vector_in for neutral features and descriptions, and the world's
CLIP vision encoder for the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ModAdapterError
from ..token_modulation import TokenConcept
from .evaluation import text_layout, word_positions
from .captions import describe
from .pairs import concept_caption
from .scene import Scene, render
from .split import EVAL, random_scene
from .table import Case, all_text_positions, description
from .transformer import MAX_SEQUENCE_LENGTH


@dataclass
class WorldModels:
    pipe: object  # FluxPipeline of the world, float32 on the CPU
    encoder: object  # OpenClipImageEncoder of the world
    _features: Dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: Dict[str, str], pipe) -> "WorldModels":
        from ..training.stages import load_image_encoder
        from .clip import OPEN_CLIP_NAME

        encoder = load_image_encoder(OPEN_CLIP_NAME, paths["image_encoder"], "cpu",
                                     config_file=paths["image_encoder_config"])
        return cls(pipe, encoder)

    @property
    def num_blocks(self) -> int:
        transformer = self.pipe.transformer
        return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)

    def text_feature(self, text: str) -> torch.Tensor:
        """vector_in(CLIP pooled(text)): (width,), as FLUX builds the modulation vector from a prompt."""
        if text not in self._features:
            from ..training.features import clip_pooled, project_pooled, vector_in_of

            pooled = clip_pooled([text], self.pipe.text_encoder, self.pipe.tokenizer)
            self._features[text] = project_pooled(pooled, vector_in_of(self.pipe.transformer))[0].cpu()
        return self._features[text]

    def image_tokens(self, scene: Scene) -> torch.Tensor:
        image = torch.from_numpy(render(scene)).float().div(255.0)[None]
        return self.encoder.encode(image).cpu()

    def positions(self, prompt: str, word: str) -> List[int]:
        return word_positions(self.pipe, prompt, word)


def text_oracle(models: WorldModels):
    """The concepts' exact values written into the prompt (the ceiling)."""
    return lambda case: (case.oracle_prompt, [])


def bare_word(models: WorldModels):
    """The concept words with Δ = 0 (the floor)."""
    return lambda case: (case.prompt, [])


def description_only(models: WorldModels):
    """Δ = vector_in(CLIP(p+)) − vector_in(CLIP(word)) on every block: the pre-training target, from the exact
    description and no image."""
    def method(case: Case):
        concepts = []
        for kind, concept, word in zip(case.kinds, case.concepts, case.words):
            delta = models.text_feature(description(concept, kind)) - models.text_feature(word)
            concepts.append(TokenConcept(delta[None].expand(models.num_blocks, -1).clone(),
                                         models.positions(case.prompt, word), 1.0, name=word))
        return case.prompt, concepts
    return method


class AdapterPredictor:
    """Δ of (concept image, word) from a Mod-Adapter checkpoint, as the Predictor node computes it."""

    def __init__(self, models: WorldModels, checkpoint: str):
        from ..checkpoint import load_adapter_checkpoint

        self.models = models
        self.adapter = load_adapter_checkpoint(checkpoint, dtype=torch.float32).adapter.eval()

    @torch.no_grad()
    def delta(self, concept: Scene, word: str) -> torch.Tensor:
        tokens = self.models.image_tokens(concept)
        neutral = self.models.text_feature(word)[None]
        return self.adapter(neutral, tokens)[0]


def adapter_method(models: WorldModels, checkpoint: str, *, everywhere: bool = False):
    """The adapter's Δ on the concept words' tokens, or (``everywhere``) on every text token: global injection."""
    predictor = AdapterPredictor(models, checkpoint)

    def method(case: Case):
        concepts = []
        for concept, word in zip(case.concepts, case.words):
            positions = (all_text_positions(MAX_SEQUENCE_LENGTH) if everywhere
                         else models.positions(case.prompt, word))
            concepts.append(TokenConcept(predictor.delta(concept, word), positions, 1.0, name=word))
        return case.prompt, concepts
    return method


# TokenVerse's concept isolation on the world: partner scenes per concept image, each captioned by its object only
# ("a red dots cube"), so that the composed caption fits the 48 T5 tokens the world reads.
ISOLATION_PARTNERS = 4


def scene_latents(pipe, scene: Scene) -> torch.Tensor:
    """(1, C, h, w) VAE latents of a rendered scene, as Learn Concept encodes a concept image."""
    from ..flux_diffusers import vae_encode

    pixels = torch.from_numpy(render(scene)).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
    return vae_encode(pipe.vae, pixels)


def isolation_scenes(concept: Scene, count: int, seed: int) -> List[Scene]:
    """``count`` held-out scenes whose object (shape, colour, pattern) differs from the concept image's, drawn from
    the concept image's own seed: the same partners for the same concept image in every row and run."""
    rng = np.random.default_rng([seed, concept.seed])
    partners = []
    while len(partners) < count:
        scene = random_scene(rng, EVAL)
        if all(getattr(scene, name) != getattr(concept, name) for name in ("shape", "colour", "pattern")):
            partners.append(scene)
    return partners


class ConceptLearner:
    """Learn Concept (TokenVerse mode) on one concept image, in process, with the pack's learning loop.

    isolation_partners: that many :func:`isolation_scenes` become TokenVerse's isolation partners (0: none)."""

    def __init__(self, models: WorldModels, *, steps: int, lr: Optional[float] = None, seed: int = 0,
                 isolation_partners: int = 0):
        self.models, self.steps, self.lr, self.seed = models, steps, lr, seed
        self.isolation_partners = isolation_partners
        self.cache: Dict[Tuple[Scene, str, int], torch.Tensor] = {}

    def learn(self, concept: Scene, kind: str, word: str, init: Optional[torch.Tensor] = None) -> torch.Tensor:
        from ..flux_diffusers import encode_caption
        from ..learn_concept import IsolationPartner, LearnConfig, composed_caption, learn_concepts
        from ..learn_diffusers import DiffusersDenoiser

        key = (concept, kind, 0 if init is None else 1)
        if key not in self.cache:
            pipe = self.models.pipe
            caption_text = concept_caption(concept, kind)
            positions = [self.models.positions(caption_text, word)]
            prompt_embeds, pooled = encode_caption(pipe, caption_text, "cpu", MAX_SEQUENCE_LENGTH)
            latents = scene_latents(pipe, concept)
            # TokenVerse's split (800 of 1400 steps in stage 1); no flips: a mirrored world image contradicts
            # its caption (the object's side, the light's side)
            config = LearnConfig(steps=self.steps, stage1_steps=max(1, self.steps * 4 // 7), lr=self.lr,
                                 seed=self.seed, flip_probability=0.0, log_every=0)
            partner_scenes = isolation_scenes(concept, self.isolation_partners, self.seed)
            layout = text_layout(pipe) if partner_scenes else None
            partner_texts = [(composed_caption(layout, caption_text, f"a {describe(scene, 'object')}"),
                              scene_latents(pipe, scene)) for scene in partner_scenes]
            with torch.enable_grad(), DiffusersDenoiser(pipe.transformer, prompt_embeds, pooled) as denoiser:
                partners = [IsolationPartner(denoiser.with_caption(*encode_caption(pipe, text, "cpu",
                                                                                   MAX_SEQUENCE_LENGTH)),
                                             positions, partner_latents)
                            for text, partner_latents in partner_texts]
                result = learn_concepts(denoiser, latents, positions, config, words=[word],
                                        init=None if init is None else [init], isolation=partners)
            self.cache[key] = result.deltas[0].detach().cpu()
        return self.cache[key]


def learn_concept_method(models: WorldModels, *, steps: int, init_checkpoint: Optional[str] = None,
                         lr: Optional[float] = None, seed: int = 0, isolation_partners: int = 0):
    """TokenVerse per concept image (``steps`` each at ``lr``), optionally started from an adapter's prediction
    (hybrid), optionally with ``isolation_partners`` partner scenes per concept image."""
    learner = ConceptLearner(models, steps=steps, lr=lr, seed=seed, isolation_partners=isolation_partners)
    predictor = AdapterPredictor(models, init_checkpoint) if init_checkpoint else None

    def method(case: Case):
        concepts = []
        for kind, concept, word in zip(case.kinds, case.concepts, case.words):
            init = predictor.delta(concept, word) if predictor is not None else None
            concepts.append(TokenConcept(learner.learn(concept, kind, word, init),
                                         models.positions(case.prompt, word), 1.0, name=word))
        return case.prompt, concepts
    return method


ROWS = "oracle, bare, description, adapter=FILE, global=FILE, learn, learn-isolated, hybrid=FILE"


def row_method(models: WorldModels, name: str, checkpoint: str, *, learn_steps: int, hybrid_steps: int, lr: float,
               seed: int):
    """The method of one row of the table, by its name (a label may follow a colon: ``adapter:no-moe``) and, for the
    rows that need one, an adapter checkpoint."""
    kind = name.split(":")[0]
    if kind in ("adapter", "global", "hybrid") and not checkpoint:
        raise ModAdapterError(f"--rows {name}=ADAPTER.safetensors: the {name} row needs an adapter checkpoint")
    make = {
        "oracle": lambda: text_oracle(models),
        "bare": lambda: bare_word(models),
        "description": lambda: description_only(models),
        "adapter": lambda: adapter_method(models, checkpoint),
        "global": lambda: adapter_method(models, checkpoint, everywhere=True),
        "learn": lambda: learn_concept_method(models, steps=learn_steps, lr=lr, seed=seed),
        "learn-isolated": lambda: learn_concept_method(models, steps=learn_steps, lr=lr, seed=seed,
                                                       isolation_partners=ISOLATION_PARTNERS),
        "hybrid": lambda: learn_concept_method(models, steps=hybrid_steps, init_checkpoint=checkpoint, lr=lr,
                                               seed=seed),
    }.get(kind)
    if make is None:
        raise ModAdapterError(f"unknown row {name!r}; rows are {ROWS} (a label may follow, e.g. adapter:no-moe=FILE)")
    return make()
