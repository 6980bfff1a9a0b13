"""The paper's table on the toy world: every method on the same test cases, read by the judge.

A test case is one generated image: a prompt that names one to four concepts
by their words, a concept image per concept (a held-out combination, never
in any training set) and a seed. The ideal output is the prompt's scene with
each concept's values taken from its concept image. Per image:

* CP: per concept, the share of its attributes the judge reads as in its
  concept image (object: shape, colour, pattern; surface: colour, pattern;
  pose: position, size; lighting: direction, tint; background), averaged
  over the concepts;
* PF: the share of the prompt's own stated attributes the judge reads;
* copy-paste: per concept image, the share of its attributes that were not
  asked for (and differ from the ideal output) that the judge reads anyway.

A method turns each concept into a Δ table (or, for the text oracle, into
words in the prompt); :func:`evaluate` generates every case with it through
the world sampler (the same seeds for every method) and returns per-case
scores; :func:`summarise` gives means with 95% bootstrap intervals and
CP·PF as the product of the means (the paper's definition).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..token_modulation import TokenConcept
from .captions import ABSENT, GROUPS, STATED, WORD_ONLY, caption, describe, full_caption
from .pairs import concept_word
from .scene import ATTRIBUTES, CONCEPT_ATTRIBUTES, Scene
from .split import EVAL, random_scene
from .streams import Stream, world_rng

# Concept kinds per test set: single concepts of each kind, and multi-concept sets that mix an object (or a
# surface, which an object would contradict) with abstract concepts.
SINGLE = (("object",), ("surface",), ("pose",), ("lighting",), ("background",))
MULTI = {
    2: (("object", "pose"), ("object", "lighting"), ("object", "background"), ("surface", "pose"),
        ("surface", "lighting")),
    3: (("object", "pose", "lighting"), ("object", "lighting", "background"), ("surface", "pose", "background")),
    4: (("object", "pose", "lighting", "background"), ("surface", "pose", "lighting", "background")),
}


@dataclass(frozen=True)
class Case:
    kinds: Tuple[str, ...]
    concepts: Tuple[Scene, ...]  # one concept image per kind
    ideal: Scene  # what the image should show
    seed: int

    @property
    def words(self) -> List[str]:
        return [concept_word(kind, concept) for kind, concept in zip(self.kinds, self.concepts)]

    @property
    def prompt(self) -> str:
        """The ideal scene's caption with each concept's values left to the concept (its word stays)."""
        modes = {group: STATED for group in GROUPS}
        for kind in self.kinds:
            if kind == "object":
                modes["surface"] = ABSENT
            else:
                modes[kind] = WORD_ONLY
        return caption(self.ideal, modes)

    @property
    def oracle_prompt(self) -> str:
        return full_caption(self.ideal)

    def concept_names(self) -> List[Tuple[str, ...]]:
        return [CONCEPT_ATTRIBUTES[kind] for kind in self.kinds]

    def stated_names(self) -> List[str]:
        covered = {name for names in self.concept_names() for name in names}
        return [name for name in ATTRIBUTES if name not in covered]


def make_cases(kind_sets: Sequence[Tuple[str, ...]], count: int, seed: int) -> List[Case]:
    """``count`` cases per kind set: fresh held-out concept images, a random scene around them."""
    cases = []
    for set_index, kinds in enumerate(kind_sets):
        rng = world_rng(Stream.TABLE_CASES, seed, set_index)
        for i in range(count):
            concepts = tuple(random_scene(rng, EVAL) for _ in kinds)
            ideal = random_scene(rng)
            for kind, concept in zip(kinds, concepts):
                ideal = ideal.replace(**{name: getattr(concept, name) for name in CONCEPT_ATTRIBUTES[kind]})
            cases.append(Case(tuple(kinds), concepts, ideal, seed=int(rng.integers(2**31))))
    return cases


@dataclass
class CaseScore:
    cp: float
    pf: float
    copy_paste: Optional[float]  # None when no concept image had an attribute that could show up


def score_case(case: Case, read: Dict[str, str]) -> CaseScore:
    cp = float(np.mean([np.mean([read[n] == getattr(c, n) for n in names])
                        for c, names in zip(case.concepts, case.concept_names())]))
    stated = case.stated_names()
    pf = float(np.mean([read[n] == getattr(case.ideal, n) for n in stated])) if stated else 1.0
    copies = []
    for concept, names in zip(case.concepts, case.concept_names()):
        for name in ATTRIBUTES:
            if name not in names and getattr(concept, name) != getattr(case.ideal, name):
                copies.append(read[name] == getattr(concept, name))
    return CaseScore(cp, pf, float(np.mean(copies)) if copies else None)


# A method: per case, (prompt, [TokenConcept ...]) to generate with.
Method = Callable[[Case], Tuple[str, List[TokenConcept]]]


@dataclass
class MethodResult:
    name: str
    scores: List[CaseScore] = field(default_factory=list)
    cases: List[Case] = field(default_factory=list)
    seconds: float = 0.0
    method_seconds: float = 0.0  # the part spent making the Δ tables (learning, predicting)
    images: List[torch.Tensor] = field(default_factory=list)  # the first ``keep_images`` outputs, for a grid


def evaluate(name: str, method: Method, cases: Sequence[Case], pipe, judge, *, steps: int, cfg: float,
             batch_size: int = 32, keep_images: int = 0,
             progress: Optional[Callable[[int], None]] = None) -> MethodResult:
    from .sampling import generate

    result = MethodResult(name)
    started = time.perf_counter()
    for start in range(0, len(cases), batch_size):
        chunk = list(cases[start:start + batch_size])
        made = time.perf_counter()
        prompts, concepts = zip(*(method(case) for case in chunk))
        result.method_seconds += time.perf_counter() - made
        images = generate(pipe, list(prompts), [case.seed for case in chunk], steps=steps, cfg=cfg,
                          concepts=list(concepts))
        for case, read, image in zip(chunk, judge.read(images.float()), images):
            result.scores.append(score_case(case, read))
            result.cases.append(case)
            if len(result.images) < keep_images:
                result.images.append(image)
        if progress is not None:
            progress(len(chunk))
    result.seconds = time.perf_counter() - started
    return result


def bootstrap_interval(values: Sequence[float], *, seed: int = 0, draws: int = 2000,
                       statistic: Callable[[np.ndarray], float] = np.mean) -> Tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(len(values), size=len(values))]) for _ in range(draws)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarise(result: MethodResult, *, seed: int = 0) -> Dict[str, object]:
    """Means and 95% bootstrap intervals; CP·PF is the product of the means (its interval resamples cases)."""
    cp = np.array([s.cp for s in result.scores])
    pf = np.array([s.pf for s in result.scores])
    copies = [s.copy_paste for s in result.scores if s.copy_paste is not None]
    pairs = np.stack([cp, pf], axis=1)
    rng = np.random.default_rng(seed)
    products = []
    for _ in range(2000):
        sample = pairs[rng.integers(len(pairs), size=len(pairs))]
        products.append(sample[:, 0].mean() * sample[:, 1].mean())
    return {
        "method": result.name, "images": len(result.scores),
        "cp": float(cp.mean()), "cp_95": bootstrap_interval(cp, seed=seed),
        "pf": float(pf.mean()), "pf_95": bootstrap_interval(pf, seed=seed),
        "cp_pf": float(cp.mean() * pf.mean()),
        "cp_pf_95": (float(np.percentile(products, 2.5)), float(np.percentile(products, 97.5))),
        "copy_paste": float(np.mean(copies)) if copies else None,
        "copy_paste_95": bootstrap_interval(copies, seed=seed) if copies else None,
        "seconds": round(result.seconds, 1), "method_seconds": round(result.method_seconds, 1),
        "seconds_per_image": round(result.seconds / max(1, len(result.scores)), 3),
        "by_kinds": by_kinds(result),
    }


def by_kinds(result: MethodResult) -> Dict[str, Dict[str, float]]:
    """CP, PF and CP·PF per kind set ("object", "surface+pose", ...): which concepts a method carries."""
    groups: Dict[str, List[CaseScore]] = {}
    for case, score in zip(result.cases, result.scores):
        groups.setdefault("+".join(case.kinds), []).append(score)
    summary = {}
    for kinds, scores in groups.items():
        cp, pf = float(np.mean([s.cp for s in scores])), float(np.mean([s.pf for s in scores]))
        summary[kinds] = {"images": len(scores), "cp": cp, "pf": pf, "cp_pf": cp * pf}
    return summary


def cp_pf_difference(a: MethodResult, b: MethodResult, *, seed: int = 0,
                     draws: int = 2000) -> Tuple[float, Tuple[float, float]]:
    """CP·PF of ``a`` minus that of ``b`` on the same cases, with a paired 95% bootstrap interval (the cases are
    resampled together, so the noise of the shared prompts and seeds cancels)."""
    if [c.seed for c in a.cases] != [c.seed for c in b.cases] or not a.cases:
        raise ValueError("cp_pf_difference compares two methods on the same cases")
    scores = np.array([[s.cp, s.pf, t.cp, t.pf] for s, t in zip(a.scores, b.scores)])

    def difference(rows: np.ndarray) -> float:
        means = rows.mean(axis=0)
        return float(means[0] * means[1] - means[2] * means[3])

    rng = np.random.default_rng(seed)
    stats = [difference(scores[rng.integers(len(scores), size=len(scores))]) for _ in range(draws)]
    return difference(scores), (float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5)))


def cp_difference_by_kinds(a: MethodResult, b: MethodResult, *, seed: int = 0,
                           draws: int = 2000) -> Dict[str, Dict[str, object]]:
    """Per kind set, CP of ``a`` minus that of ``b`` on the same cases, with a paired 95% bootstrap interval: does a
    method carry that kind (lighting, background, ...) beyond the set's noise."""
    if [c.seed for c in a.cases] != [c.seed for c in b.cases] or not a.cases:
        raise ValueError("cp_difference_by_kinds compares two methods on the same cases")
    groups: Dict[str, List[float]] = {}
    for case, s, t in zip(a.cases, a.scores, b.scores):
        groups.setdefault("+".join(case.kinds), []).append(s.cp - t.cp)
    return {kinds: {"cp_minus": float(np.mean(values)),
                    "cp_minus_95": bootstrap_interval(values, seed=seed, draws=draws)}
            for kinds, values in groups.items()}


