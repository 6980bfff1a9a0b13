"""Tests of the safe safetensors reader/writer: valid files load, damaged or
hostile files are refused with a message naming the file and the problem."""

import json
import os
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from mod_adapter.modules import safetensors_io
from mod_adapter.modules.errors import CheckpointError
from mod_adapter.modules.safetensors_io import (
    load_safetensors_checked,
    read_safetensors_header,
    save_safetensors,
)

from command_helpers import PickleMarker

KIND = "adapter checkpoint"


def read_header(path):
    return read_safetensors_header(path, kind=KIND, error_cls=CheckpointError)


def load(path):
    return load_safetensors_checked(path, kind=KIND, error_cls=CheckpointError)


def write_raw(path, header, data=b"", header_length=None):
    """Write a safetensors-shaped file from a header object and raw data bytes."""
    header_bytes = json.dumps(header).encode("utf-8") if not isinstance(header, bytes) else header
    length = len(header_bytes) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


@pytest.fixture
def valid_file(tmp_path):
    path = tmp_path / "valid.safetensors"
    save_safetensors(
        path,
        {"weight": torch.randn(4, 3), "bias": torch.zeros(3, dtype=torch.bfloat16)},
        {"format": "test", "note": "ünïcode"},
    )
    return path


# ---------------------------------------------------------------- valid files


def test_round_trip_keeps_tensors_dtypes_and_metadata(tmp_path):
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    tensors = {
        "bf16": torch.randn(3, 7).to(torch.bfloat16),
        "f16": torch.randn(2).half(),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "bools": torch.tensor([True, False]),
        "transposed": base.t(),  # not contiguous
        "slice": base[1:3],  # view into a larger buffer
        "shared": base,  # same storage as the two views
        "empty": torch.zeros(0, 3),
    }
    metadata = {"format": "test", "config": json.dumps({"a": 1})}
    path = tmp_path / "round.safetensors"
    save_safetensors(path, tensors, metadata)

    loaded, loaded_metadata = load(path)
    assert loaded_metadata == metadata
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name

    header_metadata, header_tensors = read_header(path)
    assert header_metadata == metadata
    assert header_tensors["bf16"] == ("BF16", (3, 7))
    assert header_tensors["transposed"] == ("F32", (5, 4))
    assert header_tensors["empty"] == ("F32", (0, 3))
    assert header_tensors["ints"] == ("I64", (2, 3))


def test_file_without_metadata_reads_as_empty_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(path))
    metadata, tensors = read_header(path)
    assert metadata == {}
    assert tensors == {"x": ("F32", (2,))}


