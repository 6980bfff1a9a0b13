"""The training dataset manifest: read it, check it, stream it.

A manifest is a JSON Lines file, one training sample per line::

    {"concept_image": "images/dog.jpg", "concept_word": "dog",
     "caption": "a photo of a dog on the beach",
     "attribute_caption": "fluffy golden retriever with a red collar"}

Fields (see docs/training.md):

``concept_image`` (required)
    The reference image the adapter sees. A path relative to the manifest's
    folder, or absolute.
``concept_word`` (required)
    The word (or words, "golden hour") whose prompt tokens get the predicted
    modulation.
``caption`` (required)
    The training caption. It must contain the concept word (plurals count,
    with the same rules as at inference: :mod:`.token_positions`).
``target_image`` (optional, default ``concept_image``)
    The image the denoising loss reconstructs.
``mask`` (optional)
    A mask image of the concept image (white = the concept), same size as it.
``attribute_caption`` (optional until ``mod-adapter caption`` fills it)
    p+, a short attribute description of the concept in the image, the
    pre-training target.

Large datasets stream from WebDataset tar shards (:func:`iter_records`) read
by the ``webdataset`` package: each sample is a group of tar members sharing
a key, ``KEY.json`` (the manifest object; image fields may be left out),
``KEY.jpg`` (or png/jpeg/webp: the concept image), optionally
``KEY.target.jpg`` and ``KEY.mask.png``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from ..atomic_file import atomic_write_text
from ..errors import ModAdapterError
from ..token_positions import TextSequenceLayout, concept_word_pattern, find_concept_positions

__all__ = [
    "ManifestError",
    "ManifestRecord",
    "ShardMember",
    "ManifestReport",
    "KNOWN_FIELDS",
    "REQUIRED_FIELDS",
    "read_manifest",
    "validate_manifest",
    "write_clean_manifest",
    "write_manifest",
    "write_shards",
    "PackSummary",
    "record_to_json",
    "iter_records",
    "is_shard_source",
    "expand_shard_source",
]


class ManifestError(ModAdapterError):
    """A training manifest (or shard set) cannot be used."""


REQUIRED_FIELDS = ("concept_image", "concept_word", "caption")
OPTIONAL_FIELDS = ("target_image", "mask", "attribute_caption")
KNOWN_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
_PATH_FIELDS = ("concept_image", "target_image", "mask")
_TEXT_FIELDS = ("concept_word", "caption", "attribute_caption")

# Member extensions of a WebDataset sample, per image field, in order of preference.
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_SHARD_MEMBERS = {
    "concept_image": _IMAGE_EXTENSIONS,
    "target_image": tuple("target." + e for e in _IMAGE_EXTENSIONS),
    "mask": tuple("mask." + e for e in _IMAGE_EXTENSIONS),
}
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class ShardMember:
    """Where one image of a tar sample lies in its (uncompressed) shard.

    Records read for training hold these instead of the image bytes, so a
    dataset of any size costs a few hundred bytes per record in memory; the
    bytes are read when the sample is drawn.
    """

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with open(self.shard, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as e:
            raise ManifestError(f"cannot read {self.name} from shard {self.shard}: {e.strerror or e}") from None
        if len(data) != self.size:
            raise ManifestError(
                f"shard {self.shard} ends inside member {self.name}: the shard changed after it was read; "
                "restart the run so that it is indexed again"
            )
        return data


@dataclass
class ManifestRecord:
    """One training sample.

    ``line`` is the 1-based line of the manifest (for a shard source: the
    1-based index of the sample in the stream). Images of a record read from
    a tar shard are in ``data``: a :class:`ShardMember` (where the bytes lie
    in an uncompressed shard, read on demand) or, from a compressed shard or
    :func:`iter_records`' stream, the bytes themselves. Their paths are then
    ``<shard>/<member>`` and do not exist on disk: read images through
    :meth:`open_image` / :meth:`open_mask`, which work for every source.
    """

    line: int
    concept_image: Path
    concept_word: str
    caption: str
    target_image: Path
    mask: Optional[Path]
    attribute_caption: Optional[str]
    key: Optional[str] = None  # WebDataset sample key (None for a JSONL manifest)
    data: Optional[Dict[str, Union[bytes, ShardMember]]] = field(default=None, repr=False, compare=False)

    def _read_bytes(self, which: str) -> Optional[bytes]:
        if which not in _PATH_FIELDS:
            raise ManifestError(f"unknown image field {which!r}; use one of {list(_PATH_FIELDS)}")
        if self.data is not None and which in self.data:
            stored = self.data[which]
            return stored.read() if isinstance(stored, ShardMember) else stored
        path = getattr(self, which)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ManifestError(f"line {self.line}: cannot read {which} {path}: {e.strerror or e}") from None

    def open_image(self, which: str = "concept_image", mode: str = "RGB"):
        """The image of ``which`` (concept_image, target_image or mask) as a loaded PIL image."""
        from PIL import Image

        raw = self._read_bytes(which)
        if raw is None:
            return None
        try:
            image = Image.open(io.BytesIO(raw))
            image.load()
        except Exception as e:  # PIL raises many types for a bad file
            raise ManifestError(f"line {self.line}: {which} {getattr(self, which)} is not a readable image ({e})") from None
        return image.convert(mode) if mode else image

    def open_mask(self):
        """The mask as a PIL "L" image (white = the concept), or None."""
        return self.open_image("mask", mode="L") if self.mask is not None else None


@dataclass
class ManifestReport:
    """What :func:`validate_manifest` found.

    ``records``: the valid records, in file order; ``problems``: (line,
    message) for every problem (a record with a problem is not in
    ``records``); ``warnings``: (line, message) that do not invalidate a
    record (unknown fields). ``ok`` is True when there is no problem.
    """

    path: Path
    records: List[ManifestRecord]
    problems: List[Tuple[int, str]]
    warnings: List[Tuple[int, str]]
    lines: int = 0  # non-blank lines (or shard samples) read

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> List[str]:
        """Every problem and warning as ``line N: message``, in line order."""
        items = [(line, 0, msg) for line, msg in self.problems] + [(line, 1, "warning: " + msg) for line, msg in self.warnings]
        return [f"line {line}: {msg}" for line, _, msg in sorted(items, key=lambda t: (t[0], t[1]))]


# --------------------------------------------------------------------------
# Checking one record
# --------------------------------------------------------------------------


def word_in_caption(word: str, caption: str, layout: Optional[TextSequenceLayout] = None) -> Optional[str]:
    """None when ``word`` stands in ``caption``, else why not.

    With a tokenizer layout the check is the one training and inference use
    (:func:`find_concept_positions`, which also rejects a word past CLIP's
    77-token window); without one, a whole-word, case-insensitive match with
    the same plural rules.
    """
    if layout is not None:
        try:
            find_concept_positions(layout, caption, [word])
        except ModAdapterError as e:
            return str(e)
        return None
    words = word.split()
    if not words:
        return "concept_word is empty"
    if concept_word_pattern(words, plurals=True, word_boundaries=True, flags=re.IGNORECASE).search(caption):
        return None
    return f"concept word {word!r} does not occur as a whole word in the caption {caption!r}"


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base_dir / path


def _image_size(raw_or_path: Union[bytes, Path]) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """(size, None) for a readable image, (None, why) otherwise."""
    from PIL import Image

    try:
        source = io.BytesIO(raw_or_path) if isinstance(raw_or_path, bytes) else raw_or_path
        with Image.open(source) as image:
            size = image.size
            image.verify()
        return size, None
    except FileNotFoundError:
        return None, "does not exist"
    except IsADirectoryError:
        return None, "is a folder, not an image"
    except PermissionError:
        return None, "cannot be read (permission denied)"
    except Exception as e:  # UnidentifiedImageError, truncated data, ...
        return None, f"is not a readable image ({type(e).__name__}: {e})"


def _check_object(
    obj: Any,
    line: int,
    base_dir: Path,
    *,
    members: Optional[Dict[str, bytes]] = None,
    member_names: Optional[Dict[str, str]] = None,
    member_base: Optional[Path] = None,
    check_images: bool,
    require_attribute_caption: bool,
    layout: Optional[TextSequenceLayout],
) -> Tuple[Optional[ManifestRecord], List[str], List[str]]:
    """(record or None, problems, warnings) for one parsed manifest object."""
    problems: List[str] = []
    warnings: List[str] = []
    if not isinstance(obj, dict):
        return None, [f"a record must be a JSON object, got {type(obj).__name__}"], []
    members = members or {}
    unknown = sorted(set(obj) - set(KNOWN_FIELDS))
    if unknown:
        warnings.append(f"unknown field(s) {unknown} ignored (known fields: {list(KNOWN_FIELDS)})")

    values: Dict[str, Any] = {}
    for name in KNOWN_FIELDS:
        value = obj.get(name)
        if value is None:
            if name in REQUIRED_FIELDS and not (name == "concept_image" and name in members):
                problems.append(f"missing field {name!r}")
            elif name == "attribute_caption" and require_attribute_caption:
                problems.append("missing field 'attribute_caption' (run `mod-adapter caption` to write it)")
            continue
        if not isinstance(value, str):
            problems.append(f"field {name!r} must be a string, got {type(value).__name__}")
            continue
        if not value.strip():
            what = "path" if name in _PATH_FIELDS else "text"
            problems.append(f"field {name!r} is empty (give a {what})")
            continue
        values[name] = value if name in _PATH_FIELDS else " ".join(value.split())

    word, caption = values.get("concept_word"), values.get("caption")
    if word is not None and caption is not None:
        why = word_in_caption(word, caption, layout)
        if why is not None:
            problems.append(why)

    # Images: from the tar sample when it has the member, else from disk.
    paths: Dict[str, Optional[Path]] = {}
    raw: Dict[str, Optional[bytes]] = {}
    for name in _PATH_FIELDS:
        if name in members:
            # A member of a tar sample: in memory, shown as <shard>/<member>.
            paths[name] = (member_base or base_dir) / (member_names or {}).get(name, name)
            raw[name] = members[name]
        elif name in values:
            paths[name] = _resolve(values[name], base_dir)
            raw[name] = None
        else:
            paths[name] = None
    if paths["target_image"] is None:
        paths["target_image"] = paths["concept_image"]
        raw["target_image"] = raw.get("concept_image")

    if check_images:
        sizes: Dict[str, Tuple[int, int]] = {}
        checked: Dict[Path, Tuple[Optional[Tuple[int, int]], Optional[str]]] = {}
        for name in _PATH_FIELDS:
            path = paths[name]
            if path is None:
                continue
            if path in checked:
                size, why = checked[path]
                if why is not None:
                    continue  # reported once, under the first field that names it
            else:
                data = raw.get(name)
                checked[path] = _image_size(data if data is not None else path)
                size, why = checked[path]
            if why is not None:
                shown = values.get(name, member_names.get(name) if member_names else name)
                problems.append(f"{name} {shown!r} ({path}) {why}")
            else:
                sizes[name] = size
        if "mask" in sizes and "concept_image" in sizes and sizes["mask"] != sizes["concept_image"]:
            problems.append(
                f"mask is {sizes['mask'][0]}x{sizes['mask'][1]} but concept_image is "
                f"{sizes['concept_image'][0]}x{sizes['concept_image'][1]}; a mask must have the size of its image"
            )

    if problems:
        return None, problems, warnings
    data = {k: v for k, v in raw.items() if v is not None} if members else None
    record = ManifestRecord(
        line=line,
        concept_image=paths["concept_image"],
        concept_word=values["concept_word"],
        caption=values["caption"],
        target_image=paths["target_image"],
        mask=paths["mask"],
        attribute_caption=values.get("attribute_caption"),
        data=data,
    )
    return record, problems, warnings


def _duplicate_key(record: ManifestRecord) -> Tuple[str, str, str]:
    if record.data is not None and "concept_image" in record.data:
        image = "sha1:" + hashlib.sha1(record.data["concept_image"]).hexdigest()  # tar member: by content
    else:
        image = os.path.normpath(os.path.abspath(record.concept_image))
    return (image, record.concept_word.lower(), record.caption.lower())


# --------------------------------------------------------------------------
# JSONL manifests
# --------------------------------------------------------------------------


def _manifest_lines(path: Path) -> Iterator[Tuple[int, str]]:
    try:
        handle = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {path} is a folder; give the .jsonl file") from None
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}") from None
    with handle:
        try:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    yield number, text
        except UnicodeDecodeError as e:
            raise ManifestError(f"manifest {path} is not UTF-8 text ({e}); a manifest is a JSON Lines file") from None


def _parse_line(text: str) -> Tuple[Any, Optional[str]]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"


def validate_manifest(
    path: Union[str, os.PathLike],
    *,
    check_images: bool = True,
    require_attribute_caption: bool = False,
    tokenizer_layout: Optional[TextSequenceLayout] = None,
) -> ManifestReport:
    """Check every line of a manifest (JSONL, or a WebDataset shard source).

    Reports invalid JSON, missing/empty/non-string fields, unknown fields
    (warnings), missing or unreadable images (opened and verified with PIL,
    unless ``check_images=False``, which skips every file access), a concept
    word absent from its caption, duplicates (same image, word and caption)
    and masks whose size differs from their image. Never raises for a bad
    record: only for a manifest that cannot be read at all.
    """
    source = str(path)
    if is_shard_source(source):
        return _validate_shards(source, check_images=check_images,
                                require_attribute_caption=require_attribute_caption, layout=tokenizer_layout)
    path = Path(path)
    base_dir = path.resolve().parent
    report = ManifestReport(path=path, records=[], problems=[], warnings=[])
    seen: Dict[Tuple[str, str, str], int] = {}
    for number, text in _manifest_lines(path):
        report.lines += 1
        obj, error = _parse_line(text)
        if error is not None:
            report.problems.append((number, error))
            continue
        record, problems, warnings = _check_object(
            obj, number, base_dir, check_images=check_images,
            require_attribute_caption=require_attribute_caption, layout=tokenizer_layout,
        )
        report.warnings.extend((number, w) for w in warnings)
        if record is not None:
            key = _duplicate_key(record)
            if key in seen:
                problems = [f"duplicate of line {seen[key]} (same concept_image, concept_word and caption)"]
                record = None
            else:
                seen[key] = number
        report.problems.extend((number, p) for p in problems)
        if record is not None:
            report.records.append(record)
    if report.lines == 0:
        report.problems.append((0, f"manifest {path} has no records"))
    return report


def read_manifest(
    path: Union[str, os.PathLike],
    *,
    require_attribute_caption: bool = False,
) -> List[ManifestRecord]:
    """Every record of a manifest; :class:`ManifestError` listing every problem if any.

    Images are not opened (that is :func:`validate_manifest`'s job); paths
    are resolved against the manifest's folder.
    """
    report = validate_manifest(path, check_images=False, require_attribute_caption=require_attribute_caption)
    if not report.ok:
        raise ManifestError(_problems_message(report.path, report.problems))
    return report.records


def _problems_message(path: Any, problems: List[Tuple[int, str]], limit: int = 50) -> str:
    lines = [f"line {line}: {msg}" for line, msg in problems[:limit]]
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return (f"manifest {path} has {len(problems)} problem(s) (run `mod-adapter validate {path}` for a full check):\n"
            + "\n".join(lines) + more)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _path_for(path: Path, out_dir: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return str(path)


def record_to_json(record: ManifestRecord, out_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The manifest object of ``record`` for a manifest written in ``out_dir``.

    Paths under ``out_dir`` are written relative to it, others absolute;
    ``target_image`` is left out when it is the concept image.
    """
    if record.data is not None:
        raise ManifestError(
            f"sample {record.key or record.line} comes from a tar shard: its images are inside the shard "
            "and cannot be referenced from a JSONL manifest"
        )
    out_dir = Path(os.path.abspath(out_dir))
    obj: Dict[str, Any] = {
        "concept_image": _path_for(record.concept_image, out_dir),
        "concept_word": record.concept_word,
        "caption": record.caption,
    }
    if record.target_image is not None and Path(record.target_image) != Path(record.concept_image):
        obj["target_image"] = _path_for(record.target_image, out_dir)
    if record.mask is not None:
        obj["mask"] = _path_for(record.mask, out_dir)
    if record.attribute_caption is not None:
        obj["attribute_caption"] = record.attribute_caption
    return obj


def write_manifest(records: Iterable[ManifestRecord], out_path: Union[str, os.PathLike]) -> int:
    """Write records as a JSONL manifest (atomically); returns how many."""
    out_path = Path(out_path)
    out_dir = out_path.resolve().parent
    lines = [json.dumps(record_to_json(r, out_dir), ensure_ascii=False) for r in records]
    atomic_write_text(out_path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_clean_manifest(report: ManifestReport, out_path: Union[str, os.PathLike]) -> int:
    """Write the valid records of ``report`` to ``out_path``; returns how many.

    Refuses to overwrite the manifest that was checked (write elsewhere, then
    move it if you want to replace the original).
    """
    out_path = Path(out_path)
    if out_path.exists() and not is_shard_source(str(report.path)) and out_path.resolve() == Path(report.path).resolve():
        raise ManifestError(f"--write-clean {out_path} is the manifest being checked; write the clean copy to another file")
    return write_manifest(report.records, out_path)


@dataclass
class PackSummary:
    """What :func:`write_shards` wrote."""

    samples: int
    shards: List[str]


def _member_bytes(record: ManifestRecord, which: str) -> Tuple[str, bytes]:
    """(extension, bytes) of one image of ``record``: the file as it is, or PNG for formats shards do not name."""
    raw = record._read_bytes(which)
    suffix = Path(str(getattr(record, which))).suffix.lower().lstrip(".")
    if suffix in _IMAGE_EXTENSIONS:
        return suffix, raw
    image = record.open_image(which, mode=None)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "png", buffer.getvalue()


def write_shards(
    source: Union[str, os.PathLike],
    pattern: Union[str, os.PathLike],
    *,
    max_count: int = 10_000,
    max_bytes: float = 3e9,
    progress: Optional[Any] = None,
) -> PackSummary:
    """Pack a manifest's records into WebDataset tar shards with ``webdataset.ShardWriter``.

    ``pattern`` names the shards with a printf field, ``data/shard-%06d.tar``;
    a shard closes after ``max_count`` samples or ``max_bytes`` bytes. Each
    sample is ``KEY.json`` (the text fields), ``KEY.<ext>`` (the concept
    image, its file's bytes unchanged), ``KEY.target.<ext>`` when the target
    is another image and ``KEY.mask.<ext>``. The manifest is checked first
    (:func:`read_manifest`): a broken one is refused with every problem listed.
    ``progress``: called with the number of samples written so far.
    """
    pattern = str(pattern)
    if "%" not in pattern or not pattern.endswith(".tar"):
        raise ManifestError(f"shard pattern {pattern!r} needs a printf field and the .tar suffix, e.g. data/shard-%06d.tar")
    if max_count < 1:
        raise ManifestError(f"max_count must be at least 1, got {max_count}")
    records = read_manifest(source)
    wds = _webdataset()
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    shards: List[str] = []
    # mtime fixed: packing the same manifest twice gives byte-identical shards.
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, encoder=False, mtime=0.0,
                         post=shards.append) as sink:
        for number, record in enumerate(records):
            fields = {"concept_word": record.concept_word, "caption": record.caption}
            if record.attribute_caption is not None:
                fields["attribute_caption"] = record.attribute_caption
            sample: Dict[str, Any] = {"__key__": f"{number:09d}", "json": json.dumps(fields, ensure_ascii=False).encode()}
            ext, raw = _member_bytes(record, "concept_image")
            sample[ext] = raw
            if record.target_image is not None and str(record.target_image) != str(record.concept_image):
                ext, raw = _member_bytes(record, "target_image")
                sample["target." + ext] = raw
            if record.mask is not None:
                ext, raw = _member_bytes(record, "mask")
                sample["mask." + ext] = raw
            sink.write(sample)
            if progress is not None:
                progress(number + 1)
    return PackSummary(samples=len(records), shards=shards)


# --------------------------------------------------------------------------
# Streaming: JSONL or WebDataset shards
# --------------------------------------------------------------------------


def is_shard_source(source: str) -> bool:
    """True for a tar shard, a brace pattern ("shard-{000..009}.tar") or a glob of shards."""
    source = str(source)
    return source.endswith(_SHARD_SUFFIXES) or (("{" in source or "*" in source or "?" in source) and ".tar" in source)


def expand_shard_source(source: str) -> List[str]:
    """The shard files of a source: brace patterns expand, globs match (sorted); all must exist."""
    patterns: List[str] = []
    try:
        import braceexpand

        patterns = list(braceexpand.braceexpand(source))
    except ImportError:  # webdataset brings braceexpand; a plain path or glob works without it
        patterns = [source]
    shards: List[str] = []
    missing: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                missing.append(pattern)
            shards.extend(matches)
        elif os.path.isfile(pattern):
            shards.append(pattern)
        else:
            missing.append(pattern)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ManifestError(f"shard source {source!r}: no shard file at {shown}")
    if not shards:
        raise ManifestError(f"shard source {source!r} names no shard file")
    return shards


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ManifestError(
            "reading tar shards needs the `webdataset` package: pip install webdataset "
            "(or pip install 'comfyui-mod-adapter[train]')"
        ) from None
    return webdataset


def _iter_shard_samples(source: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    wds = _webdataset()
    shards = expand_shard_source(source)
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    for index, sample in enumerate(dataset, start=1):
        yield index, sample


def _member_offsets(shard: str) -> Optional[Dict[Tuple[str, str], Tuple[int, int]]]:
    """(key, suffix) -> (data offset, size) of every member of an uncompressed tar; None if it cannot seek.

    Keys and suffixes are split by webdataset's own rule (suffix lowercased),
    so they match the samples it yields. Only the headers are read: tarfile
    seeks over the data. A compressed shard (or a key that occurs twice) has
    no usable offsets and its images stay in memory.
    """
    import tarfile

    from webdataset.tariterators import base_plus_ext

    offsets: Dict[Tuple[str, str], Tuple[int, int]] = {}
    repeated = set()
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                key = (prefix, suffix.lower())
                if key in offsets:
                    repeated.add(key)
                offsets[key] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError):
        return None
    for key in repeated:
        del offsets[key]
    return offsets


def _bytes_to_references(data: Optional[Dict[str, Any]], sample: Dict[str, Any],
                         offsets: Dict[str, Optional[Dict[Tuple[str, str], Tuple[int, int]]]]) -> Optional[Dict[str, Any]]:
    """``data`` with each image that lies in an uncompressed shard replaced by its :class:`ShardMember`."""
    if not data:
        return data
    shard, key = str(sample.get("__url__", "")), sample.get("__key__")
    if shard not in offsets:
        offsets[shard] = _member_offsets(shard) if os.path.isfile(shard) else None
    table = offsets[shard]
    if table is None or key is None:
        return data
    out: Dict[str, Any] = {}
    for name, raw in data.items():
        out[name] = raw
        for ext in _SHARD_MEMBERS[name]:
            where = table.get((key, ext))
            if ext in sample and sample[ext] is raw and where is not None and where[1] == len(raw):
                out[name] = ShardMember(shard=shard, name=f"{key}.{ext}", offset=where[0], size=where[1])
                break
    # A target that defaults to the concept image shares its member.
    if data.get("target_image") is not None and data.get("target_image") is data.get("concept_image"):
        out["target_image"] = out["concept_image"]
    return out


def _shard_object(sample: Dict[str, Any]) -> Tuple[Any, Optional[str], Dict[str, bytes], Dict[str, str]]:
    """(manifest object, parse error, image members by field, member names by field) of one sample."""
    key = sample.get("__key__", "?")
    members: Dict[str, bytes] = {}
    names: Dict[str, str] = {}
    for name, extensions in _SHARD_MEMBERS.items():
        for ext in extensions:
            if ext in sample:
                members[name] = sample[ext]
                names[name] = f"{key}.{ext}"
                break
    raw = sample.get("json")
    if raw is None:
        return None, f"sample {key!r} has no {key}.json member (the manifest fields)", members, names
    obj, error = _parse_line(raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw))
    if error is not None:
        return None, f"sample {key!r}: {key}.json: {error}", members, names
    return obj, None, members, names


