"""What flows between the nodes: concept embeddings, concept lists, and their resolution.

A node graph chains Predictor nodes, one per concept image. Each Predictor
adds a :class:`PredictionRequest` to the list instead of running the adapter
at once, and whoever needs the Δ tables (Modulation Apply, Save Concept)
calls :func:`resolve_concepts`, which runs each adapter once on all of its
requests: N chained concepts cost one batched adapter forward, not N.

Concepts loaded from files (or learned) are already :class:`Concept` objects
and pass through unchanged. Nothing here imports ComfyUI: the ComfyUI layer
supplies the adapter runner (which handles device placement and ComfyUI's
model management).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from .adapter import pack_image_tokens
from .concept import Concept
from .errors import ModAdapterError


@dataclass(frozen=True)
class ConceptEmbeds:
    """A concept image (or several) and its word, encoded: the Concept Encoder's output.

    image_tokens: (R, T, D) penultimate CLIP vision tokens of R reference images.
    token_mask: (R, T) bool, True = the adapter may attend to the token; None = all.
    word_pooled: (1, 768) CLIP-L pooled embedding of the bare concept word.
    """

    word: str
    image_tokens: torch.Tensor
    word_pooled: torch.Tensor
    token_mask: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if not self.word or not self.word.strip():
            raise ModAdapterError("The concept word is empty: type the word the prompt uses for this concept (e.g. 'dog').")
        if self.image_tokens.ndim != 3 or 0 in self.image_tokens.shape:
            raise ModAdapterError(f"Concept {self.word!r}: image tokens must be (references, tokens, width), "
                                  f"got {tuple(self.image_tokens.shape)}")
        if self.token_mask is not None and tuple(self.token_mask.shape) != tuple(self.image_tokens.shape[:2]):
            raise ModAdapterError(f"Concept {self.word!r}: token mask {tuple(self.token_mask.shape)} does not match "
                                  f"the image tokens {tuple(self.image_tokens.shape[:2])}")
        if not bool(torch.isfinite(self.image_tokens).all()) or not bool(torch.isfinite(self.word_pooled).all()):
            raise ModAdapterError(f"Concept {self.word!r}: the image or word embedding contains NaN or infinite values; "
                                  f"check the input image and the CLIP / CLIP vision models.")


class DeltaPredictor(Protocol):
    """Runs one adapter on a batch: the ComfyUI layer implements it (device, model management)."""

    name: str
    num_double_blocks: int

    def predict(self, neutral: torch.Tensor, image_tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """(C, D_mod), (C, T, D_img), (C, T) -> Δ (C, num_blocks, D_mod) on the CPU, float32."""


@dataclass(frozen=True)
class PredictionRequest:
    """A concept to be predicted by `runner` when the list is resolved."""

    runner: Any  # a DeltaPredictor
    embeds: ConceptEmbeds
    neutral: torch.Tensor  # (D_mod,) = FLUX vector_in(word_pooled)
    strength: float = 1.0
    base_model: str = "flux1"

    @property
    def word(self) -> str:
        return self.embeds.word


ConceptItem = Union[Concept, PredictionRequest]


@dataclass(frozen=True)
class ConceptList:
    """The CONCEPTS socket: an ordered, immutable list; chaining makes a new list.

    regions: per item, the region MASK (H, W) a Concept Region node gave it, or None (the whole image);
    items without one given get None.
    """

    items: Tuple[ConceptItem, ...] = field(default_factory=tuple)
    regions: Tuple[Optional[torch.Tensor], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple(self.regions) + (None,) * (len(self.items) - len(self.regions)))

    def plus(self, *items: ConceptItem) -> "ConceptList":
        return ConceptList(self.items + tuple(items), self.regions)

    def with_region(self, mask: torch.Tensor, words: Sequence[str] = ()) -> "ConceptList":
        """The same list with ``mask`` as the region of the concepts named in ``words`` (any case), or, with no
        words, of every concept that has no region yet. A word that no concept has is an error."""
        wanted = {w.strip().lower() for w in words if w.strip()}
        missing = wanted - {w.strip().lower() for w in self.words}
        if missing:
            raise ModAdapterError(f"Concept Region: no concept with the word(s) {sorted(missing)} in its CONCEPTS "
                                  f"input (it has {self.words}).")
        regions = list(self.regions)
        chosen = [i for i, item in enumerate(self.items)
                  if (item.word.strip().lower() in wanted if wanted else regions[i] is None)]
        if not chosen:
            raise ModAdapterError("Concept Region: every concept in its CONCEPTS input already has a region; name the "
                                  "word(s) this mask is for.")
        for i in chosen:
            regions[i] = mask
        return ConceptList(self.items, tuple(regions))

    @property
    def words(self) -> List[str]:
        return [item.word for item in self.items]

    def __len__(self) -> int:
        return len(self.items)


def chain(previous: Optional[ConceptList], *items: ConceptItem) -> ConceptList:
    return (previous or ConceptList()).plus(*items)


def resolve_concepts(concepts: ConceptList) -> List[Concept]:
    """Every item as a Concept, in order; each adapter runs once for all its requests."""
    if not isinstance(concepts, ConceptList):
        raise ModAdapterError(f"Expected CONCEPTS, got {type(concepts).__name__}")
    resolved: Dict[int, Concept] = {}
    groups: Dict[int, List[int]] = {}
    for index, item in enumerate(concepts.items):
        if isinstance(item, Concept):
            resolved[index] = item
        elif isinstance(item, PredictionRequest):
            groups.setdefault(id(item.runner), []).append(index)
        else:
            raise ModAdapterError(f"CONCEPTS holds an unknown item {type(item).__name__}")

    for indices in groups.values():
        requests = [concepts.items[i] for i in indices]
        runner = requests[0].runner
        tokens, key_mask = pack_image_tokens([r.embeds.image_tokens for r in requests],
                                             [r.embeds.token_mask for r in requests])
        neutral = torch.stack([r.neutral.reshape(-1).float() for r in requests])
        with torch.no_grad():
            deltas = runner.predict(neutral, tokens, key_mask)
        if deltas.shape[0] != len(requests):
            raise ModAdapterError(f"Adapter {runner.name} returned {deltas.shape[0]} Δ tables for {len(requests)} concepts")
        for i, request, delta in zip(indices, requests, deltas):
            resolved[i] = Concept(
                word=request.word,
                delta=delta.detach().float().cpu(),
                strength=request.strength,
                source={"kind": "predicted", "adapter": runner.name,
                        "references": int(request.embeds.image_tokens.shape[0])},
                base_model=request.base_model,
                num_double_blocks=runner.num_double_blocks,
            )
    return [resolved[i] for i in range(len(concepts.items))]


def comma_separated_words(text: str) -> List[str]:
    """The words a node's text input lists, separated by commas or line breaks, stripped; empty ones dropped."""
    return [w.strip() for w in (text or "").replace("\n", ",").split(",") if w.strip()]


def check_unique_words(words: Sequence[str]) -> None:
    seen = {}
    for w in words:
        key = w.strip().lower()
        if key in seen:
            raise ModAdapterError(
                f"Two concepts use the word {w!r}. Each concept needs its own word in the prompt "
                f"(e.g. 'dog' and 'cat'); to combine two images of one concept, batch them into one Concept Encoder."
            )
        seen[key] = w
