"""Concept files: one concept (word + Δ table) in one small safetensors file.

Format (format_version "1", documented in docs/formats.md):

* exactly one tensor, ``delta``: (num_blocks, modulation_dim), written as
  bfloat16 (57 × 3072 × 2 bytes ≈ 342 KiB for FLUX.1). On load BF16, F16 and
  F32 are accepted (a hand-converted file loses nothing that matters); every
  other dtype (F64, integers, bool, float8) is refused.
* string metadata: format = "mod-concept", format_version = "1", word,
  strength, source (JSON object), base_model, num_blocks, num_double_blocks,
  modulation_dim. Unknown extra metadata keys are ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Optional

import torch

from .concept import Concept
from .errors import ConceptFileError, ModAdapterError
from .safetensors_io import load_safetensors_checked, read_safetensors_header, save_safetensors

CONCEPT_FORMAT = "mod-concept"
CONCEPT_FORMAT_VERSION = "1"
DELTA_TENSOR = "delta"
KIND = "concept file"

# Dtypes accepted for `delta` on load; the writer always uses BF16.
ACCEPTED_DELTA_DTYPES = ("BF16", "F16", "F32")
REQUIRED_METADATA = (
    "format",
    "format_version",
    "word",
    "strength",
    "source",
    "base_model",
    "num_blocks",
    "num_double_blocks",
    "modulation_dim",
)
FLUX1_NUM_DOUBLE_BLOCKS = 19


def _refuse(path, problem: str, advice: str = "") -> ConceptFileError:
    if not advice:
        advice = "Save the concept again with Mod-Adapter, or use an unmodified copy of the file."
    return ConceptFileError(f"Cannot use {KIND} '{os.fspath(path)}': {problem}. {advice}")


def _parse_count(path, metadata: Dict[str, str], key: str, minimum: int) -> int:
    text = metadata[key]
    try:
        value = int(text)
    except ValueError:
        raise _refuse(path, f"metadata {key} = {text!r} is not an integer") from None
    if value < minimum:
        raise _refuse(path, f"metadata {key} = {value} must be at least {minimum}")
    return value


def read_concept_info(path) -> Dict[str, Any]:
    """Validate a concept file without loading its tensor; return its description.

    Keys: format, format_version, word, strength (float), source (dict),
    base_model, num_blocks, num_double_blocks, modulation_dim (ints),
    delta_dtype (as in the header, e.g. "BF16").
    """
    metadata, tensors = read_safetensors_header(path, kind=KIND, error_cls=ConceptFileError)

    marker = metadata.get("format")
    if marker != CONCEPT_FORMAT:
        if marker == "mod-adapter":
            raise _refuse(
                path,
                "this is a Mod-Adapter checkpoint, not a concept file",
                "Load it with the adapter loader; concept files are produced by the concept nodes.",
            )
        raise _refuse(
            path,
            f"metadata 'format' is {marker!r}, expected {CONCEPT_FORMAT!r} (this is not a Mod-Adapter concept file)",
            "Use a file saved by the Mod-Adapter concept nodes.",
        )
    version = metadata.get("format_version")
    if version != CONCEPT_FORMAT_VERSION:
        raise _refuse(
            path,
            f"format_version {version!r} is not supported (this version of Mod-Adapter reads "
            f"format_version {CONCEPT_FORMAT_VERSION!r})",
            "If the file is newer, update Mod-Adapter for ComfyUI; otherwise save the concept again.",
        )
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise _refuse(path, f"metadata lacks {', '.join(missing)}")

    word = metadata["word"]
    if not word.strip():
        raise _refuse(path, "the concept word in the metadata is empty")
    try:
        strength = float(metadata["strength"])
    except ValueError:
        raise _refuse(path, f"metadata strength = {metadata['strength']!r} is not a number") from None
    if not math.isfinite(strength):
        raise _refuse(path, f"metadata strength = {metadata['strength']!r} is not a finite number")
    try:
        source = json.loads(metadata["source"])
    except ValueError as exc:
        raise _refuse(path, f"metadata source is not valid JSON ({exc})") from None
    if not isinstance(source, dict) or not isinstance(source.get("kind"), str):
        raise _refuse(path, f"metadata source must be a JSON object with a string 'kind', got {metadata['source']!r}")
    base_model = metadata["base_model"]
    if not base_model:
        raise _refuse(path, "metadata base_model is empty")
    num_blocks = _parse_count(path, metadata, "num_blocks", 1)
    num_double_blocks = _parse_count(path, metadata, "num_double_blocks", 0)
    modulation_dim = _parse_count(path, metadata, "modulation_dim", 1)
    if num_double_blocks > num_blocks:
        raise _refuse(path, f"metadata num_double_blocks ({num_double_blocks}) exceeds num_blocks ({num_blocks})")

    if DELTA_TENSOR not in tensors:
        raise _refuse(path, f"the file has no {DELTA_TENSOR!r} tensor (it holds {sorted(tensors) or 'no tensors'})")
    extra = sorted(set(tensors) - {DELTA_TENSOR})
    if extra:
        raise _refuse(path, f"the file holds tensors other than {DELTA_TENSOR!r}: {extra}")
    dtype, shape = tensors[DELTA_TENSOR]
    if dtype not in ACCEPTED_DELTA_DTYPES:
        raise _refuse(
            path,
            f"tensor 'delta' is stored as {dtype}; concept files hold BF16 "
            f"(F16 and F32 are also accepted)",
            "Convert the tensor to bfloat16 (e.g. delta.to(torch.bfloat16)) and save it again with save_concept.",
        )
    if len(shape) != 2:
        raise _refuse(path, f"tensor 'delta' has shape {shape}; expected 2-D (num_blocks, modulation_dim)")
    if shape != (num_blocks, modulation_dim):
        raise _refuse(
            path,
            f"tensor 'delta' has shape {shape} but the metadata says num_blocks = {num_blocks}, "
            f"modulation_dim = {modulation_dim}",
        )
    return {
        "format": CONCEPT_FORMAT,
        "format_version": CONCEPT_FORMAT_VERSION,
        "word": word,
        "strength": strength,
        "source": source,
        "base_model": base_model,
        "num_blocks": num_blocks,
        "num_double_blocks": num_double_blocks,
        "modulation_dim": modulation_dim,
        "delta_dtype": dtype,
    }


def load_concept(path, *, device="cpu", dtype: torch.dtype = torch.float32) -> Concept:
    """Load and validate a concept file; ``delta`` is returned in ``dtype`` on ``device``."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"load_concept needs a floating torch dtype, got {dtype!r}")
    info = read_concept_info(path)
    tensors, _ = load_safetensors_checked(path, kind=KIND, error_cls=ConceptFileError, device=device)
    delta = tensors[DELTA_TENSOR].to(dtype)
    if not bool(torch.isfinite(delta).all()):
        # An F32 value beyond the range of the requested dtype (e.g. float16) becomes inf.
        raise _refuse(path, f"tensor 'delta' overflows {dtype}", "Load it with dtype=torch.float32 or bfloat16.")
    try:
        return Concept(
            word=info["word"],
            delta=delta,
            strength=info["strength"],
            source=info["source"],
            base_model=info["base_model"],
            num_double_blocks=info["num_double_blocks"],
        )
    except ModAdapterError as exc:
        raise _refuse(path, str(exc)) from None


