"""Attribute captions (p+) for a training manifest, written by a vision-language model.

Mod-Adapter's pre-training target is ``M(CLIP(p+))`` where p+ is a short,
detailed description of the concept in its image ("transparent cyan-green
glass surface"); the paper has Qwen2.5-VL-7B-Instruct write it. This module
runs any transformers image-text-to-text model (``AutoProcessor`` +
``AutoModelForImageTextToText``, local files only) over the concept images of
a manifest and fills ``attribute_caption``.

The run is resumable: each batch's captions are appended (and fsynced) to
``OUT.partial.jsonl`` as soon as they exist; a re-run harvests the input's own
``attribute_caption`` values, the previous ``OUT`` and the partial file, and
captions only what is left. One caption serves every record with the same
concept image and word. When the run ends, ``OUT`` is written atomically (a
complete manifest, every record in input order) and the partial file removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..devices import resolve_device
from ..dtypes import resolve_dtype
from ..errors import ModAdapterError
from .manifest import (
    ManifestError,
    ManifestRecord,
    is_shard_source,
    read_manifest,
    write_manifest,
)

__all__ = [
    "CaptionerError",
    "DEFAULT_PROMPT",
    "VLMCaptioner",
    "CaptionSummary",
    "caption_manifest",
    "clean_caption",
    "default_output_path",
    "partial_path",
]

DEFAULT_PROMPT = (
    "Describe the {word} in this image as one short noun phrase of at most 12 words that ends with the word "
    "\"{word}\". Name its visual attributes: material, colour, texture, pattern, shape and lighting, for example "
    "\"transparent cyan-green glass surface\" or \"fluffy cream-coloured puppy with floppy ears\". "
    "Answer with the phrase only."
)

# One caption per (concept image, concept word): the key of the progress file.
CaptionKey = Tuple[str, str]


class CaptionerError(ModAdapterError):
    """Attribute captioning cannot run."""


def clean_caption(text: str) -> str:
    """The first line of a model's answer, without quotes, control characters, labels or a final period."""
    text = "".join(ch if ch.isprintable() or ch in "\n\t " else " " for ch in text or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    for label in ("answer:", "phrase:", "caption:", "description:"):
        if line.lower().startswith(label):
            line = line[len(label):].strip()
    line = line.strip().strip("\"'`*“”‘’").strip()
    while line.endswith((".", "!", ";", ",")):
        line = line[:-1].rstrip()
    return " ".join(line.split())


def default_output_path(manifest: Union[str, os.PathLike]) -> Path:
    """``data/train.jsonl`` → ``data/train.captioned.jsonl``."""
    path = Path(manifest)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.captioned.jsonl")


def partial_path(out: Union[str, os.PathLike]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def _key(record: ManifestRecord) -> CaptionKey:
    return (os.path.normpath(os.path.abspath(record.concept_image)), " ".join(record.concept_word.lower().split()))


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


class VLMCaptioner:
    """A transformers image-text-to-text model that answers ``prompt`` for each (image, word).

    Build with :meth:`load` (local files only) or from a model and processor
    already in memory. Calling it with PIL images and their words returns
    one cleaned caption per image.
    """

    def __init__(self, model: Any, processor: Any, *, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 48,
                 max_image_side: Optional[int] = 768) -> None:
        if "{word}" not in prompt:
            raise CaptionerError("the caption prompt must contain {word} (where the concept word goes)")
        if max_new_tokens < 1:
            raise CaptionerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.max_image_side = max_image_side
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # batched generation of a decoder-only model

    @classmethod
    def load(cls, name_or_path: str, *, device: Optional[str] = None, dtype: Any = None, **kwargs: Any) -> "VLMCaptioner":
        """Load a model and its processor from a local folder or the local Hugging Face cache.

        ``device`` None: CUDA when available, else CPU. ``dtype`` None:
        bfloat16 on CUDA, float32 on CPU. Nothing is downloaded: fetch the
        model first (``huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct``).
        """
        try:
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as e:
            raise CaptionerError(f"captioning needs transformers with AutoModelForImageTextToText ({e}); "
                                 "pip install -U transformers") from None
        device = resolve_device(device, error_cls=CaptionerError)
        dtype = resolve_dtype(dtype, device, error_cls=CaptionerError)
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(name_or_path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as e:
            raise CaptionerError(
                f"cannot load the captioning model {name_or_path!r} from local files ({e}). Give a local folder or a "
                f"repo id already in the Hugging Face cache (huggingface-cli download {name_or_path}); it must be an "
                "image-text-to-text model such as Qwen/Qwen2.5-VL-7B-Instruct."
            ) from None
        model = model.to(device).eval()
        return cls(model, processor, **kwargs)

    def _prepare(self, image: Any) -> Any:
        image = image.convert("RGB")
        side = self.max_image_side
        if side and max(image.size) > side:
            from PIL import Image

            image = image.copy()
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
        return image

    def __call__(self, images: Sequence[Any], words: Sequence[str]) -> List[str]:
        import torch

        if len(images) != len(words):
            raise CaptionerError(f"got {len(images)} images but {len(words)} words")
        if not images:
            return []
        texts = []
        for word in words:
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": self.prompt.format(word=word)}]}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        inputs = self.processor(text=texts, images=[self._prepare(im) for im in images], padding=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = inputs.to(device)
        model_dtype = next(self.model.parameters()).dtype
        for name, value in list(inputs.items()):
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[name] = value.to(model_dtype)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            output = output[:, inputs["input_ids"].shape[1]:]
        decoded = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_caption(text) for text in decoded]


# --------------------------------------------------------------------------
# Captioning a manifest
# --------------------------------------------------------------------------


@dataclass
class CaptionSummary:
    """What one :func:`caption_manifest` run did."""

    out_path: Path
    records: int  # records in the manifest
    captioned: int  # (image, word) pairs captioned by this run
    reused: int  # pairs whose caption came from the input, a previous run or the partial file
    failures: List[Tuple[int, str]] = field(default_factory=list)  # (line, why) of records left without p+

    @property
    def complete(self) -> bool:
        return not self.failures


def _read_progress(path: Path) -> Dict[CaptionKey, str]:
    """Captions of the partial file; a line cut by an interrupted write is dropped."""
    done: Dict[CaptionKey, str] = {}
    if not path.exists():
        return done
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        for text in handle:
            try:
                obj = json.loads(text)
                key = (obj["concept_image"], obj["concept_word"])
                caption = obj["attribute_caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(caption, str) and caption.strip():
                done[(str(key[0]), str(key[1]))] = caption
    return done


def _append_progress(path: Path, items: List[Tuple[CaptionKey, str]]) -> None:
    # A previous interrupted write may have left a line without its newline: start on a fresh line.
    needs_newline = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            needs_newline = handle.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as handle:
        if needs_newline:
            handle.write("\n")
        for (image, word), caption in items:
            handle.write(json.dumps({"concept_image": image, "concept_word": word, "attribute_caption": caption},
                                    ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def caption_manifest(
    manifest: Union[str, os.PathLike],
    captioner: Callable[[Sequence[Any], Sequence[str]], Sequence[str]],
    *,
    out: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 4,
    overwrite: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
) -> CaptionSummary:
    """Fill ``attribute_caption`` of every record of ``manifest``; write the result to ``out``.

    captioner: called with a batch of PIL images and their concept words,
    returns one caption each (a :class:`VLMCaptioner`, or any callable).
    out: the output manifest (default ``<manifest>.captioned.jsonl``; it may
    be the input itself, which is then replaced atomically at the end).
    overwrite: caption again records that already have p+ in the input or
    in a previous ``out`` (captions of an unfinished run, in
    ``OUT.partial.jsonl``, are still reused: delete it to start over; it is
    removed once a run leaves no record without p+). limit: caption at most this many
    (image, word) pairs in this run (to try a prompt). Records whose image
    cannot be read, or for which the model answers nothing, are left without
    p+ and listed in ``failures``; a re-run tries them again.
    """
    if is_shard_source(str(manifest)):
        raise CaptionerError("captioning works on a JSONL manifest; caption it before packing it into tar shards")
    if batch_size < 1:
        raise CaptionerError(f"batch size must be >= 1, got {batch_size}")
    records = read_manifest(manifest)
    out_path = Path(out) if out is not None else default_output_path(manifest)
    progress_path = partial_path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    done: Dict[CaptionKey, str] = {}
    if not overwrite:
        for record in records:
            if record.attribute_caption:
                done.setdefault(_key(record), record.attribute_caption)
    if not overwrite and out_path.exists() and out_path.resolve() != Path(manifest).resolve():
        try:
            for record in read_manifest(out_path):
                if record.attribute_caption:
                    done.setdefault(_key(record), record.attribute_caption)
        except ManifestError:
            pass  # an unusable previous output is simply replaced
    for key, caption in _read_progress(progress_path).items():
        done.setdefault(key, caption)

    todo: List[Tuple[CaptionKey, ManifestRecord]] = []
    queued = set()
    for record in records:
        key = _key(record)
        if key not in done and key not in queued:
            queued.add(key)
            todo.append((key, record))
    needed = {key for key, _ in todo}
    reused = len({_key(r) for r in records} - needed)
    if limit is not None:
        todo = todo[: max(0, int(limit))]

    failures_by_key: Dict[CaptionKey, str] = {}
    captioned = 0
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="captioning", unit="image")
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images, words, keys = [], [], []
            for key, record in batch:
                try:
                    images.append(record.open_image("concept_image"))
                except ManifestError as e:
                    failures_by_key[key] = str(e)
                    continue
                words.append(record.concept_word)
                keys.append(key)
            answers = list(captioner(images, words)) if images else []
            if len(answers) != len(keys):
                raise CaptionerError(f"the captioner returned {len(answers)} captions for {len(keys)} images")
            finished = []
            for key, answer in zip(keys, answers):
                answer = clean_caption(answer)
                if answer:
                    finished.append((key, answer))
                    done[key] = answer
                else:
                    failures_by_key[key] = "the model gave an empty caption"
            if finished:
                _append_progress(progress_path, finished)
                captioned += len(finished)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()

    failures: List[Tuple[int, str]] = []
    for record in records:
        key = _key(record)
        if record.attribute_caption and not overwrite:
            continue  # the input's own p+ stays
        if key in done:
            record.attribute_caption = done[key]
        else:
            failures.append((record.line, failures_by_key.get(key, "not captioned in this run (limit reached)")))
    write_manifest(records, out_path)
    if not failures:
        try:
            progress_path.unlink()  # finished: everything is in OUT now
        except FileNotFoundError:
            pass
    return CaptionSummary(out_path=out_path, records=len(records), captioned=captioned, reused=reused,
                          failures=failures)