def _validate_shards(source: str, *, check_images: bool, require_attribute_caption: bool,
                     layout: Optional[TextSequenceLayout]) -> ManifestReport:
    report = ManifestReport(path=Path(source), records=[], problems=[], warnings=[])
    seen: Dict[Tuple[str, str, str], int] = {}
    offsets: Dict[str, Optional[Dict[Tuple[str, str], Tuple[int, int]]]] = {}
    for index, sample in _iter_shard_samples(source):
        report.lines += 1
        record, problems, warnings = _shard_record(sample, index, check_images=check_images,
                                                   require_attribute_caption=require_attribute_caption, layout=layout)
        report.warnings.extend((index, w) for w in warnings)
        if record is not None:
            content = _duplicate_key(record)
            if content in seen:
                problems = [f"sample {record.key!r}: duplicate of sample {seen[content]} "
                            "(same concept_image, concept_word and caption)"]
                record = None
            else:
                seen[content] = index
        report.problems.extend((index, p) for p in problems)
        if record is not None:
            record.data = _bytes_to_references(record.data, sample, offsets)
            report.records.append(record)
    if report.lines == 0:
        report.problems.append((0, f"shard source {source!r} holds no samples"))
    return report


def _shard_record(sample: Dict[str, Any], index: int, *, check_images: bool, require_attribute_caption: bool,
                  layout: Optional[TextSequenceLayout]) -> Tuple[Optional[ManifestRecord], List[str], List[str]]:
    obj, error, members, names = _shard_object(sample)
    key = sample.get("__key__")
    if error is not None:
        return None, [error], []
    url = str(sample.get("__url__") or "shard.tar")
    # Images kept outside the shard (paths in the JSON) are relative to the shard's folder.
    record, problems, warnings = _check_object(
        obj, index, Path(os.path.abspath(os.path.dirname(url) or ".")), members=members, member_names=names,
        member_base=Path(url), check_images=check_images,
        require_attribute_caption=require_attribute_caption, layout=layout,
    )
    if record is not None:
        record.key = key
    return record, [f"sample {key!r}: {p}" for p in problems], warnings