def save_concept(path, concept: Concept, *, num_double_blocks: Optional[int] = None) -> None:
    """Write ``concept`` to ``path`` (atomically) as a format_version 1 concept file.

    ``num_double_blocks`` records how the Δ rows split into double-stream
    (first) and single-stream blocks; by default the concept's own value, or
    19 (FLUX.1) when it has none.
    """
    if num_double_blocks is None:
        num_double_blocks = getattr(concept, "num_double_blocks", None)
        if num_double_blocks is None:
            num_double_blocks = FLUX1_NUM_DOUBLE_BLOCKS
    if not isinstance(concept, Concept):
        raise TypeError(f"save_concept needs a Concept, got {type(concept).__name__}")
    try:
        concept.validate()  # fields may have been reassigned since construction
    except ModAdapterError as exc:
        raise ConceptFileError(f"Cannot save a concept to '{os.fspath(path)}': {exc}") from None
    if isinstance(num_double_blocks, bool) or not isinstance(num_double_blocks, int) or not 0 <= num_double_blocks <= concept.num_blocks:
        raise ConceptFileError(
            f"Cannot save concept {concept.word!r} to '{os.fspath(path)}': num_double_blocks must be an integer "
            f"between 0 and the concept's {concept.num_blocks} blocks, got {num_double_blocks!r}."
        )
    delta = concept.delta.detach().to(device="cpu", dtype=torch.bfloat16)
    if not bool(torch.isfinite(delta).all()):
        raise ConceptFileError(
            f"Cannot save concept {concept.word!r} to '{os.fspath(path)}': delta has values beyond the "
            f"bfloat16 range. The concept is broken; predict or learn it again."
        )
    metadata = {
        "format": CONCEPT_FORMAT,
        "format_version": CONCEPT_FORMAT_VERSION,
        "word": concept.word,
        "strength": repr(float(concept.strength)),
        "source": json.dumps(concept.source, sort_keys=True, allow_nan=False),
        "base_model": concept.base_model,
        "num_blocks": str(concept.num_blocks),
        "num_double_blocks": str(num_double_blocks),
        "modulation_dim": str(concept.modulation_dim),
    }
    save_safetensors(path, {DELTA_TENSOR: delta}, metadata)


def word_file_stem(word: str) -> str:
    """The part of a file name that stands for a concept word, everywhere the pack names a file after one
    (concept files, `mod-adapter learn`, training's validation images): letters, digits, '-' and '_' only,
    at most 64 characters, 'concept' when nothing is left."""
    return re.sub(r"[^\w-]+", "_", word.strip()).strip("_")[:64] or "concept"


def new_concept_path(folder, prefix: str, word: str) -> str:
    """A new, unused path ``<folder>/<prefix>_<word>_<NNNNN>.safetensors``.

    The prefix may name a subfolder (``pets/rex``) but may not leave ``folder``.
    """
    prefix = (prefix or "concept").strip().replace("\\", "/")
    if prefix.startswith("/") or ".." in prefix.split("/") or os.path.isabs(prefix):
        raise ConceptFileError(f"filename_prefix {prefix!r} must stay inside the concept folder: use a plain name "
                               f"or a relative subfolder like 'people/anna'")
    safe_word = word_file_stem(word)
    target_dir = os.path.join(os.fspath(folder), os.path.dirname(prefix))
    os.makedirs(target_dir, exist_ok=True)
    stem = f"{os.path.basename(prefix) or 'concept'}_{safe_word}"
    counter = 1
    while os.path.exists(os.path.join(target_dir, f"{stem}_{counter:05d}.safetensors")):
        counter += 1
    return os.path.join(target_dir, f"{stem}_{counter:05d}.safetensors")