def table_rows(row_specs: Sequence[str], sets: Sequence[str], make_method: Callable[[str, str], Method], pipe, judge, *,
               count: int, learn_count: int, seed: int, steps: int, cfg: float, grid_set: Optional[str] = None,
               grid_rows: int = 0, versus: Optional[str] = None, progress: Optional[Callable[[str, int], Any]] = None,
               on_row: Optional[Callable[[Dict[str, Any]], None]] = None) -> Tuple[List[Dict[str, Any]], List[MethodResult]]:
    """The table: every row (``name`` or ``name=CHECKPOINT``, made by ``make_method``) on every test set, with its
    summary and, for rows after the bare word's, the paired difference from it on the same cases; with ``versus``
    (a row's name), also the paired difference from that row (e.g. an ablation against the full model).

    ``progress(description, total)`` gives a context manager with ``update(n)`` (a progress bar); ``on_row`` sees
    each row as it is done. Returns the rows and the results on ``grid_set`` (for :func:`picture_grid`)."""
    kind_sets = {"single": list(SINGLE), **{f"multi{n}": list(MULTI[n]) for n in MULTI}}
    rows: List[Dict[str, Any]] = []
    grid_results: List[MethodResult] = []
    earlier: Dict[Tuple[str, str], Dict[int, CaseScore]] = {}  # (row name, set): its score per case seed

    def paired_with(name: str, set_name: str, result: MethodResult) -> Optional[MethodResult]:
        # the row ``name`` on the same cases (the learn rows' cases are the first of each kind set's)
        scores = earlier.get((name, set_name), {})
        if not all(case.seed in scores for case in result.cases):
            return None
        return MethodResult(name, [scores[case.seed] for case in result.cases], list(result.cases))

    for spec in row_specs:
        name, _, checkpoint = spec.partition("=")
        method = make_method(name, checkpoint)
        per_set = learn_count if name.startswith(("learn", "hybrid")) else count
        for set_name in sets:
            cases = make_cases(kind_sets[set_name], per_set, seed)
            keep = grid_rows if set_name == grid_set else 0
            with (progress(f"{name} {set_name}", len(cases)) if progress else contextlib.nullcontext()) as bar:
                result = evaluate(name, method, cases, pipe, judge, steps=steps, cfg=cfg, keep_images=keep,
                                  progress=bar.update if bar is not None else None)
            if set_name == grid_set:
                grid_results.append(result)
            rows.append({"set": set_name, **summarise(result, seed=seed)})
            floor = paired_with("bare", set_name, result) if name != "bare" else None
            if floor is not None:
                difference, interval = cp_pf_difference(result, floor, seed=seed)
                rows[-1].update(cp_pf_minus_bare=difference, cp_pf_minus_bare_95=interval,
                                cp_minus_bare_by_kinds=cp_difference_by_kinds(result, floor, seed=seed))
            reference = paired_with(versus, set_name, result) if versus and name != versus else None
            if reference is not None:
                difference, interval = cp_pf_difference(result, reference, seed=seed)
                rows[-1].update(versus=versus, cp_pf_minus_versus=difference, cp_pf_minus_versus_95=interval,
                                cp_minus_versus_by_kinds=cp_difference_by_kinds(result, reference, seed=seed))
            earlier[(name, set_name)] = {case.seed: score for case, score in zip(result.cases, result.scores)}
            if on_row is not None:
                on_row(rows[-1])
    return rows, grid_results


