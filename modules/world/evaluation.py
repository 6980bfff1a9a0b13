"""Measurements on the toy world, read by the judge: prompt following, and what a learned concept carries.

* :func:`prompt_following`: images of held-out scenes from their full
  captions (the text oracle); per attribute, how often the judge reads the
  value the caption states.
* :func:`concept_learning`: Learn Concept (TokenVerse mode, the pack's
  ``mod-adapter learn`` path) on one image of a held-out scene per run, its
  concept word ("surface", "pose", "lighting") left without its value in the
  learning caption while every other group is stated; then prompts for other
  scenes that name the word without a value. CP is how often the concept
  image's values come out (per attribute of the concept, averaged), PF how
  often the prompt's own stated values do; with the learned Δ against Δ = 0
  (the bare word), on the same prompts and seeds.

Every draw is seeded; the numbers go to docs/results.md with the command.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ModAdapterError
from ..learn_concept import LearnConfig
from ..token_modulation import TokenConcept
from .captions import full_caption
from .pairs import concept_caption
from .scene import ATTRIBUTES, CONCEPT_ATTRIBUTES, Scene, render
from .split import EVAL, TRAIN, random_scene
from .transformer import MAX_SEQUENCE_LENGTH

ABSTRACT_KINDS = ("surface", "pose", "lighting", "background")  # new kinds go last: the index seeds the draws


def judge_reads(judge, images: torch.Tensor) -> List[Dict[str, str]]:
    return judge.read(images.float())


def generated_reads(pipe, judge, scenes: Sequence[Scene], *, seed: int, steps: int, cfg: float,
                    batch_size: int = 32, progress: Optional[Callable[[int], None]] = None) -> List[Dict[str, str]]:
    """What the judge reads in the image of each scene's full caption (scene i from noise seed + i)."""
    from .sampling import generate

    reads = []
    for start in range(0, len(scenes), batch_size):
        chunk = list(scenes[start:start + batch_size])
        images = generate(pipe, [full_caption(s) for s in chunk], [seed + start + i for i in range(len(chunk))],
                          steps=steps, cfg=cfg)
        reads.extend(judge_reads(judge, images))
        if progress is not None:
            progress(len(chunk))
    return reads


def attribute_hits(scenes: Sequence[Scene], reads: Sequence[Dict[str, str]]) -> Dict[str, float]:
    """Per attribute: the share of scenes whose value the judge read."""
    return {name: float(np.mean([read[name] == getattr(scene, name) for scene, read in zip(scenes, reads)]))
            for name in ATTRIBUTES}


