"""Where a concept word sits in the text sequence FLUX reads.

Mod-Adapter gives the prompt tokens of a concept word ("dog", "pose",
"golden hour") their own modulation, so it must know exactly which rows of the
text conditioning belong to each word. This module answers that for any
tokenizer that can turn text into ids and an id back into its piece.

How a word is found
-------------------
The prompt is tokenized exactly as the model sees it, each piece is turned
back into the text it covers (SentencePiece's "▁" becomes a space, CLIP's
"</w>" ends a word), and the concept word, normalised by the same tokenizer,
is searched in that text with a regular expression. The tokens whose text
overlaps a match are the word's positions. Searching the text rather than the
word's id sequence makes one rule cover what id matching needs a special case
for each: "(dog" gives the piece "dog" without a word-start marker, "Dog"
gives other ids than "dog", "DOG" splits into different pieces, ComfyUI's
weight syntax "(dog:1.2)" tokenizes "dog" as a segment of its own, and
"hotdog" contains the ids of "dog" without containing the word.

Matching rules (all of them documented in the error messages too):

* case is ignored unless ``case_sensitive=True``;
* the match must stand alone: no letter, digit or "_" right before it or
  right after it, so "dog" does not match "dogma" or "hotdog", while
  punctuation next to it is fine ("dog,", "(dog)", "dog's", "dog.");
* a plural of the concept's last word is accepted and its suffix pieces are
  part of the span: "+s" always ("dogs", "dogs'"), "+es" after s, x, z, ch, sh
  or o ("foxes", "buses", "tomatoes"), consonant+"y" → "ies" ("puppies").
  Irregular plurals ("mice") are not: write the word as it is in the prompt;
* a multi-word concept ("golden hour") matches its words separated by any
  whitespace; tokens that are only whitespace (a standalone "▁") are never
  part of a span;
* ``occurrence=None`` takes every occurrence, ``occurrence=n`` the n-th
  (1-based, counted over all places the word stands in the prompt);
* when the spans of two concepts overlap, the one whose span contains the
  other's takes those tokens (maximal munch: "hot dog" takes the "dog" of
  "hot dog", the concept "dog" keeps its other occurrences, and is an error if
  none is left); equal spans go to the longer concept ("dogs" over "dog");
  spans that overlap without one containing the other ("red dog" and
  "dog collar" in "red dog collar") are an error;
* the same word given twice is an error unless both name different
  occurrences;
* a token the model never reads (past CLIP's 77-token window, or past a
  truncation length set on the layout) is an error; T5 in ComfyUI has no such
  limit, its sequence just grows beyond 256.

Positions are indices in the sequence the model reads: ``prefix_len`` (0 for
FLUX's T5, 1 for CLIP's start token) plus the index among the prompt's ids.

Nothing here imports ComfyUI or transformers: tokenizers are duck-typed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import ConceptWordNotFoundError, ModAdapterError

__all__ = [
    "ConceptQuery",
    "TextSequenceLayout",
    "find_concept_positions",
    "ids_from_comfy_batches",
    "tokenized_prompt_report",
    "sentencepiece_piece_text",
    "clip_bpe_piece_text",
    "EMBEDDING_ID",
    "T5_MIN_LENGTH",
    "CLIP_MAX_LENGTH",
]

# ComfyUI pads FLUX's T5 sequence to at least this many tokens.
T5_MIN_LENGTH = 256
# CLIP-L reads 77 tokens: start token, at most 75 text tokens, end token.
CLIP_MAX_LENGTH = 77
# ComfyUI writes max_length=99999999 for "no limit" (T5); anything this large is none.
_COMFY_NO_LIMIT = 10_000_000
# Id standing for a ComfyUI textual-inversion embedding in the token list (it
# occupies a position but has no id).
EMBEDDING_ID = -1

_SENTENCEPIECE_SPACE = "\u2581"  # "▁"
_CLIP_END_OF_WORD = "</w>"
# Text of an unknown-character token: not a word character, so it separates
# words, but not whitespace either, so it is kept when it overlaps a match.
_OPAQUE_TEXT = "\ufffd"


# --------------------------------------------------------------------------
# Piece → text
# --------------------------------------------------------------------------


def sentencepiece_piece_text(piece: str) -> str:
    """Text a SentencePiece piece covers: the word-start marker is a space."""
    return piece.replace(_SENTENCEPIECE_SPACE, " ")


def _bytes_to_unicode() -> dict:
    # The byte ↔ printable-character table of GPT-2/CLIP byte-level BPE: CLIP's
    # vocabulary writes every byte of the UTF-8 text as one of these characters.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


_CLIP_BYTE_DECODER = {char: byte for byte, char in _bytes_to_unicode().items()}


def clip_bpe_piece_text(piece: str) -> str:
    """Text a CLIP BPE piece covers: byte-level characters decoded, "</w>" ends the word."""
    ends_word = piece.endswith(_CLIP_END_OF_WORD)
    if ends_word:
        piece = piece[: -len(_CLIP_END_OF_WORD)]
    raw = bytearray()
    for char in piece:
        byte = _CLIP_BYTE_DECODER.get(char)
        if byte is None:
            raw.extend(char.encode("utf-8"))
        else:
            raw.append(byte)
    # A character whose UTF-8 bytes are split over two pieces decodes to U+FFFD
    # in each; the text stays aligned piece by piece, which is what matters.
    text = raw.decode("utf-8", errors="replace")
    return text + " " if ends_word else text


_PIECE_STYLES = {
    "sentencepiece": sentencepiece_piece_text,
    "clip_bpe": clip_bpe_piece_text,
}

_KIND_DEFAULTS = {
    # kind: (piece style, has a start token, min_length, max_length, display name)
    "t5": ("sentencepiece", False, T5_MIN_LENGTH, None, "T5"),
    "clip": ("clip_bpe", True, CLIP_MAX_LENGTH, CLIP_MAX_LENGTH, "CLIP"),
}


# --------------------------------------------------------------------------
# Layout of the text sequence
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSequenceLayout:
    """A tokenizer together with the shape of the sequence the model reads.

    The model reads ``prefix_ids`` (CLIP's start token; nothing for T5), then
    the prompt's ids, then ``eos_id``, then ``pad_id`` up to ``min_length``.
    With ``max_length`` set, only the first ``max_length`` tokens are read
    (the end token included), so text tokens past ``max_text_position`` are
    lost. Build one with :meth:`from_hf_tokenizer`, :meth:`from_comfy_tokenizer`
    or :meth:`from_callables`.
    """

    name: str
    encode_fn: Callable[[str], Sequence[Any]]
    id_to_piece_fn: Callable[[int], Any]
    piece_to_text: Callable[[str], str]
    prefix_ids: Tuple[int, ...]
    eos_id: int
    pad_id: int
    min_length: int
    max_length: Optional[int] = None
    unk_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < self.prefix_len + 2:
            raise ModAdapterError(
                f"{self.name}: max_length {self.max_length} leaves no room for text "
                f"after {self.prefix_len} start token(s) and the end token."
            )

    # -- the adapter interface ------------------------------------------------

    @property
    def prefix_len(self) -> int:
        """Tokens the model's sequence has before the prompt's first token."""
        return len(self.prefix_ids)

    @property
    def max_text_position(self) -> Optional[int]:
        """Last sequence position of a text token the model reads (None: no limit)."""
        if self.max_length is None:
            return None
        return self.max_length - 2  # the end token takes position max_length - 1

    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` as the model reads them, without start, end or pad tokens."""
        return [int(token_id) for token_id in self.encode_fn(text)]

    def id_to_piece(self, token_id: int) -> str:
        if token_id == EMBEDDING_ID:
            return "<embedding>"
        piece = self.id_to_piece_fn(token_id)
        return f"<id {token_id}>" if piece is None else str(piece)

    def token_text(self, token_id: int) -> str:
        """The stretch of prompt text a token covers, as used for matching."""
        if token_id in (self.eos_id, self.pad_id) or token_id in self.prefix_ids:
            # A special token inside the ids (ComfyUI's CLIP chunk boundaries)
            # separates words and never belongs to one.
            return " "
        if token_id == EMBEDDING_ID or token_id == self.unk_id:
            return _OPAQUE_TEXT
        return self.piece_to_text(self.id_to_piece(token_id))

    def full_sequence(self, ids: Sequence[int]) -> List[int]:
        """The token ids the model reads for a prompt whose ids are ``ids``."""
        text_ids = list(ids)
        if self.max_length is not None:
            text_ids = text_ids[: self.max_length - self.prefix_len - 1]
        sequence = list(self.prefix_ids) + text_ids + [self.eos_id]
        sequence += [self.pad_id] * max(0, self.min_length - len(sequence))
        return sequence

    # -- constructors -----------------------------------------------------------

    @classmethod
    def from_hf_tokenizer(
        cls,
        tokenizer: Any,
        kind: str = "t5",
        *,
        min_length: Optional[int] = None,
        max_length: Optional[int] = -1,
    ) -> "TextSequenceLayout":
        """Layout for a Hugging Face tokenizer (T5TokenizerFast, CLIPTokenizer[Fast]).

        ``kind="t5"``: no start token, end id 1, pad id 0, padded to 256 and
        never truncated (ComfyUI). ``kind="clip"``: start token, 77 tokens
        (BOS + 75 + EOS), padded with the tokenizer's pad id. Pass
        ``min_length``/``max_length`` to describe another pipeline (diffusers'
        FLUX pads and truncates T5 to ``max_sequence_length``, e.g. 512);
        ``max_length=None`` means no truncation, the default -1 the kind's own.

        ComfyUI prompts should go through :meth:`from_comfy_tokenizer`, which
        tokenizes with ComfyUI's weight syntax exactly as the model sees it.
        """
        if kind not in _KIND_DEFAULTS:
            raise ModAdapterError(f"Unknown tokenizer kind {kind!r}; use 't5' or 'clip'.")
        style, has_start, default_min, default_max, display = _KIND_DEFAULTS[kind]
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ModAdapterError(f"The {display} tokenizer has no end-of-sequence token.")
        prefix_ids: Tuple[int, ...] = ()
        if has_start:
            bos_id = tokenizer.bos_token_id
            if bos_id is None:
                raise ModAdapterError(f"The {display} tokenizer has no start token.")
            prefix_ids = (int(bos_id),)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = eos_id  # CLIP pads with its end token when it has no pad token

        def encode(text: str) -> Sequence[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        return cls(
            name=display,
            encode_fn=encode,
            id_to_piece_fn=tokenizer.convert_ids_to_tokens,
            piece_to_text=_PIECE_STYLES[style],
            prefix_ids=prefix_ids,
            eos_id=int(eos_id),
            pad_id=int(pad_id),
            min_length=default_min if min_length is None else min_length,
            max_length=default_max if max_length == -1 else max_length,
            unk_id=getattr(tokenizer, "unk_token_id", None),
        )

    @classmethod
    def from_comfy_tokenizer(
        cls,
        sd_tokenizer: Any,
        tokenize: Optional[Callable[[str], Any]] = None,
        kind: Optional[str] = None,
    ) -> "TextSequenceLayout":
        """Layout for one of ComfyUI's ``SDTokenizer`` objects.

        For FLUX: ``clip.tokenizer.t5xxl`` (the T5 sequence, what the DiT reads)
        or ``clip.tokenizer.clip_l``. The prompt is tokenized by
        ``tokenize(text)`` — by default ``sd_tokenizer.tokenize_with_weights``,
        or e.g. ``lambda t: clip.tokenize(t)["t5xxl"]`` — so weight syntax,
        escapes and embeddings give the same positions as the conditioning.
        Pieces come from the Hugging Face tokenizer in ``sd_tokenizer.tokenizer``.
        """
        hf_tokenizer = getattr(sd_tokenizer, "tokenizer", None)
        if hf_tokenizer is None or not hasattr(hf_tokenizer, "convert_ids_to_tokens"):
            raise ModAdapterError(
                "Expected a ComfyUI SDTokenizer (e.g. clip.tokenizer.t5xxl) with a "
                "Hugging Face tokenizer in its .tokenizer attribute."
            )
        if getattr(sd_tokenizer, "pad_left", False):
            raise ModAdapterError(
                "This text encoder pads on the left, so prompt positions depend on "
                "the padding; only right-padded encoders (FLUX's T5 and CLIP) are supported."
            )
        if kind is None:
            class_name = type(hf_tokenizer).__name__.lower()
            if "clip" in class_name:
                kind = "clip"
            elif "t5" in class_name:
                kind = "t5"
            else:
                raise ModAdapterError(
                    f"Cannot tell the piece format of {type(hf_tokenizer).__name__}; "
                    "pass kind='t5' (SentencePiece) or kind='clip' (CLIP BPE)."
                )
        if kind not in _KIND_DEFAULTS:
            raise ModAdapterError(f"Unknown tokenizer kind {kind!r}; use 't5' or 'clip'.")
        style, _, _, _, display = _KIND_DEFAULTS[kind]

        start_token = getattr(sd_tokenizer, "start_token", None)
        prefix_ids = () if start_token is None else (int(start_token),)
        end_token = getattr(sd_tokenizer, "end_token", None)
        if end_token is None:
            raise ModAdapterError("The ComfyUI tokenizer has no end token; cannot find the prompt's end.")
        pad_token = getattr(sd_tokenizer, "pad_token", None)
        pad_id = int(end_token if pad_token is None else pad_token)
        max_length = getattr(sd_tokenizer, "max_length", None)
        if max_length is not None and max_length >= _COMFY_NO_LIMIT:
            max_length = None
        min_length = getattr(sd_tokenizer, "min_length", None) or 0
        if getattr(sd_tokenizer, "pad_to_max_length", False) and max_length is not None:
            min_length = max(min_length, max_length)

        if tokenize is None:
            tokenize = sd_tokenizer.tokenize_with_weights
        eos_id = int(end_token)

        def encode(text: str) -> List[int]:
            return ids_from_comfy_batches(tokenize(text), len(prefix_ids), eos_id, pad_id)

        return cls(
            name=display,
            encode_fn=encode,
            id_to_piece_fn=hf_tokenizer.convert_ids_to_tokens,
            piece_to_text=_PIECE_STYLES[style],
            prefix_ids=prefix_ids,
            eos_id=eos_id,
            pad_id=pad_id,
            min_length=min_length,
            max_length=max_length,
            unk_id=getattr(hf_tokenizer, "unk_token_id", None),
        )

    @classmethod
    def from_callables(
        cls,
        encode: Callable[[str], Sequence[Any]],
        id_to_piece: Callable[[int], Any],
        *,
        piece_style: Union[str, Callable[[str], str]] = "sentencepiece",
        prefix_ids: Iterable[int] = (),
        eos_id: int,
        pad_id: int,
        min_length: int = 0,
        max_length: Optional[int] = None,
        unk_id: Optional[int] = None,
        name: str = "text encoder",
    ) -> "TextSequenceLayout":
        """Layout from plain functions.

        ``encode(text)`` returns the prompt's ids without special tokens;
        ``piece_style`` is "sentencepiece", "clip_bpe" or a function from a
        piece to the text it covers (a word-start marker as a leading space).
        """
        if isinstance(piece_style, str):
            if piece_style not in _PIECE_STYLES:
                raise ModAdapterError(
                    f"Unknown piece style {piece_style!r}; use one of {sorted(_PIECE_STYLES)} or a function."
                )
            piece_to_text = _PIECE_STYLES[piece_style]
        else:
            piece_to_text = piece_style
        return cls(
            name=name,
            encode_fn=encode,
            id_to_piece_fn=id_to_piece,
            piece_to_text=piece_to_text,
            prefix_ids=tuple(int(i) for i in prefix_ids),
            eos_id=int(eos_id),
            pad_id=int(pad_id),
            min_length=int(min_length),
            max_length=max_length,
            unk_id=unk_id,
        )


def ids_from_comfy_batches(batches: Sequence[Sequence[Any]], prefix_len: int, eos_id: int, pad_id: int) -> List[int]:
    """The prompt's ids from ComfyUI's ``tokenize_with_weights`` output.

    ``batches`` is a list of batches of ``(token, weight)`` or
    ``(token, weight, word_id)`` entries. The batches are concatenated (CLIP
    prompts longer than 75 tokens come as several 77-token chunks; their
    boundary tokens stay in the list so every later index is the true
    position), the start token(s) are removed and so are the trailing end
    and pad tokens. An embedding (a tensor instead of an id) becomes
    :data:`EMBEDDING_ID`.
    """
    tokens: List[int] = []
    for batch in batches:
        for entry in batch:
            token = entry[0] if isinstance(entry, (tuple, list)) else entry
            tokens.append(int(token) if isinstance(token, int) or _is_integer_like(token) else EMBEDDING_ID)
    tokens = tokens[prefix_len:]
    while tokens and tokens[-1] == pad_id:
        tokens.pop()
    if tokens and tokens[-1] == eos_id:
        tokens.pop()
    return tokens


def _is_integer_like(token: Any) -> bool:
    # numpy / 0-d torch integers; a 1-d tensor (an embedding vector) is not.
    try:
        return getattr(token, "ndim", 0) == 0 and int(token) == token
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------
# Concept queries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptQuery:
    """A concept word to find: every occurrence (None) or the n-th (1-based)."""

    word: str
    occurrence: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.word, str):
            raise ModAdapterError(f"A concept word must be text, got {type(self.word).__name__}.")
        if not self.word.strip():
            raise ModAdapterError("A concept word is empty: type the word of the prompt this concept applies to.")
        if self.occurrence is not None and (
            isinstance(self.occurrence, bool) or not isinstance(self.occurrence, int) or self.occurrence < 1
        ):
            raise ModAdapterError(
                f"Occurrence {self.occurrence!r} of concept {self.word!r} is invalid: "
                "use 1 for the first occurrence, 2 for the second, ... or leave it empty for all."
            )

    def describe(self) -> str:
        if self.occurrence is None:
            return repr(self.word)
        return f"{self.word!r} (occurrence {self.occurrence})"


@dataclass(frozen=True)
class _PromptTokens:
    ids: List[int]
    starts: List[int]  # character span of each token in `text`
    ends: List[int]
    text: str  # the prompt as the tokenizer saw it, piece texts concatenated


@dataclass(frozen=True)
class _Match:
    concept: int  # index into the concept list
    start: int  # character span in _PromptTokens.text
    end: int
    tokens: Tuple[int, ...]  # indices into _PromptTokens.ids


def _tokenize_prompt(layout: TextSequenceLayout, prompt: str) -> _PromptTokens:
    ids = layout.encode(prompt)
    starts, ends, parts = [], [], []
    offset = 0
    for token_id in ids:
        piece_text = layout.token_text(token_id)
        starts.append(offset)
        offset += len(piece_text)
        ends.append(offset)
        parts.append(piece_text)
    return _PromptTokens(ids=ids, starts=starts, ends=ends, text="".join(parts))


def _word_text(layout: TextSequenceLayout, word: str) -> Tuple[List[int], str]:
    """The word's ids and its text as the tokenizer normalises it (case, spaces, unicode)."""
    ids = layout.encode(word)
    text = " ".join("".join(layout.token_text(i) for i in ids).split())
    return ids, text


_PLURAL_ES_ENDINGS = ("s", "x", "z", "ch", "sh", "o")
_VOWELS = "aeiou"


def concept_word_pattern(words: List[str], *, plurals: bool, word_boundaries: bool, flags: int) -> "re.Pattern[str]":
    parts = [re.escape(w) for w in words]
    last = words[-1]
    if plurals and last[-1].isalpha():
        lower = last.lower()
        if len(lower) >= 2 and lower[-1] == "y" and lower[-2] not in _VOWELS:
            parts[-1] = re.escape(last[:-1]) + "(?:y|ies)"
        elif lower.endswith(_PLURAL_ES_ENDINGS):
            parts[-1] = re.escape(last) + "(?:es)?"
        else:
            parts[-1] = re.escape(last) + "s?"
    body = r"\s+".join(parts)
    if word_boundaries:
        # Only where the concept itself starts/ends with a word character: a
        # concept such as "'s" or "(" has no word boundary to respect.
        if re.match(r"\w", words[0][0]):
            body = r"(?<!\w)" + body
        if re.match(r"\w", last[-1]):
            body = body + r"(?!\w)"
    return re.compile(body, flags)


def _tokens_in_span(tokens: _PromptTokens, start: int, end: int) -> Tuple[int, ...]:
    return tuple(
        index
        for index in range(len(tokens.ids))
        if tokens.starts[index] < end
        and tokens.ends[index] > start
        and tokens.text[tokens.starts[index] : tokens.ends[index]].strip()
    )


def _positions_text(layout: TextSequenceLayout, token_indices: Iterable[int]) -> str:
    return ", ".join(str(layout.prefix_len + i) for i in token_indices)


def find_concept_positions(
    layout: TextSequenceLayout,
    prompt: str,
    concepts: Sequence[Union[ConceptQuery, str]],
    *,
    case_sensitive: bool = False,
    plurals: bool = True,
) -> List[List[int]]:
    """Sequence positions of each concept word in ``prompt``.

    Returns one sorted list per concept, in the order given; a position is an
    index into the sequence the model reads (``layout.prefix_len`` + index
    among the prompt's ids). The matching rules are in this module's
    docstring. Raises :class:`ConceptWordNotFoundError` for a word that is not
    in the prompt (or has fewer occurrences than asked for) and
    :class:`ModAdapterError` for every other problem.
    """
    queries = [ConceptQuery(c) if isinstance(c, str) else c for c in concepts]
    for query in queries:
        if not isinstance(query, ConceptQuery):
            raise ModAdapterError(f"Expected a ConceptQuery or a word, got {type(query).__name__}.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ModAdapterError("The prompt is empty: concept words can only be found in a prompt that contains them.")
    if not queries:
        return []

    tokens = _tokenize_prompt(layout, prompt)
    if not tokens.text.strip():
        raise ModAdapterError(
            f"The prompt {prompt!r} gives no text tokens for {layout.name}; write a prompt with words in it."
        )

    flags = 0 if case_sensitive else re.IGNORECASE
    word_ids: List[List[int]] = []
    word_texts: List[str] = []
    for query in queries:
        ids, text = _word_text(layout, query.word)
        if not text:
            raise ModAdapterError(
                f"Concept word {query.word!r} gives no text tokens for {layout.name} "
                f"(pieces {[layout.id_to_piece(i) for i in ids]}); use a word made of letters."
            )
        word_ids.append(ids)
        word_texts.append(text)

    _check_duplicate_words(queries, word_texts, case_sensitive)

    # Every place each concept stands, then the occurrences asked for.
    selected: List[List[_Match]] = []
    for index, query in enumerate(queries):
        pattern = concept_word_pattern(word_texts[index].split(), plurals=plurals, word_boundaries=True, flags=flags)
        matches = [
            _Match(index, m.start(), m.end(), _tokens_in_span(tokens, m.start(), m.end()))
            for m in pattern.finditer(tokens.text)
        ]
        if not matches:
            raise ConceptWordNotFoundError(
                _not_found_message(layout, prompt, tokens, query, word_ids[index], word_texts[index], plurals, flags)
            )
        if query.occurrence is not None:
            if query.occurrence > len(matches):
                found_at = ", ".join("[" + _positions_text(layout, m.tokens) + "]" for m in matches)
                raise ConceptWordNotFoundError(
                    f"Concept {query.describe()}: the prompt has only {len(matches)} occurrence(s) of "
                    f"{query.word!r} (at position(s) {found_at}). "
                    f"Use an occurrence from 1 to {len(matches)}, or leave it empty for all.\n"
                    + _report(layout, tokens)
                )
            matches = [matches[query.occurrence - 1]]
        selected.append(matches)

    taken_by = _resolve_overlaps(layout, queries, word_texts, selected, tokens)

    result: List[List[int]] = []
    for index, query in enumerate(queries):
        kept = [m for m in selected[index] if id(m) not in taken_by]
        if not kept:
            owners = sorted({queries[taken_by[id(m)]].word for m in selected[index]})
            owners_text = ", ".join(repr(o) for o in owners)
            which = "Its occurrence" if query.occurrence is not None else "Every occurrence of it"
            raise ModAdapterError(
                f"Concept {query.describe()} has no tokens of its own: {which} in the prompt is part of "
                f"the longer concept {owners_text}, which takes those tokens. Repeat the word elsewhere in "
                f"the prompt for it, or remove one of the two concepts."
            )
        result.append(sorted(layout.prefix_len + t for m in kept for t in m.tokens))

    _check_shared_tokens(layout, queries, result)
    _check_limit(layout, queries, result, tokens)
    return result


def _check_duplicate_words(queries: List[ConceptQuery], word_texts: List[str], case_sensitive: bool) -> None:
    keys = [t if case_sensitive else t.casefold() for t in word_texts]
    for i in range(len(queries)):
        for j in range(i + 1, len(queries)):
            if keys[i] != keys[j]:
                continue
            a, b = queries[i], queries[j]
            if a.occurrence is not None and b.occurrence is not None and a.occurrence != b.occurrence:
                continue
            raise ModAdapterError(
                f"Concepts {a.describe()} and {b.describe()} name the same word, so both would take the same "
                "tokens. Give each a different occurrence (1, 2, ...) or remove one of them."
            )


def _resolve_overlaps(
    layout: TextSequenceLayout,
    queries: List[ConceptQuery],
    word_texts: List[str],
    selected: List[List[_Match]],
    tokens: _PromptTokens,
) -> dict:
    """Maximal munch between concepts: ``{id(match): concept index that takes it}``."""
    all_matches = [m for matches in selected for m in matches]
    taken_by: dict = {}
    for x in range(len(all_matches)):
        for y in range(x + 1, len(all_matches)):
            a, b = all_matches[x], all_matches[y]
            if a.concept == b.concept or a.start >= b.end or b.start >= a.end:
                continue
            a_contains_b = a.start <= b.start and b.end <= a.end
            b_contains_a = b.start <= a.start and a.end <= b.end
            if a_contains_b and b_contains_a:
                # Same span ("dog" matching "dogs" as a plural, and "dogs"): the longer word is the closer fit.
                len_a, len_b = len(word_texts[a.concept]), len(word_texts[b.concept])
                if len_a == len_b:
                    raise ModAdapterError(_overlap_message(layout, queries, a, b, tokens, "cover the same words"))
                winner, loser = (a, b) if len_a > len_b else (b, a)
            elif a_contains_b:
                winner, loser = a, b
            elif b_contains_a:
                winner, loser = b, a
            else:
                raise ModAdapterError(
                    _overlap_message(layout, queries, a, b, tokens, "overlap without one containing the other")
                )
            taken_by[id(loser)] = winner.concept
    return taken_by


def _overlap_message(
    layout: TextSequenceLayout, queries: List[ConceptQuery], a: _Match, b: _Match, tokens: _PromptTokens, how: str
) -> str:
    return (
        f"Concepts {queries[a.concept].describe()} and {queries[b.concept].describe()} {how} in the prompt "
        f"({tokens.text[a.start:a.end]!r} at position(s) {_positions_text(layout, a.tokens)}; "
        f"{tokens.text[b.start:b.end]!r} at position(s) {_positions_text(layout, b.tokens)}), so it is unclear "
        "which concept the shared tokens belong to. Use words that do not overlap, or pick occurrences "
        "that do not."
    )


def _check_shared_tokens(layout: TextSequenceLayout, queries: List[ConceptQuery], result: List[List[int]]) -> None:
    # Matches that do not overlap as text can still share a token when one
    # piece spans both (e.g. punctuation glued to two words).
    for i in range(len(result)):
        for j in range(i + 1, len(result)):
            shared = sorted(set(result[i]) & set(result[j]))
            if shared:
                raise ModAdapterError(
                    f"Concepts {queries[i].describe()} and {queries[j].describe()} share token position(s) "
                    f"{', '.join(map(str, shared))} in the {layout.name} sequence. Put a space between the two "
                    "words in the prompt."
                )


def _check_limit(
    layout: TextSequenceLayout, queries: List[ConceptQuery], result: List[List[int]], tokens: _PromptTokens
) -> None:
    last = layout.max_text_position
    if last is None:
        return
    for query, positions in zip(queries, result):
        beyond = [p for p in positions if p > last]
        if beyond:
            raise ModAdapterError(
                f"Concept {query.describe()} is at position(s) {', '.join(map(str, beyond))} of the "
                f"{layout.name} sequence, but the model reads only {layout.max_length} tokens: text "
                f"positions {layout.prefix_len}..{last}. Shorten the prompt or move the word nearer its "
                "start" + (", or pick an earlier occurrence." if query.occurrence is None else ".") + "\n"
                + _report(layout, tokens)
            )


def _not_found_message(
    layout: TextSequenceLayout,
    prompt: str,
    tokens: _PromptTokens,
    query: ConceptQuery,
    ids: List[int],
    word_text: str,
    plurals: bool,
    flags: int,
) -> str:
    pieces = [layout.id_to_piece(i) for i in ids]
    lines = [
        f"Concept word {query.word!r} is not in the prompt.",
        f"The word tokenizes as {pieces} ({layout.name}); the prompt {prompt!r} tokenizes as:",
        _report(layout, tokens),
    ]
    inside = _occurrences_inside_words(tokens.text, word_text.split(), plurals, flags)
    if inside:
        lines.append(
            f"{query.word!r} appears only inside longer word(s): {', '.join(repr(w) for w in inside)}. "
            "A concept word must stand alone in the prompt."
        )
    case_note = "" if flags & re.IGNORECASE else "with the same case, "
    lines.append(
        f"Fix: write {query.word!r} in the prompt as a word of its own ({case_note}a plural -s/-es/-ies is "
        "also accepted), or change the concept word to a word the prompt contains."
    )
    return "\n".join(lines)


def _occurrences_inside_words(text: str, words: List[str], plurals: bool, flags: int) -> List[str]:
    pattern = concept_word_pattern(words, plurals=plurals, word_boundaries=False, flags=flags)
    found: List[str] = []
    for m in pattern.finditer(text):
        start, end = m.start(), m.end()
        while start > 0 and re.match(r"\w", text[start - 1]):
            start -= 1
        while end < len(text) and re.match(r"\w", text[end]):
            end += 1
        word = text[start:end].strip()
        if word not in found:
            found.append(word)
    return found


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def tokenized_prompt_report(layout: TextSequenceLayout, prompt: str) -> str:
    """How the model's text sequence looks for ``prompt``: every text token
    with its sequence position, plus the start, end and padding tokens."""
    return _report(layout, _tokenize_prompt(layout, prompt))


def _report(layout: TextSequenceLayout, tokens: _PromptTokens, width: int = 100) -> str:
    prefix = layout.prefix_len
    count = len(tokens.ids)
    end_position = prefix + count
    header = [f"{layout.name} sequence: {count} text token(s)"]
    if prefix:
        header.append(f"start token at 0..{prefix - 1}" if prefix > 1 else "start token at 0")
    header.append(f"end token at {end_position}")
    padded_to = max(layout.min_length, end_position + 1)
    if padded_to > end_position + 1:
        header.append(f"padded to {padded_to}")
    lines = [", ".join(header) + ":"]
    if count == 0:
        lines.append("  (no text tokens)")
    else:
        # Packed by hand, not textwrap: a piece may hold a space or a hyphen and must not be split.
        line = ""
        for i, token_id in enumerate(tokens.ids):
            entry = f"{prefix + i}:{layout.id_to_piece(token_id)!r}"
            if line and len(line) + 2 + len(entry) > width:
                lines.append(line)
                line = ""
            line = f"{line}  {entry}"
        lines.append(line)
    last = layout.max_text_position
    if last is not None and end_position - 1 > last:
        lines.append(
            f"  The model reads only {layout.max_length} tokens: text positions after {last} are cut off."
        )
    return "\n".join(lines)
