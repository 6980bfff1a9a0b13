"""Tests of modules/token_positions.py: finding concept words in FLUX's text sequence.

Two kinds of tokenizer are used: small ones built here from hand-written
vocabularies (always run; they exercise every rule and error), and the real
T5 v1.1 and CLIP-L tokenizer files FLUX uses (skipped, with the reason
printed, when the files or transformers are absent).
"""

from __future__ import annotations

import string
from types import SimpleNamespace

import pytest

from mod_adapter.modules.errors import ConceptWordNotFoundError, ModAdapterError
from mod_adapter.modules.token_positions import (
    EMBEDDING_ID,
    ConceptQuery,
    TextSequenceLayout,
    clip_bpe_piece_text,
    find_concept_positions,
    ids_from_comfy_batches,
    tokenized_prompt_report,
)

pytest.importorskip("tokenizers", reason="the tokenizers library is needed to build test tokenizers")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402


# --------------------------------------------------------------------------
# Small SentencePiece-style tokenizer (Unigram + "▁" word-start marker)
# --------------------------------------------------------------------------

PAD, EOS, UNK = 0, 1, 2
_WHOLE_PIECES = [
    "▁dog", "dog", "▁hot", "▁red", "▁collar", "▁cat", "▁golden", "▁hour", "▁bio", "lum", "in",
    "escence", "▁fox", "fox", "▁a", "▁and", "▁puppies", "▁puppy", "▁bus", "es", "s", "▁dog.", "▁(", "ma",
]  # fmt: skip


def _build_unigram() -> Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -2.0) for piece in _WHOLE_PIECES]
    # Single characters last, cheap enough that any text tokenizes, but never
    # preferred over a whole piece: "Dog" becomes "▁", "D", "o", "g".
    vocab += [("▁", -3.0)] + [(c, -5.0) for c in string.ascii_letters + string.punctuation + string.digits]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=UNK, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tokenizer


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    return _build_unigram()


@pytest.fixture(scope="module")
def small(small_tokenizer) -> TextSequenceLayout:
    return TextSequenceLayout.from_callables(
        lambda text: small_tokenizer.encode(text).ids,
        small_tokenizer.id_to_token,
        piece_style="sentencepiece",
        eos_id=EOS,
        pad_id=PAD,
        min_length=40,
        unk_id=UNK,
        name="small",
    )


def pieces_at(layout: TextSequenceLayout, prompt: str, positions) -> list:
    ids = layout.encode(prompt)
    return [layout.id_to_piece(ids[p - layout.prefix_len]) for p in positions]


def small_id(layout, piece):
    return next(i for i in range(200) if layout.id_to_piece(i) == piece)


def find_one(layout, prompt, word, occurrence=None, **options) -> list:
    return find_concept_positions(layout, prompt, [ConceptQuery(word, occurrence)], **options)[0]


# -- positions and pieces ----------------------------------------------------------


def test_every_occurrence_with_punctuation_case_and_plural(small):
    prompt = "a dog, (dog) dogs Dog dogs' dog."
    positions = find_one(small, prompt, "dog")
    assert pieces_at(small, prompt, positions) == [
        "▁dog",  # "dog,"
        "dog",  # "(dog": no word-start marker
        "▁dog", "s",  # plural suffix piece is part of the span
        "D", "o", "g",  # "Dog" split into letters; the standalone "▁" is not taken
        "▁dog", "s",  # "dogs'": the apostrophe is not taken
        "▁dog.",  # a piece that also holds the full stop
    ]  # fmt: skip
    assert positions == sorted(positions)


def test_nth_occurrence_counts_every_place_the_word_stands(small):
    prompt = "a dog and a hot dog and dogs"
    assert pieces_at(small, prompt, find_one(small, prompt, "dog", 1)) == ["▁dog"]
    second = find_one(small, prompt, "dog", 2)
    third = find_one(small, prompt, "dog", 3)
    assert pieces_at(small, prompt, third) == ["▁dog", "s"]
    assert second[0] < third[0]
    assert sorted(find_one(small, prompt, "dog", 1) + second + third) == find_one(small, prompt, "dog")