def test_saved_file_has_normal_permissions_and_no_temp_left(tmp_path):
    path = tmp_path / "perm.safetensors"
    save_safetensors(path, {"x": torch.ones(1)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["perm.safetensors"]


# ---------------------------------------------------------------- not a usable file


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="folder, not a file") as info:
        load(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(path)


def test_file_shorter_than_length_field_is_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="only 3 bytes"):
        load(path)


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_is_refused_and_never_unpickled(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(PickleMarker(marker), protocol=protocol))
    # Every protocol is named as a pickle: >= 2 by its marker, 0 and 1 by their first opcode and STOP.
    expected = "PyTorch pickle"
    with pytest.raises(CheckpointError, match=expected) as info:
        load(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="only safetensors is loaded, never pickle"):
        read_header(path)


def test_absurd_header_length_is_refused(tmp_path):
    path = write_raw(tmp_path / "huge.safetensors", {}, header_length=2**40)
    with pytest.raises(CheckpointError, match="not a plausible safetensors header"):
        load(path)


def test_header_length_beyond_file_is_truncation(tmp_path):
    path = write_raw(tmp_path / "cut.safetensors", {"__metadata__": {}}, header_length=1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)


def test_header_not_utf8_is_refused(tmp_path):
    path = write_raw(tmp_path / "bin.safetensors", b"\xff\xfe\x00{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load(path)


@pytest.mark.parametrize(
    "header, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"__metadata__": {}, "__metadata__": {}}', "occurs more than once"),
        (json.dumps({"__metadata__": ["a"]}).encode(), "__metadata__ is a list"),
        (json.dumps({"__metadata__": {"steps": 5}}).encode(), "metadata entry 'steps' is a int"),
    ],
)
def test_malformed_header_is_refused(tmp_path, header, message):
    path = write_raw(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "tensors, data, message",
    [
        ({"x": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "lacks dtype"),
        ({"x": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "lacks shape"),
        ({"x": {"dtype": "F32", "shape": [2]}}, bytes(8), "lacks data_offsets"),
        ({"x": "F32"}, bytes(8), "not an object"),
        ({"x": entry(dtype="F128")}, bytes(8), "unknown dtype 'F128'"),
        ({"x": entry(shape=(-2,))}, bytes(8), "invalid shape"),
        ({"x": entry(offsets=(8, 0))}, bytes(8), "invalid data_offsets"),
        ({"x": entry(offsets=(0, 12))}, bytes(12), "needs 8 bytes but its data_offsets span 12"),
        ({"x": entry(shape=(3,), offsets=(0, 12))}, bytes(8), "truncated"),
        ({"x": entry(), "y": entry(offsets=(4, 12))}, bytes(12), "overlap"),
        ({"x": entry(), "y": entry(offsets=(12, 20))}, bytes(20), "4 unaccounted bytes"),
        ({"x": entry()}, bytes(8) + b"garbage", "7 bytes of trailing data"),
    ],
)
def test_bad_tensor_table_is_refused(tmp_path, tensors, data, message):
    path = write_raw(tmp_path / "table.safetensors", tensors, data)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)
    with pytest.raises(CheckpointError, match=message):
        load(path)


@pytest.mark.parametrize("cut", [4, 8 + 5, -3])
def test_truncated_valid_file_is_refused(valid_file, cut):
    raw = valid_file.read_bytes()
    valid_file.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match="truncated|only 4 bytes") as info:
        load(valid_file)
    assert str(valid_file) in str(info.value)


def test_trailing_garbage_after_valid_file_is_refused(valid_file):
    with open(valid_file, "ab") as handle:
        handle.write(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="16 bytes of trailing data"):
        load(valid_file)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_floats_are_refused_naming_the_tensor(tmp_path, bad_value, dtype):
    values = torch.ones(3, 4, dtype=dtype)
    values[1, 2] = bad_value
    path = tmp_path / "nan.safetensors"
    save_file({"good": torch.ones(2), "experts.3.weight": values}, str(path))
    with pytest.raises(CheckpointError, match=r"tensor 'experts\.3\.weight' contains 1 NaN or infinite"):
        load(path)
    # The header alone does not read data, so it does not see the NaN.
    assert read_header(path)[1]["experts.3.weight"][1] == (3, 4)


def test_integer_tensors_are_not_checked_for_nan(tmp_path):
    path = tmp_path / "ints.safetensors"
    save_file({"counts": torch.tensor([0, -1, 2**31 - 1], dtype=torch.int32)}, str(path))
    tensors, _ = load(path)
    assert tensors["counts"].tolist() == [0, -1, 2**31 - 1]


def test_error_class_and_kind_are_the_callers(tmp_path):
    from mod_adapter.modules.errors import ConceptFileError

    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ConceptFileError, match="Cannot use concept file"):
        read_safetensors_header(path, kind="concept file", error_cls=ConceptFileError)


# ---------------------------------------------------------------- atomic saving


def test_failed_write_leaves_previous_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    save_safetensors(path, {"x": torch.ones(2)}, {"version": "old"})
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 5)  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(path, {"x": torch.zeros(2)}, {"version": "new"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_unserialisable_tensor_leaves_no_file(tmp_path):
    path = tmp_path / "new.safetensors"
    with pytest.raises(ValueError, match="only dense tensors"):
        save_safetensors(path, {"ok": torch.ones(2), "sparse": torch.eye(3).to_sparse()}, {})
    with pytest.raises(TypeError, match="str -> torch.Tensor"):
        save_safetensors(path, {"list": [1, 2]}, {})
    with pytest.raises(TypeError, match="metadata must be a dict of str -> str"):
        save_safetensors(path, {"x": torch.ones(1)}, {"steps": 5})
    assert os.listdir(tmp_path) == []


def test_no_pickle_or_torch_load_in_module():
    source = open(safetensors_io.__file__, encoding="utf-8").read()
    assert not re.search(r"torch\.load\(|pickle\.loads?\(|^\s*(import|from) pickle", source, re.MULTILINE)


@pytest.mark.parametrize("header_length", [0x80, 0x180, 0x280 + 0x10000])
def test_header_length_with_pickle_like_first_byte_is_safetensors(tmp_path, header_length):
    # The first byte of a safetensors file is the low byte of the header length;
    # 0x80 there (header of 128, 384, ... bytes) must not be taken for a pickle.
    header = json.dumps({"x": entry()}).encode()
    header += b" " * (header_length - len(header))  # the format allows space padding
    path = write_raw(tmp_path / "padded.safetensors", header, bytes(8))
    assert path.read_bytes()[0] == 0x80
    tensors, metadata = load(path)
    assert metadata == {} and tensors["x"].tolist() == [0.0, 0.0]