def picture_grid(results: Sequence[MethodResult], count: int, scale: int = 2) -> np.ndarray:
    """(H, W, 3) uint8: per case (row), its concept images, then each method's output for the same seed (columns),
    with the prompt and the method names written in."""
    from .demo import image_to_uint8, label_image, labelled_row, stack_rows, upscale
    from .scene import render

    rows = []
    for index in range(min(count, *(len(r.images) for r in results))):
        case = results[0].cases[index]
        cells = [label_image(upscale(render(concept), scale), f'"{word}"', 64 * scale)
                 for concept, word in zip(case.concepts, case.words)]
        cells += [label_image(upscale(image_to_uint8(result.images[index]), scale), result.name, 64 * scale)
                  for result in results]
        rows.append(labelled_row(cells, case.prompt))
    return stack_rows(rows)


def all_text_positions(length: int) -> List[int]:
    return list(range(length))


def description(concept: Scene, kind: str) -> str:
    """p+: the generator's exact description of the concept (what pre-training regresses to)."""
    return describe(concept, kind)


__all__ = ["Case", "CaseScore", "MULTI", "MethodResult", "SINGLE", "all_text_positions", "bootstrap_interval",
           "cp_pf_difference", "description", "evaluate", "make_cases", "picture_grid", "score_case", "summarise"]