def test_word_boundaries_reject_words_that_contain_the_concept(small):
    prompt = "dogma hotdog doges dog"
    ids = small.encode(prompt)
    assert find_one(small, prompt, "dog") == [len(ids) - 1]


def test_word_split_into_many_pieces(small):
    prompt = "a bioluminescence dog"
    positions = find_one(small, prompt, "bioluminescence")
    assert pieces_at(small, prompt, positions) == ["▁bio", "lum", "in", "escence"]
    assert positions == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "word, prompt, expected_pieces",
    [
        ("fox", "a foxes", ["▁fox", "es"]),  # -es after x
        ("bus", "a buses", ["▁bus", "es"]),  # -es after s
        ("puppy", "a puppies", ["▁puppies"]),  # consonant + y → ies
        ("cat", "a cats", ["▁cat", "s"]),
        ("puppies", "a puppies", ["▁puppies"]),
    ],
)
def test_plural_rules(small, word, prompt, expected_pieces):
    assert pieces_at(small, prompt, find_one(small, prompt, word)) == expected_pieces


def test_es_is_not_a_plural_of_every_word(small):
    with pytest.raises(ConceptWordNotFoundError, match="'dog' is not in the prompt"):
        find_one(small, "doges", "dog")


def test_plurals_and_case_can_be_switched_off(small):
    with pytest.raises(ConceptWordNotFoundError, match="with the same case"):
        find_one(small, "a Dog", "dog", case_sensitive=True)
    assert find_one(small, "a Dog", "Dog", case_sensitive=True) == [2, 3, 4]
    with pytest.raises(ConceptWordNotFoundError, match="'dog' is not in the prompt"):
        find_one(small, "a dogs", "dog", plurals=False)


def test_multi_word_concept_skips_whitespace_pieces(small):
    prompt = "a golden  hour"  # the double space gives a standalone "▁" between the words
    positions = find_one(small, prompt, "golden hour")
    assert pieces_at(small, prompt, positions) == ["▁golden", "▁hour"]
    assert "▁" in [small.id_to_piece(i) for i in small.encode(prompt)]


@pytest.mark.parametrize("longer_first", [False, True])
def test_longer_concept_takes_the_tokens_it_covers(small, longer_first):
    prompt = "a hot dog and a dog"
    if longer_first:
        hot_dog, dog = find_concept_positions(small, prompt, ["hot dog", "dog"])
    else:
        dog, hot_dog = find_concept_positions(small, prompt, ["dog", "hot dog"])
    assert pieces_at(small, prompt, hot_dog) == ["▁hot", "▁dog"]
    assert dog == [small.encode(prompt).index(small_id(small, "▁dog"), hot_dog[-1] + 1)]
    assert not set(dog) & set(hot_dog)


def test_plural_concept_wins_over_its_singular_on_the_same_span(small):
    prompt = "dogs and a dog"
    dog, dogs = find_concept_positions(small, prompt, ["dog", "dogs"])
    assert pieces_at(small, prompt, dogs) == ["▁dog", "s"]
    assert dog == [len(small.encode(prompt)) - 1]


def test_same_word_with_different_occurrences(small):
    prompt = "a cat and a cat"
    first, second = find_concept_positions(small, prompt, [ConceptQuery("cat", 1), ConceptQuery("Cat", 2)])
    assert first == [1] and second == [4]


def test_positions_grow_past_min_length_without_a_limit(small):
    # No max_length: positions keep growing past min_length (as T5 in ComfyUI).
    prompt = " ".join(["a"] * 60) + " dog"
    assert find_one(small, prompt, "dog") == [60]
    assert len(small.full_sequence(small.encode(prompt))) == 62


def test_full_sequence_layout(small):
    ids = small.encode("a dog")
    assert small.full_sequence(ids) == ids + [EOS] + [PAD] * (40 - len(ids) - 1)


# -- errors -------------------------------------------------------------------------


def test_missing_word_message_shows_pieces_and_prompt_tokens(small):
    with pytest.raises(ConceptWordNotFoundError) as caught:
        find_one(small, "a red dog", "cat")
    message = str(caught.value)
    assert "Concept word 'cat' is not in the prompt" in message
    assert "['▁cat']" in message
    assert "0:'▁a'  1:'▁red'  2:'▁dog'" in message
    assert "Fix:" in message


