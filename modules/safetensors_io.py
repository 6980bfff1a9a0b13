"""Reading and writing safetensors files, safely.

This is the one place in the pack that touches checkpoint and concept files on
disk. Files come from strangers (shared adapters, shared concepts), so:

* nothing is ever unpickled: ``torch.load`` and ``pickle`` are not used, and a
  pickle renamed to ``.safetensors`` is recognised and refused before any
  library sees it;
* the header is parsed and checked here, byte by byte, before the file is
  handed to the safetensors library, so that a damaged file is refused with a
  message that names the file, the problem and what to do, instead of a Rust
  panic text or a silently wrong tensor;
* loaded floating tensors are checked for NaN/Inf, which would otherwise
  spread through every image generated with them;
* files are written atomically (temporary file in the same folder, then
  ``os.replace``), so an interrupted save never leaves half a file under the
  real name.

Layout of a safetensors file (https://github.com/huggingface/safetensors):
8 bytes little-endian unsigned header length ``H``, ``H`` bytes of UTF-8 JSON
(an object: tensor name -> {"dtype", "shape", "data_offsets"}, plus an
optional ``"__metadata__"`` object of str -> str), then the data region, in
which each tensor occupies ``[begin, end)`` relative to the region's start.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, List, Optional, Tuple, Type

import torch

from .atomic_file import atomic_replace
from .errors import ModAdapterError

# Bytes per element of every dtype the safetensors format names and torch can
# hold. Anything else in a header is refused as unknown.
DTYPE_SIZES: Dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

# The safetensors library itself refuses headers above 100 MB; a larger length
# field means the file is not safetensors at all (or is corrupted).
MAX_HEADER_BYTES = 100 * 1024 * 1024

_LENGTH_FIELD_BYTES = 8
_METADATA_KEY = "__metadata__"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80  # first byte of every pickle of protocol >= 2
# Opcodes a protocol 0 or 1 pickle of a state dict, tensor or object starts with (MARK, GLOBAL,
# EMPTY_DICT/LIST/TUPLE, DICT, LIST, INT/LONG/FLOAT, STRING/UNICODE, NONE, BININT*, BINSTRING*, BINFLOAT).
_PROTOCOL_0_1_FIRST_OPCODES = {bytes([c]) for c in b"(c}])dlILFSVNJKMTUG"}

HeaderTensors = Dict[str, Tuple[str, Tuple[int, ...]]]


class _Refuser:
    """Builds the error messages for one file: path, problem, what to do."""

    def __init__(self, path: str, kind: str, error_cls: Type[ModAdapterError]) -> None:
        self.path = path
        self.kind = kind
        self.error_cls = error_cls

    def error(self, problem: str, advice: str = "") -> ModAdapterError:
        if not advice:
            advice = (
                f"The file is damaged or is not a {self.kind}: download or export it again "
                f"(an incomplete download or copy is the most common cause)."
            )
        return self.error_cls(f"Cannot use {self.kind} '{self.path}': {problem}. {advice}")


def _reject_duplicate_keys(pairs: List[Tuple[str, object]]) -> Dict[str, object]:
    result: Dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            # JSON parsers silently keep the last value; a header naming the same
            # tensor twice is ambiguous and must not be loaded.
            raise ValueError(f"the key {key!r} occurs more than once")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _looks_like_pickle(head: bytes, file_size: int, last_byte: bytes = b"") -> bool:
    """True for a pickle (any protocol) or a zip archive (torch.save's format).

    The first byte of a safetensors file is the low byte of the header length,
    so 0x80 there is also a valid safetensors start (a 128-, 384-, ... byte
    header). A start that reads as a plausible safetensors header followed by
    '{' is therefore never taken for a pickle. Protocol 0 and 1 pickles have no
    marker: they start with an opcode and end with STOP ('.').
    """
    if len(head) == _LENGTH_FIELD_BYTES + 1:
        (header_length,) = struct.unpack("<Q", head[:_LENGTH_FIELD_BYTES])
        if 0 < header_length <= MAX_HEADER_BYTES and _LENGTH_FIELD_BYTES + header_length <= file_size and head[8:9] == b"{":
            return False
    is_pickle = len(head) >= 2 and head[0] == _PICKLE_PROTOCOL_OPCODE and 2 <= head[1] <= 5
    is_old_pickle = head[:1] in _PROTOCOL_0_1_FIRST_OPCODES and last_byte == b"."
    return is_pickle or is_old_pickle or head.startswith(_ZIP_MAGIC)


def _read_header_bytes(path: str, refuse: _Refuser) -> Tuple[bytes, int]:
    """Check the file as bytes (exists, not a pickle, long enough); return (header bytes, file size)."""
    if not os.path.exists(path):
        raise refuse.error("the file does not exist", "Check the file name and folder.")
    if os.path.isdir(path):
        raise refuse.error(
            "this is a folder, not a file",
            f"Point to the .safetensors file of the {refuse.kind} inside it.",
        )
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(_LENGTH_FIELD_BYTES + 1)
            last_byte = b""
            if file_size:
                handle.seek(file_size - 1)
                last_byte = handle.read(1)
            if _looks_like_pickle(head, file_size, last_byte):
                raise refuse.error(
                    "this is a PyTorch pickle (.pt/.ckpt/.bin) file; only safetensors is loaded, "
                    "never pickle, because unpickling a file can run arbitrary code",
                    "Convert it to safetensors in a trusted environment (for example "
                    "safetensors.torch.save_file(state_dict, 'file.safetensors')), or ask its "
                    "author for a .safetensors version.",
                )
            if file_size == 0:
                raise refuse.error("the file is empty (0 bytes)")
            if file_size < _LENGTH_FIELD_BYTES:
                raise refuse.error(
                    f"the file is only {file_size} bytes long, shorter than the 8-byte header "
                    f"length field of a safetensors file"
                )
            (header_length,) = struct.unpack("<Q", head[:_LENGTH_FIELD_BYTES])
            if header_length == 0 or header_length > MAX_HEADER_BYTES:
                raise refuse.error(
                    f"the header length field says {header_length} bytes, which is not a plausible "
                    f"safetensors header (this is not a safetensors file, or its start is corrupted)"
                )
            if _LENGTH_FIELD_BYTES + header_length > file_size:
                raise refuse.error(
                    f"the file is truncated: its header needs {header_length} bytes but only "
                    f"{file_size - _LENGTH_FIELD_BYTES} bytes follow the length field"
                )
            handle.seek(_LENGTH_FIELD_BYTES)
            return handle.read(header_length), file_size
    except OSError as exc:
        raise refuse.error(f"the file cannot be read ({exc})", "Check that it exists and is readable.") from exc


def _decode_header(header_bytes: bytes, refuse: _Refuser) -> Tuple[Dict[str, str], Dict[str, object]]:
    """Parse the header's JSON; return (metadata, the tensor entries)."""
    try:
        header_text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse.error("the header is not UTF-8 text (not a safetensors file, or corrupted)") from None
    try:
        header = json.loads(header_text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, so are duplicate keys
        raise refuse.error(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise refuse.error(f"the header is a JSON {type(header).__name__}, not a JSON object")

    metadata_raw = header.pop(_METADATA_KEY, {})
    if metadata_raw is None:
        metadata_raw = {}
    if not isinstance(metadata_raw, dict):
        raise refuse.error(f"the header's __metadata__ is a {type(metadata_raw).__name__}, not an object of strings")
    for key, value in metadata_raw.items():
        if not isinstance(value, str):
            raise refuse.error(
                f"the metadata entry {key!r} is a {type(value).__name__}, but safetensors metadata "
                f"values must be strings"
            )
    return dict(metadata_raw), header


def _check_tensor_entry(name: str, entry: object, data_size: int, refuse: _Refuser) -> Tuple[str, Tuple[int, ...], int, int]:
    """One tensor's header entry, checked; return (dtype, shape, begin, end)."""
    if not isinstance(entry, dict):
        raise refuse.error(f"the header entry of tensor {name!r} is not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise refuse.error(f"the header entry of tensor {name!r} lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise refuse.error(
            f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_SIZES)})"
        )
    if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise refuse.error(f"tensor {name!r} has an invalid shape {shape!r} (expected a list of non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(offset) and offset >= 0 for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise refuse.error(f"tensor {name!r} has invalid data_offsets {offsets!r} (expected [begin, end], begin <= end)")
    begin, end = offsets
    expected_bytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected_bytes:
        raise refuse.error(
            f"tensor {name!r} ({dtype}, shape {tuple(shape)}) needs {expected_bytes} bytes but its "
            f"data_offsets span {end - begin} bytes"
        )
    if end > data_size:
        raise refuse.error(
            f"the file is truncated: tensor {name!r} ends at byte {end} of the data region, "
            f"which holds only {data_size} bytes"
        )
    return dtype, tuple(shape), begin, end


def _check_tiling(spans: List[Tuple[int, int, str]], data_size: int, refuse: _Refuser) -> None:
    """The tensors must tile the data region exactly.

    An overlap means two tensors alias the same bytes, a gap or a tail means
    bytes nobody accounts for.
    """
    position = 0
    previous_name = None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise refuse.error(f"tensors {previous_name!r} and {name!r} overlap in the data region")
        if begin > position:
            raise refuse.error(
                f"the data region has {begin - position} unaccounted bytes before tensor {name!r}"
            )
        position = end
        previous_name = name
    if position != data_size:
        raise refuse.error(
            f"the file has {data_size - position} bytes of trailing data after the last tensor "
            f"(the tensors cover {position} of {data_size} data bytes)",
            f"The file was altered or concatenated with something else; use an unmodified copy of the {refuse.kind}.",
        )


def _parse_header(path: str, kind: str, error_cls: Type[ModAdapterError]) -> Tuple[Dict[str, str], HeaderTensors]:
    """Validate the whole file layout; return (metadata, tensors)."""
    refuse = _Refuser(str(path), kind, error_cls)
    header_bytes, file_size = _read_header_bytes(path, refuse)
    metadata, entries = _decode_header(header_bytes, refuse)
    data_size = file_size - _LENGTH_FIELD_BYTES - len(header_bytes)
    tensors: HeaderTensors = {}
    spans: List[Tuple[int, int, str]] = []
    for name, entry in entries.items():
        dtype, shape, begin, end = _check_tensor_entry(name, entry, data_size, refuse)
        tensors[name] = (dtype, shape)
        spans.append((begin, end, name))
    _check_tiling(spans, data_size, refuse)
    return metadata, tensors


def read_safetensors_header(
    path, *, kind: str, error_cls: Type[ModAdapterError]
) -> Tuple[Dict[str, str], HeaderTensors]:
    """Validate a safetensors file's layout and return its metadata and tensor table.

    Returns ``(metadata, {tensor name: (dtype string as in the header, shape)})``
    without reading tensor data. Raises ``error_cls`` (naming the file, the
    problem and what to do) for anything that is not a well-formed safetensors file.
    """
    return _parse_header(os.fspath(path), kind, error_cls)


def _nonfinite_count(tensor: torch.Tensor) -> int:
    try:
        finite = torch.isfinite(tensor)
    except (RuntimeError, TypeError):
        # Some reduced-precision dtypes (float8) lack isfinite on some devices.
        finite = torch.isfinite(tensor.float())
    return int(finite.numel() - finite.sum().item())


def load_safetensors_checked(
    path, *, kind: str, error_cls: Type[ModAdapterError], device="cpu",
    header: Optional[Tuple[Dict[str, str], HeaderTensors]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Load every tensor of a validated safetensors file; return ``(tensors, metadata)``.

    The header is validated first (see :func:`read_safetensors_header`; ``header``: what that returned for this
    file, when the caller has read it already); then the safetensors library loads the data; then every floating
    tensor is checked for NaN/Inf, naming the first tensor that has any.
    """
    path = os.fspath(path)
    metadata, header_tensors = header if header is not None else _parse_header(path, kind, error_cls)
    refuse = _Refuser(path, kind, error_cls)
    # Imported here so that merely importing this module stays cheap.
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise refuse.error(f"the safetensors library could not load it ({exc})") from exc
    if set(tensors) != set(header_tensors):
        # Only possible if the file changed between validation and loading.
        raise refuse.error("the file changed while it was being loaded", "Load it again once nothing is writing to it.")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = _nonfinite_count(tensor)
            if bad:
                raise refuse.error(
                    f"tensor {name!r} contains {bad} NaN or infinite value(s) out of {tensor.numel()}",
                    f"The {kind} was saved from a diverged or broken run; use another file.",
                )
    return tensors, metadata


def save_safetensors(path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically.

    The file is written to a temporary file in the same folder and moved over
    ``path`` with ``os.replace`` only once complete, so readers never see a
    partial file and a failed save leaves any previous file untouched.
    Tensors are detached, moved to CPU and made contiguous; tensors that share
    storage are copied so that each is written on its own.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise TypeError("safetensors metadata must be a dict of str -> str")
    if _METADATA_KEY in tensors:
        raise ValueError(f"{_METADATA_KEY!r} is reserved and cannot be a tensor name")
    prepared: Dict[str, torch.Tensor] = {}
    seen_storages = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_safetensors needs str -> torch.Tensor, got {name!r}: {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors can be saved (call .to_dense())")
        tensor = tensor.detach().to("cpu").contiguous()
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and storage_key in seen_storages:
            tensor = tensor.clone()
        elif tensor.numel() and tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            # A view into a larger buffer: safetensors would refuse or save the whole buffer.
            tensor = tensor.clone()
        seen_storages.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        prepared[name] = tensor

    with atomic_replace(path) as temp_path:
        save_file(prepared, temp_path, metadata=metadata)