def iter_records(
    source: Union[str, os.PathLike],
    *,
    require_attribute_caption: bool = False,
) -> Iterator[ManifestRecord]:
    """Stream the records of a JSONL manifest or a WebDataset shard source.

    ``source``: a ``.jsonl`` manifest, one ``.tar`` shard, a brace pattern
    (``data/shard-{000000..000099}.tar``) or a glob (``data/*.tar``). Shards
    are read in order by the ``webdataset`` package, one sample at a time.
    Images are not decoded. The first invalid record raises
    :class:`ManifestError` with its line (sample index) and key.
    """
    text = str(source)
    if is_shard_source(text):
        for index, sample in _iter_shard_samples(text):
            record, problems, _ = _shard_record(sample, index, check_images=False,
                                                require_attribute_caption=require_attribute_caption, layout=None)
            if problems:
                raise ManifestError(_problems_message(text, [(index, p) for p in problems]))
            yield record
        return
    path = Path(source)
    base_dir = path.resolve().parent
    for number, line_text in _manifest_lines(path):
        obj, error = _parse_line(line_text)
        problems = [error] if error else []
        record = None
        if not problems:
            record, problems, _ = _check_object(obj, number, base_dir, check_images=False,
                                                require_attribute_caption=require_attribute_caption, layout=None)
        if problems:
            raise ManifestError(_problems_message(path, [(number, p) for p in problems]))
        yield record