def test_missing_word_found_only_inside_a_longer_word(small):
    with pytest.raises(ConceptWordNotFoundError, match=r"only inside longer word\(s\): 'hotdog'"):
        find_one(small, "a hotdog", "dog")


def test_occurrence_beyond_the_count(small):
    with pytest.raises(ConceptWordNotFoundError, match=r"only 2 occurrence\(s\) of 'dog'.*\[1\], \[3\]"):
        find_one(small, "a dog a dog", "dog", 3)


@pytest.mark.parametrize("occurrence", [0, -1, True, 1.0, "2"])
def test_invalid_occurrence(occurrence):
    with pytest.raises(ModAdapterError, match="is invalid"):
        ConceptQuery("dog", occurrence)


@pytest.mark.parametrize("word", ["", "   "])
def test_empty_word(small, word):
    with pytest.raises(ModAdapterError, match="concept word is empty"):
        find_concept_positions(small, "a dog", [word])


def test_word_that_is_not_text():
    with pytest.raises(ModAdapterError, match="must be text"):
        ConceptQuery(3)


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_empty_prompt(small, prompt):
    with pytest.raises(ModAdapterError, match="prompt is empty"):
        find_one(small, prompt, "dog")


def test_no_concepts_is_an_empty_answer(small):
    assert find_concept_positions(small, "a dog", []) == []


def test_same_word_twice(small):
    with pytest.raises(ModAdapterError, match=r"'dog' and 'Dog' name the same word"):
        find_concept_positions(small, "a dog and a dog", ["dog", "Dog"])
    with pytest.raises(ModAdapterError, match=r"'dog' and 'dog' \(occurrence 2\) name the same word"):
        find_concept_positions(small, "a dog and a dog", ["dog", ConceptQuery("dog", 2)])
    with pytest.raises(ModAdapterError, match="name the same word"):
        find_concept_positions(small, "a dog and a dog", [ConceptQuery("dog", 1), ConceptQuery("dog", 1)])


def test_shorter_concept_left_without_tokens(small):
    with pytest.raises(ModAdapterError, match=r"'dog' has no tokens of its own.*longer concept 'hot dog'"):
        find_concept_positions(small, "a hot dog", ["dog", "hot dog"])
    with pytest.raises(ModAdapterError, match=r"'dog' \(occurrence 1\) has no tokens of its own: Its occurrence"):
        find_concept_positions(small, "a hot dog and a dog", [ConceptQuery("dog", 1), "hot dog"])
    # The other occurrence is free: no error.
    assert find_concept_positions(small, "a hot dog and a dog", [ConceptQuery("dog", 2), "hot dog"])[0] == [5]


def test_partial_overlap_names_both_concepts(small):
    with pytest.raises(ModAdapterError, match=r"'red dog' and 'dog collar' overlap without one containing the other"):
        find_concept_positions(small, "a red dog collar", ["red dog", "dog collar"])


def test_concepts_sharing_one_token(small):
    # "▁dog." is one piece: the concepts "dog" and "." do not overlap as text but share it.
    with pytest.raises(ModAdapterError, match=r"'dog' and '\.' share token position\(s\) 1"):
        find_concept_positions(small, "a dog.", ["dog", "."])


def test_bad_constructor_arguments(small_tokenizer):
    with pytest.raises(ModAdapterError, match="Unknown piece style"):
        TextSequenceLayout.from_callables(
            small_tokenizer.encode, small_tokenizer.id_to_token, piece_style="wordpiece", eos_id=1, pad_id=0
        )
    with pytest.raises(ModAdapterError, match="Unknown tokenizer kind"):
        TextSequenceLayout.from_hf_tokenizer(SimpleNamespace(), kind="llama")
    with pytest.raises(ModAdapterError, match="leaves no room for text"):
        TextSequenceLayout.from_callables(
            small_tokenizer.encode, small_tokenizer.id_to_token, prefix_ids=[5], eos_id=1, pad_id=0, max_length=2
        )