def prompt_following(pipe, judge, scenes: Sequence[Scene], *, seed: int, steps: int, cfg: float,
                     batch_size: int = 32, progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Per attribute: the share of images (scene i from seed + i) in which the judge reads the stated value."""
    reads = generated_reads(pipe, judge, scenes, seed=seed, steps=steps, cfg=cfg, batch_size=batch_size,
                            progress=progress)
    return attribute_hits(scenes, reads)


def held_out_pair_accuracy(scenes: Sequence[Scene], reads: Sequence[Dict[str, str]]) -> Dict[str, Dict[str, object]]:
    """Per held-out pair of values (e.g. "position=left, direction=right"): how many scenes contain it and how
    often the judge read each of its two values there (pairs no scene contains are left out)."""
    from .split import HELD_OUT_PAIRS

    out = {}
    for first, second, pairs in HELD_OUT_PAIRS:
        for a, b in sorted(pairs):
            idx = [i for i, s in enumerate(scenes) if (getattr(s, first), getattr(s, second)) == (a, b)]
            if idx:
                out[f"{first}={a}, {second}={b}"] = {
                    "scenes": len(idx),
                    **{name: float(np.mean([reads[i][name] == getattr(scenes[i], name) for i in idx]))
                       for name in (first, second)}}
    return out


def text_layout(pipe):
    """The T5 text sequence the world's pipeline encodes (padded and cut to MAX_SEQUENCE_LENGTH)."""
    from ..token_positions import TextSequenceLayout

    return TextSequenceLayout.from_hf_tokenizer(pipe.tokenizer_2, "t5", min_length=MAX_SEQUENCE_LENGTH,
                                                max_length=MAX_SEQUENCE_LENGTH)


def word_positions(pipe, prompt: str, word: str) -> List[int]:
    from ..token_positions import find_concept_positions

    return find_concept_positions(text_layout(pipe), prompt, [word])[0]


@dataclass
class ConceptScores:
    """CP and PF per image, with and without the concept's Δ, for one concept kind."""

    kind: str
    cp: List[float] = field(default_factory=list)
    pf: List[float] = field(default_factory=list)
    cp_bare: List[float] = field(default_factory=list)
    pf_bare: List[float] = field(default_factory=list)
    learn_seconds: List[float] = field(default_factory=list)
    # Per concept attribute (e.g. colour and pattern of a surface): 1.0/0.0 per image, with Δ and bare.
    hits: Dict[str, List[float]] = field(default_factory=dict)
    hits_bare: Dict[str, List[float]] = field(default_factory=dict)

    def add_reads(self, concept: Scene, target: Scene, read: Dict[str, str], read_bare: Dict[str, str]) -> None:
        cp, pf = score(read, concept, target, self.kind)
        cp0, pf0 = score(read_bare, concept, target, self.kind)
        self.cp.append(cp)
        self.pf.append(pf)
        self.cp_bare.append(cp0)
        self.pf_bare.append(pf0)
        for name in CONCEPT_ATTRIBUTES[self.kind]:
            self.hits.setdefault(name, []).append(float(read[name] == getattr(concept, name)))
            self.hits_bare.setdefault(name, []).append(float(read_bare[name] == getattr(concept, name)))

    def summary(self) -> Dict[str, object]:
        # Reused concept files were not learned in this run: no time to report for them.
        seconds = float(np.mean(self.learn_seconds)) if self.learn_seconds else None
        return {"kind": self.kind, "images": len(self.cp), "cp": float(np.mean(self.cp)),
                "cp_bare_word": float(np.mean(self.cp_bare)), "pf": float(np.mean(self.pf)),
                "pf_bare_word": float(np.mean(self.pf_bare)),
                "learn_seconds_per_concept": seconds,
                "cp_by_attribute": {name: float(np.mean(v)) for name, v in self.hits.items()},
                "cp_by_attribute_bare_word": {name: float(np.mean(v)) for name, v in self.hits_bare.items()}}


def score(read: Dict[str, str], concept: Scene, target: Scene, kind: str) -> Tuple[float, float]:
    """(CP, PF) of one generated image: the concept's attributes as in ``concept``, the prompt's other stated
    attributes (shape and every group but ``kind``) as in ``target``."""
    concept_names = CONCEPT_ATTRIBUTES[kind]
    stated = [name for name in ATTRIBUTES if name not in concept_names]
    cp = float(np.mean([read[name] == getattr(concept, name) for name in concept_names]))
    pf = float(np.mean([read[name] == getattr(target, name) for name in stated]))
    return cp, pf


def other_values(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    """A random scene whose values of ``kind``'s attributes all differ from ``scene``'s (so a copy is visible)."""
    while True:
        candidate = random_scene(rng)
        if all(getattr(candidate, name) != getattr(scene, name) for name in CONCEPT_ATTRIBUTES[kind]):
            return candidate


def more_views(scene: Scene, kind: str, count: int, rng: np.random.Generator, split: str = EVAL) -> List[Scene]:
    """``count`` scenes of ``split`` with ``scene``'s values of ``kind``'s attributes, every other attribute drawn
    anew."""
    fixed = {name: getattr(scene, name) for name in CONCEPT_ATTRIBUTES[kind]}
    return [random_scene(rng, split, **fixed) for _ in range(count)]


def negative_scenes(scene: Scene, kind: str, seed: int, index: int, count: int) -> List[Scene]:
    """The ``count`` negative images' scenes of concept ``index`` (``scene``): scenes whose values of ``kind`` all
    differ from its, from a stream of their own, so the concept images and prompts are drawn as without them."""
    rng = np.random.default_rng([seed, ABSTRACT_KINDS.index(kind), index, 3])
    return [other_values(scene, kind, rng) for _ in range(count)]


def eval_learn_draws(kind: str, seed: int, concepts: int, prompts_per_concept: int,
                     split: str = EVAL) -> Iterator[Tuple[int, Scene, List[Scene]]]:
    """(index, concept scene, its prompts' scenes) for each concept of ``world eval-learn``, in its order: one
    stream per kind and seed draws a concept scene from ``split``, then its prompts' scenes (every value of the
    concept different). Benchmarks replay eval-learn's concepts and prompts through this."""
    rng = np.random.default_rng([seed, ABSTRACT_KINDS.index(kind)])
    for index in range(concepts):
        scene = random_scene(rng, split)
        yield index, scene, [other_values(scene, kind, rng) for _ in range(prompts_per_concept)]


def caption_words(caption: str, first: str) -> List[str]:
    """The distinct words of ``caption`` in order, ``first`` moved to the front (it must be one of them)."""
    words = list(dict.fromkeys(re.findall(r"[a-z]+", caption.lower())))
    if first not in words:
        raise ValueError(f"{first!r} is not a word of {caption!r}")
    return [first] + [w for w in words if w != first]


def concept_learning(flux_folder: str, pipe, judge, kind: str, *, concepts: int, prompts_per_concept: int,
                     steps: int, seed: int, work_dir: str, sample_steps: int, cfg: float,
                     lr: Optional[float] = None, batch_size: int = LearnConfig.batch_size,
                     stage1_steps: Optional[int] = None, scale: float = 1.0, reuse_learned: bool = False,
                     settings: Optional[Dict[str, object]] = None, every_word: bool = False,
                     views: int = 1, negatives: int = 0, concept_split: str = EVAL,
                     predict: Optional[Callable[[Scene, str], torch.Tensor]] = None, log=print) -> ConceptScores:
    """Learn ``concepts`` concept images of ``kind`` (held out by default) and score prompts that name the word only.

    stage1_steps: Learn Concept's stage-1 steps (None: 4/7 of ``steps``, TokenVerse's 800 of 1,400).
    scale: the learned Δ's strength s at sampling.
    reuse_learned: score a concept file already in ``work_dir`` instead of learning it again (the concept
        images, prompts and seeds are drawn the same either way), e.g. to sample one run at other scales.
    settings: other LearnConfig fields, e.g. ``{"stage2_sigma_range": (0.0, 1.0)}``.
    every_word: learn a Δ for every word of the learning caption at once (TokenVerse's decomposition: each text
        token gets its own direction), and score only the concept word's; otherwise only the concept word is learned.
    views: images of each concept to learn from: the concept image, and ``views - 1`` more scenes with the
        concept's values and the other groups drawn anew, each under its own caption (what only the concept
        shares across them is what the word has to carry). The concept images and prompts are drawn as with
        one view, so the scores compare concept by concept.
    negatives: held-out scenes per concept whose values of the concept all differ from it, each under its own
        learning caption, as Learn Concept's negative images (drawn apart from the concept images and prompts).
    concept_split: where the concept images (and their views) come from: ``eval``, the held-out combinations the
        base model was never trained on (the default, as the table's cases), or ``train``, combinations it was
        trained on (a diagnosis: is a concept image that the model draws badly what holds a concept back?).
    predict: (concept scene, word) -> Δ, e.g. a Mod-Adapter's prediction, scored in place of a learned Δ on the
        same concepts, prompts and seeds (nothing is learned): the reference the learned rows compare with.
    """
    from ..concept_file import load_concept
    from ..learn_diffusers import learn_concept_files
    from .sampling import generate
    from PIL import Image

    if kind not in ABSTRACT_KINDS:
        raise ValueError(f"kind must be one of {ABSTRACT_KINDS}, got {kind!r}")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ModAdapterError(f"--learn-views must be 1 or more images per concept, got {views!r}")
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
        raise ModAdapterError(f"--learn-negatives must be 0 or more images per concept, got {negatives!r}")
    if concept_split not in (EVAL, TRAIN):
        raise ModAdapterError(f"--concept-split must be {EVAL!r} or {TRAIN!r}, got {concept_split!r}")
    if every_word and (views > 1 or negatives):
        raise ModAdapterError("--learn-every-word learns the words of one caption; give it --learn-views 1 and no "
                              "--learn-negatives")
    scores = ConceptScores(kind)
    os.makedirs(work_dir, exist_ok=True)
    for c, concept_scene, targets in eval_learn_draws(kind, seed, concepts, prompts_per_concept, concept_split):
        view_scenes = [concept_scene] + more_views(concept_scene, kind, views - 1,
                                                   np.random.default_rng([seed, ABSTRACT_KINDS.index(kind), c, 1]),
                                                   concept_split)
        image_paths = [os.path.join(work_dir, f"{kind}-{c:03d}.png")] + [
            os.path.join(work_dir, f"{kind}-{c:03d}-view{v}.png") for v in range(1, views)]
        negatives_of_concept = negative_scenes(concept_scene, kind, seed, c, negatives)
        negative_paths = [os.path.join(work_dir, f"{kind}-{c:03d}-negative{n}.png") for n in range(negatives)]
        for scene, path in zip(view_scenes + negatives_of_concept, image_paths + negative_paths):
            Image.fromarray(render(scene)).save(path)
        config = LearnConfig(steps=steps, stage1_steps=max(1, steps * 4 // 7) if stage1_steps is None else stage1_steps,
                             lr=lr, batch_size=batch_size, seed=seed + c,
                             flip_probability=0.0, log_every=0)
        config = dataclasses.replace(config, **(settings or {}))
        learning_caption = concept_caption(concept_scene, kind)
        learning_captions = [concept_caption(scene, kind) for scene in view_scenes]
        if every_word:  # one file per word in a folder of its own; the concept word's is scored
            words = caption_words(learning_caption, first=kind)
            out = os.path.join(work_dir, f"{kind}-{c:03d}-every-word")
            concept_path = os.path.join(out, f"{kind}.safetensors")
        else:
            words, out = [kind], os.path.join(work_dir, f"{kind}-{c:03d}.safetensors")
            concept_path = out
        learn_now = predict is None and not (reuse_learned and os.path.exists(concept_path))
        if learn_now:
            started = time.perf_counter()
            learn_concept_files(flux_folder, image_paths, learning_captions, words,
                                out, config=config, resolution=64, device="cpu", dtype="fp32",
                                gradient_checkpointing=False, max_sequence_length=MAX_SEQUENCE_LENGTH, eval_draws=0,
                                overwrite=True, show_progress=False, log=lambda message: None,
                                negatives=[(path, concept_caption(scene, kind))
                                           for scene, path in zip(negatives_of_concept, negative_paths)])
            scores.learn_seconds.append(time.perf_counter() - started)
        if predict is None:
            learned = load_concept(concept_path)
            delta, made = learned.delta, f"lr {learned.source['lr']:.3g}"
        else:
            delta, made = predict(concept_scene, kind), "predicted"
        prompts = [concept_caption(t, kind) for t in targets]
        seeds = [seed * 1000 + c * prompts_per_concept + i for i in range(len(prompts))]
        concepts_per_prompt = [[TokenConcept(delta, word_positions(pipe, p, kind), scale, name=kind)] for p in prompts]
        with_delta = judge_reads(judge, generate(pipe, prompts, seeds, steps=sample_steps, cfg=cfg,
                                                 concepts=concepts_per_prompt))
        bare = judge_reads(judge, generate(pipe, prompts, seeds, steps=sample_steps, cfg=cfg))
        for target, read, read_bare in zip(targets, with_delta, bare):
            scores.add_reads(concept_scene, target, read, read_bare)
        log(f"{kind} {c + 1}/{concepts}: CP {np.mean(scores.cp):.2f} (bare word {np.mean(scores.cp_bare):.2f}), "
            f"PF {np.mean(scores.pf):.2f}, {made}"
            + (f", {scores.learn_seconds[-1]:.0f} s to learn" if learn_now else "" if predict else ", reused"))
    return scores