def test_report_lists_positions_and_special_tokens(small):
    report = tokenized_prompt_report(small, "a dog")
    assert report.splitlines() == [
        "small sequence: 2 text token(s), end token at 2, padded to 40:",
        "  0:'▁a'  1:'▁dog'",
    ]


# --------------------------------------------------------------------------
# WordPiece tokenizer with a start token and a length limit (CLIP-like
# sequence layout, custom piece style)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordpiece() -> TextSequenceLayout:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "dog", "##s", "hot", "##dog", "##ma", "cat", "a", ",", ".", "'", "s", "word"]
    tokenizer = Tokenizer(models.WordPiece({p: i for i, p in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def piece_text(piece: str) -> str:
        return piece[2:] if piece.startswith("##") else " " + piece

    return TextSequenceLayout.from_callables(
        lambda text: tokenizer.encode(text).ids,
        tokenizer.id_to_token,
        piece_style=piece_text,
        prefix_ids=[2],
        eos_id=3,
        pad_id=0,
        min_length=12,
        max_length=12,
        unk_id=1,
        name="wordpiece",
    )


def test_start_token_shifts_positions(wordpiece):
    prompt = "a Dog, hotdog dogma dogs dog's"
    positions = find_one(wordpiece, prompt, "dog")
    assert wordpiece.prefix_len == 1
    assert positions == [2, 8, 9, 10]
    assert pieces_at(wordpiece, prompt, positions) == ["dog", "dog", "##s", "dog"]
    sequence = wordpiece.full_sequence(wordpiece.encode(prompt))
    assert sequence[0] == 2 and len(sequence) == 12 and sequence[-1] == 3


def test_positions_past_the_length_limit(wordpiece):
    # max_length 12 = start + 10 text tokens + end: the last readable text position is 10.
    assert find_one(wordpiece, "word " * 9 + "dog", "dog") == [10]
    with pytest.raises(ModAdapterError, match=r"position\(s\) 11 .* reads only 12 tokens: text positions 1\.\.10"):
        find_one(wordpiece, "word " * 10 + "dog", "dog")
    assert "text positions after 10 are cut off" in tokenized_prompt_report(wordpiece, "word " * 10 + "dog")


# --------------------------------------------------------------------------
# ComfyUI tokenizer path (a stand-in with ComfyUI's SDTokenizer interface)
# --------------------------------------------------------------------------


class FakeT5TokenizerFast:
    """The slice of a Hugging Face T5 tokenizer that ComfyUI's SDTokenizer uses."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.unk_token_id = UNK

    def __call__(self, text):
        return {"input_ids": self._tokenizer.encode(text).ids + [EOS]}

    def convert_ids_to_tokens(self, token_id):
        return self._tokenizer.id_to_token(token_id)


class FakeComfyT5Tokenizer:
    """Mirrors ComfyUI's FLUX T5XXLTokenizer: each weighted segment "(text:w)"
    is tokenized on its own, no start token, EOS appended, padded with 0 to
    min_length; an "<emb>" segment stands for a textual-inversion embedding."""

    start_token = None
    end_token = EOS
    pad_token = PAD
    min_length = 40
    max_length = 99999999
    pad_to_max_length = False

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = FakeT5TokenizerFast(tokenizer)

    def tokenize_with_weights(self, text, return_word_ids=False):
        import re

        batch = []
        for segment in re.split(r"(\([^()]*\)|<emb>)", text):
            if not segment:
                continue
            if segment == "<emb>":
                batch.append((SimpleNamespace(ndim=1), 1.0, 0))  # a vector, not an id
                continue
            weight = 1.0
            weighted = re.fullmatch(r"\((.*):([0-9.]+)\)", segment)
            if weighted:
                segment, weight = weighted.group(1), float(weighted.group(2))
            batch += [(t, weight, 1) for t in self.tokenizer(segment)["input_ids"][:-1]]
        batch.append((EOS, 1.0, 0))
        batch += [(PAD, 1.0, 0)] * max(0, self.min_length - len(batch))
        return [batch if return_word_ids else [(t, w) for t, w, _ in batch]]


def test_comfy_tokenizer_positions_index_its_own_token_list(small_tokenizer):
    comfy = FakeComfyT5Tokenizer(small_tokenizer)
    layout = TextSequenceLayout.from_comfy_tokenizer(comfy)
    assert (layout.name, layout.prefix_len, layout.eos_id, layout.pad_id) == ("T5", 0, EOS, PAD)
    assert layout.min_length == 40 and layout.max_length is None

    prompt = "a hot(dog:1.2) <emb> and a dog"
    (positions,) = find_concept_positions(layout, prompt, ["dog"])
    batch = comfy.tokenize_with_weights(prompt)[0]
    # The weighted segment is tokenized alone, so the model reads "▁dog" (not "dog") there.
    assert [small_tokenizer.id_to_token(batch[p][0]) for p in positions] == ["▁dog", "▁dog"]
    assert [batch[p][1] for p in positions] == [1.2, 1.0]
    assert EMBEDDING_ID in layout.encode(prompt)
    assert "<embedding>" in tokenized_prompt_report(layout, prompt)


def test_comfy_tokenizer_with_a_tokenize_callable(small_tokenizer):
    comfy = FakeComfyT5Tokenizer(small_tokenizer)
    calls = []

    def tokenize(text):  # as the nodes would pass: lambda t: clip.tokenize(t)["t5xxl"]
        calls.append(text)
        return comfy.tokenize_with_weights(text, return_word_ids=True)

    layout = TextSequenceLayout.from_comfy_tokenizer(comfy, tokenize=tokenize)
    assert find_concept_positions(layout, "a cat", ["cat"]) == [[1]]
    assert "a cat" in calls


def test_comfy_tokenizer_rejections(small_tokenizer):
    with pytest.raises(ModAdapterError, match="Expected a ComfyUI SDTokenizer"):
        TextSequenceLayout.from_comfy_tokenizer(SimpleNamespace())
    left = FakeComfyT5Tokenizer(small_tokenizer)
    left.pad_left = True
    with pytest.raises(ModAdapterError, match="pads on the left"):
        TextSequenceLayout.from_comfy_tokenizer(left)
    unknown = SimpleNamespace(tokenizer=SimpleNamespace(convert_ids_to_tokens=str), end_token=1)
    with pytest.raises(ModAdapterError, match="pass kind='t5'"):
        TextSequenceLayout.from_comfy_tokenizer(unknown)


class FakeComfyChunkedTokenizer(FakeComfyT5Tokenizer):
    """ComfyUI's CLIP layout in miniature: a start token, chunks of max_length
    tokens each ending with EOS, the last one padded with EOS."""

    start_token = 999  # outside the small vocabulary, as a real start token is outside the text ids
    end_token = EOS
    pad_token = EOS
    max_length = 6
    min_length = None
    pad_to_max_length = True

    def tokenize_with_weights(self, text, return_word_ids=False):
        ids = self.tokenizer(text)["input_ids"][:-1]
        per_chunk = self.max_length - 2
        chunks = [ids[i : i + per_chunk] for i in range(0, len(ids), per_chunk)]
        batches = [[(self.start_token, 1.0)] + [(t, 1.0) for t in chunk] + [(EOS, 1.0)] for chunk in chunks]
        batches[-1] += [(EOS, 1.0)] * (self.max_length - len(batches[-1]))
        return batches


def test_comfy_chunk_boundary_tokens_keep_positions_true(small_tokenizer):
    comfy = FakeComfyChunkedTokenizer(small_tokenizer)
    layout = TextSequenceLayout.from_comfy_tokenizer(comfy, kind="t5")
    assert (layout.prefix_len, layout.max_length, layout.min_length, layout.max_text_position) == (1, 6, 6, 4)
    prompt = "a a a hot dog"  # "▁hot" ends chunk 1, "▁dog" opens chunk 2
    flat = [t for batch in comfy.tokenize_with_weights(prompt) for t, _ in batch]
    assert find_concept_positions(layout, prompt, ["hot"]) == [[4]]
    assert small_tokenizer.id_to_token(flat[4]) == "▁hot"
    # The chunk's EOS and the next start token separate words, and "dog" keeps its true position 7.
    with pytest.raises(ModAdapterError, match=r"'hot dog' is at position\(s\) 7 of .* reads only 6 tokens"):
        find_concept_positions(layout, prompt, ["hot dog"])
    assert small_tokenizer.id_to_token(flat[7]) == "▁dog"


def test_ids_from_comfy_batches():
    # CLIP-like: start 9, end 8 also used as pad; two chunks; 3-tuples with word ids.
    batches = [[(9, 1.0, 0), (5, 1.0, 1), (8, 1.0, 0), (8, 1.0, 0)], [(9, 1.0, 0), (6, 1.2, 2), (8, 1.0, 0), (8, 1.0, 0)]]
    assert ids_from_comfy_batches(batches, prefix_len=1, eos_id=8, pad_id=8) == [5, 8, 8, 9, 6]
    # T5-like: EOS 1 then pad 0; an embedding vector in the list.
    batches = [[(4, 1.0), (SimpleNamespace(ndim=1), 1.0), (1, 1.0), (0, 1.0), (0, 1.0)]]
    assert ids_from_comfy_batches(batches, prefix_len=0, eos_id=1, pad_id=0) == [4, EMBEDDING_ID]


def test_clip_byte_level_piece_text():
    assert clip_bpe_piece_text("cafÃ©</w>") == "café "
    assert clip_bpe_piece_text("bi") == "bi"


# --------------------------------------------------------------------------
# The real FLUX tokenizers: T5 v1.1 (SentencePiece) and CLIP-L (BPE)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizers():
    from flux_tokenizers import CLIP_L_TOKENIZER, T5_TOKENIZER_FILE

    transformers = pytest.importorskip("transformers", reason="transformers is needed to load the real tokenizers")
    t5 = transformers.T5TokenizerFast(tokenizer_file=T5_TOKENIZER_FILE)
    clip = transformers.CLIPTokenizer.from_pretrained(CLIP_L_TOKENIZER)
    return t5, clip


@pytest.fixture(scope="module")
def t5(hf_tokenizers):
    return hf_tokenizers[0], TextSequenceLayout.from_hf_tokenizer(hf_tokenizers[0], "t5")


@pytest.fixture(scope="module")
def clip(hf_tokenizers):
    return hf_tokenizers[1], TextSequenceLayout.from_hf_tokenizer(hf_tokenizers[1], "clip")


# (prompt, concept word, what each occurrence decodes to, lower-cased)
REAL_CASES = [
    ("a dog, (dog) dog's dog.", "dog", ["dog", "dog", "dog", "dog"]),
    ("A Dog and a DOG", "dog", ["dog", "dog"]),
    ("two dogs and the dogs' bowls", "dog", ["dogs", "dogs"]),
    ("dogma, a hotdog and one dog", "dog", ["dog"]),
    ("glowing bioluminescence in a cave", "bioluminescence", ["bioluminescence"]),
    ("soft lighting, studio lighting", "lighting", ["lighting", "lighting"]),
    ("a portrait at golden hour", "golden hour", ["golden hour"]),
    ("three foxes and a fox", "fox", ["foxes", "fox"]),
    ("puppies on a sofa", "puppy", ["puppies"]),
    ("a red dog with a collar", "red dog", ["red dog"]),
]


@pytest.mark.parametrize("which", ["t5", "clip"])
@pytest.mark.parametrize("prompt, word, decoded", REAL_CASES)
def test_real_tokenizers_positions_decode_to_the_word(request, which, prompt, word, decoded):
    tokenizer, layout = request.getfixturevalue(which)
    ids = layout.encode(prompt)
    sequence = layout.full_sequence(ids)
    every = find_one(layout, prompt, word)
    per_occurrence = [find_one(layout, prompt, word, n) for n in range(1, len(decoded) + 1)]
    assert sorted(p for positions in per_occurrence for p in positions) == every
    for positions, expected in zip(per_occurrence, decoded):
        assert positions == list(range(positions[0], positions[-1] + 1)), "an occurrence is one contiguous run"
        text = tokenizer.decode([sequence[p] for p in positions]).strip().lower()
        assert text == expected, (prompt, word, positions)
    with pytest.raises(ConceptWordNotFoundError, match=f"only {len(decoded)} occurrence"):
        find_one(layout, prompt, word, len(decoded) + 1)


def test_real_t5_positions_index_the_padded_sequence_flux_reads(t5):
    tokenizer, layout = t5
    assert layout.prefix_len == 0 and layout.eos_id == 1 and layout.pad_id == 0 and layout.min_length == 256
    prompt = "A photo of a Dog in (golden hour) lighting, next to a cat"
    dog, light, cat = find_concept_positions(layout, prompt, ["dog", "lighting", "cat"])
    # What FLUX's T5 reads: text ids, EOS, pad with 0 to 256, no start token.
    flux_ids = tokenizer(prompt, padding="max_length", max_length=256)["input_ids"]
    assert layout.full_sequence(layout.encode(prompt)) == flux_ids
    assert len(flux_ids) == 256
    assert tokenizer.decode([flux_ids[p] for p in dog]).strip() == "Dog"
    assert tokenizer.decode([flux_ids[p] for p in light]).strip() == "lighting"
    assert tokenizer.decode([flux_ids[p] for p in cat]).strip() == "cat"
    assert flux_ids[len(layout.encode(prompt))] == 1


def test_real_t5_sequence_grows_past_256(t5):
    tokenizer, layout = t5
    prompt = "word " * 300 + "dog"
    (positions,) = find_concept_positions(layout, prompt, ["dog"])
    sequence = layout.full_sequence(layout.encode(prompt))
    assert positions[0] >= 300 and len(sequence) > 256
    assert tokenizer.decode([sequence[p] for p in positions]).strip() == "dog"


def test_real_clip_start_token_and_77_limit(clip):
    tokenizer, layout = clip
    assert layout.prefix_len == 1 and layout.max_length == 77
    prompt = "a dog on a sofa"
    (positions,) = find_concept_positions(layout, prompt, ["dog"])
    flux_ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert layout.full_sequence(layout.encode(prompt)) == flux_ids
    assert positions == [2] and flux_ids[0] == tokenizer.bos_token_id

    fits = "word " * 74 + "dog"  # dog at position 75, the last text slot before EOS
    assert find_one(layout, fits, "dog") == [75]
    truncated = tokenizer(fits, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tokenizer.decode([truncated[75]]).strip() == "dog"
    with pytest.raises(ModAdapterError, match=r"position\(s\) 76 of the CLIP sequence.*only 77 tokens"):
        find_one(layout, "word " * 75 + "dog", "dog")


def test_real_overlaps_and_missing_words(t5, clip):
    for _, layout in (t5, clip):
        dog, hot_dog = find_concept_positions(layout, "a hot dog next to a dog", ["dog", "hot dog"])
        assert len(hot_dog) == 2 and len(dog) == 1 and dog[0] > hot_dog[-1]
        with pytest.raises(ModAdapterError, match="'red dog' and 'dog collar' overlap"):
            find_concept_positions(layout, "a red dog collar", ["red dog", "dog collar"])
        with pytest.raises(ConceptWordNotFoundError, match=f"'cat' is not in the prompt(.|\n)*{layout.name} sequence: "):
            find_one(layout, "a red dog", "cat")
    with pytest.raises(ConceptWordNotFoundError, match=r"tokenizes as \['▁cat'\] \(T5\)"):
        find_one(t5[1], "a red dog", "cat")
    with pytest.raises(ConceptWordNotFoundError, match=r"tokenizes as \['cat</w>'\] \(CLIP\)"):
        find_one(clip[1], "a red dog", "cat")


def test_real_report(t5, clip):
    assert tokenized_prompt_report(t5[1], "a dog").splitlines() == [
        "T5 sequence: 3 text token(s), end token at 3, padded to 256:",
        "  0:'▁'  1:'a'  2:'▁dog'",
    ]
    assert tokenized_prompt_report(clip[1], "a dog").splitlines() == [
        "CLIP sequence: 2 text token(s), start token at 0, end token at 3, padded to 77:",
        "  1:'a</w>'  2:'dog</w>'",
    ]
