"""Tests of concept files: round trip, size, and refusal of damaged or hostile files."""

import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from mod_adapter.modules.concept import Concept
from mod_adapter.modules.concept_file import load_concept, read_concept_info, save_concept
from mod_adapter.modules.errors import ConceptFileError, ModAdapterError

from command_helpers import PickleMarker

FLUX_BLOCKS = 57
FLUX_DOUBLE_BLOCKS = 19
FLUX_MODULATION_DIM = 3072
PREDICTED_SOURCE = {"kind": "predicted", "adapter": "mod_adapter_paper.safetensors", "adapter_sha256": "ab" * 32}


def make_concept(num_blocks=6, modulation_dim=16, **overrides):
    generator = torch.Generator().manual_seed(0)
    fields = dict(
        word="surface",
        delta=torch.randn(num_blocks, modulation_dim, generator=generator) * 3,
        strength=0.75,
        source=dict(PREDICTED_SOURCE),
        base_model="flux1-dev",
    )
    fields.update(overrides)
    return Concept(**fields)


@pytest.fixture
def concept_path(tmp_path):
    path = tmp_path / "surface.safetensors"
    save_concept(path, make_concept(), num_double_blocks=2)
    return path


def valid_metadata(**changes):
    metadata = {
        "format": "mod-concept",
        "format_version": "1",
        "word": "surface",
        "strength": "1.0",
        "source": json.dumps({"kind": "learned", "steps": 1400, "images": 1}),
        "base_model": "flux1-dev",
        "num_blocks": "6",
        "num_double_blocks": "2",
        "modulation_dim": "16",
    }
    metadata.update(changes)
    return {key: value for key, value in metadata.items() if value is not None}


def write_concept_raw(path, tensors=None, **metadata_changes):
    """A concept file written with the safetensors library directly, bypassing save_concept."""
    if tensors is None:
        tensors = {"delta": torch.randn(6, 16).to(torch.bfloat16)}
    save_file(tensors, str(path), metadata=valid_metadata(**metadata_changes))
    return path


def split_file(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_file(path, header, data):
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


# ---------------------------------------------------------------- valid files


def test_round_trip_keeps_delta_to_bf16_precision_and_all_metadata(tmp_path):
    concept = make_concept()
    path = tmp_path / "c.safetensors"
    save_concept(path, concept, num_double_blocks=2)

    loaded = load_concept(path)
    assert loaded.word == "surface"
    assert loaded.strength == 0.75
    assert loaded.source == PREDICTED_SOURCE
    assert loaded.base_model == "flux1-dev"
    assert loaded.delta.dtype == torch.float32
    assert loaded.delta.shape == (6, 16)
    assert torch.equal(loaded.delta, concept.delta.to(torch.bfloat16).float())
    assert torch.allclose(loaded.delta, concept.delta, rtol=2**-8, atol=0)

    info = read_concept_info(path)
    assert info == {
        "format": "mod-concept",
        "format_version": "1",
        "word": "surface",
        "strength": 0.75,
        "source": PREDICTED_SOURCE,
        "base_model": "flux1-dev",
        "num_blocks": 6,
        "num_double_blocks": 2,
        "modulation_dim": 16,
        "delta_dtype": "BF16",
    }


def test_load_in_requested_dtype(concept_path):
    loaded = load_concept(concept_path, dtype=torch.bfloat16)
    assert loaded.delta.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="floating torch dtype"):
        load_concept(concept_path, dtype=torch.int32)


def test_flux_sized_concept_file_is_at_most_400_kb(tmp_path):
    concept = make_concept(num_blocks=FLUX_BLOCKS, modulation_dim=FLUX_MODULATION_DIM, word="a" * 200)
    path = tmp_path / "flux.safetensors"
    save_concept(path, concept)
    size = os.path.getsize(path)
    assert size <= 400 * 1024
    assert size >= FLUX_BLOCKS * FLUX_MODULATION_DIM * 2  # bf16 payload is all there
    info = read_concept_info(path)
    assert (info["num_blocks"], info["num_double_blocks"], info["modulation_dim"]) == (57, 19, 3072)


def test_unicode_word_and_learned_source_round_trip(tmp_path):
    source = {"kind": "learned", "steps": 1400, "images": 2}
    path = tmp_path / "c.safetensors"
    save_concept(path, make_concept(word="Oberfläche 表面", source=source, strength=-2), num_double_blocks=0)
    loaded = load_concept(path)
    assert loaded.word == "Oberfläche 表面"
    assert loaded.source == source
    assert loaded.strength == -2.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float16_and_float32_delta_are_accepted(tmp_path, dtype):
    delta = torch.randn(6, 16).to(dtype)
    path = write_concept_raw(tmp_path / "c.safetensors", {"delta": delta})
    assert read_concept_info(path)["delta_dtype"] == {torch.float16: "F16", torch.float32: "F32"}[dtype]
    assert torch.equal(load_concept(path).delta, delta.float())


def test_unknown_extra_metadata_is_ignored(tmp_path):
    path = write_concept_raw(tmp_path / "c.safetensors", comment="made by hand")
    assert load_concept(path).word == "surface"


def test_save_overwrites_atomically_and_leaves_no_temp(tmp_path, concept_path):
    save_concept(concept_path, make_concept(word="pose"), num_double_blocks=2)
    assert load_concept(concept_path).word == "pose"
    assert os.listdir(tmp_path) == ["surface.safetensors"]


# ---------------------------------------------------------------- Concept validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(word=""), "non-empty concept word"),
        (dict(word="   "), "non-empty concept word"),
        (dict(delta=torch.ones(16)), "2-D"),
        (dict(delta=torch.ones(2, 3, 4)), "2-D"),
        (dict(delta=torch.ones(0, 16)), "2-D"),
        (dict(delta=torch.ones(6, 16, dtype=torch.int64)), "floating point"),
        (dict(delta=torch.full((6, 16), float("nan"))), "NaN or infinite"),
        (dict(strength=float("inf")), "finite number"),
        (dict(strength=True), "finite number"),
        (dict(strength="1"), "finite number"),
        (dict(source={"adapter": "x"}), "string 'kind'"),
        (dict(source={"kind": "learned", "when": object()}), "JSON-serialisable"),
        (dict(base_model=""), "base_model"),
    ],
)
def test_invalid_concept_is_refused(overrides, message):
    with pytest.raises(ModAdapterError, match=message):
        make_concept(**overrides)


def test_save_refuses_bad_block_split_and_reassigned_fields(tmp_path):
    concept = make_concept()
    with pytest.raises(ConceptFileError, match="num_double_blocks"):
        save_concept(tmp_path / "c.safetensors", concept, num_double_blocks=7)
    concept.strength = float("nan")
    with pytest.raises(ConceptFileError, match="finite number"):
        save_concept(tmp_path / "c.safetensors", concept, num_double_blocks=2)
    assert os.listdir(tmp_path) == []


def test_save_refuses_delta_beyond_bf16_range(tmp_path):
    concept = make_concept(delta=torch.full((6, 16), 1e300, dtype=torch.float64))
    with pytest.raises(ConceptFileError, match="bfloat16 range"):
        save_concept(tmp_path / "c.safetensors", concept, num_double_blocks=2)


# ---------------------------------------------------------------- damaged or hostile files


def assert_refused(path, message):
    """Both the info reader and the loader refuse, naming the file."""
    for reader in (read_concept_info, load_concept):
        with pytest.raises(ConceptFileError, match=message) as info:
            reader(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "cut_at, message",
    [
        (3, "only 3 bytes"),  # inside the header length field
        (8, "truncated"),  # right after it
        (40, "truncated"),  # inside the header
        (-1000, "truncated"),  # inside the data
        (-1, "truncated"),  # one byte short
    ],
)
def test_truncated_file_is_refused(concept_path, cut_at, message):
    raw = concept_path.read_bytes()
    concept_path.write_bytes(raw[:cut_at])
    assert_refused(concept_path, message)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).numpy().tobytes())
    assert_refused(path, "not a plausible safetensors header|truncated|pickle")


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_refused(path, "empty")


def test_directory_is_refused(tmp_path):
    assert_refused(tmp_path, "folder, not a file")


def test_pickle_renamed_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "marker_created_by_unpickling"
    path = tmp_path / "concept.safetensors"
    path.write_bytes(pickle.dumps({"delta": PickleMarker(marker)}, protocol=pickle.HIGHEST_PROTOCOL))
    assert_refused(path, r"PyTorch pickle \(\.pt/\.ckpt/\.bin\) file; only safetensors is loaded, never pickle")
    assert not marker.exists()


def test_pickle_marker_really_runs_code_when_unpickled(tmp_path):
    # Guards the test above: the marker is created if the pickle is ever loaded.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(PickleMarker(marker))).close()
    assert marker.exists()


def test_torch_save_zip_renamed_is_refused(tmp_path):
    path = tmp_path / "concept.safetensors"
    torch.save({"delta": torch.ones(6, 16)}, str(path))
    assert zipfile.is_zipfile(path)
    assert_refused(path, "PyTorch pickle")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(format="mod-adapter"), "Mod-Adapter checkpoint, not a concept file"),
        (dict(format="lora"), "expected 'mod-concept'"),
        (dict(format=None), "metadata 'format' is None"),
        (dict(format_version="2"), "format_version '2' is not supported"),
        (dict(format_version=None), "format_version None"),
        (dict(word=None), "lacks word"),
        (dict(base_model=None, strength=None), "lacks strength, base_model"),
        (dict(num_blocks="57"), r"shape \(6, 16\) but the metadata says num_blocks = 57"),
        (dict(modulation_dim="3072"), "modulation_dim = 3072"),
        (dict(num_blocks="six"), "num_blocks = 'six' is not an integer"),
        (dict(num_blocks="0"), "num_blocks = 0 must be at least 1"),
        (dict(num_double_blocks="7"), r"num_double_blocks \(7\) exceeds num_blocks \(6\)"),
        (dict(source="{kind: learned"), "source is not valid JSON"),
        (dict(source='"learned"'), "JSON object with a string 'kind'"),
        (dict(word=""), "concept word in the metadata is empty"),
        (dict(strength="strong"), "strength = 'strong' is not a number"),
        (dict(strength="nan"), "not a finite number"),
        (dict(base_model=""), "base_model is empty"),
    ],
)
def test_edited_metadata_is_refused(tmp_path, changes, message):
    path = write_concept_raw(tmp_path / "c.safetensors", **changes)
    assert_refused(path, message)


@pytest.mark.parametrize(
    "dtype, name",
    [(torch.float64, "F64"), (torch.int32, "I32"), (torch.int8, "I8"), (torch.bool, "BOOL")],
)
def test_wrong_delta_dtype_is_refused(tmp_path, dtype, name):
    path = write_concept_raw(tmp_path / "c.safetensors", {"delta": torch.ones(6, 16).to(dtype)})
    assert_refused(path, f"stored as {name}; concept files hold BF16")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_delta_is_refused(tmp_path, bad_value):
    delta = torch.ones(6, 16, dtype=torch.bfloat16)
    delta[4, 9] = bad_value
    path = write_concept_raw(tmp_path / "c.safetensors", {"delta": delta})
    with pytest.raises(ConceptFileError, match="tensor 'delta' contains 1 NaN or infinite value") as info:
        load_concept(path)
    assert str(path) in str(info.value)


def test_float32_delta_overflowing_requested_dtype_is_refused(tmp_path):
    path = write_concept_raw(tmp_path / "c.safetensors", {"delta": torch.full((6, 16), 1e6)})
    assert load_concept(path).delta.max() == 1e6
    with pytest.raises(ConceptFileError, match="overflows torch.float16"):
        load_concept(path, dtype=torch.float16)


def test_delta_not_2d_is_refused(tmp_path):
    path = write_concept_raw(tmp_path / "c.safetensors", {"delta": torch.ones(96).to(torch.bfloat16)})
    assert_refused(path, r"shape \(96,\); expected 2-D")


def test_extra_tensor_is_refused(tmp_path):
    tensors = {"delta": torch.ones(6, 16, dtype=torch.bfloat16), "payload": torch.ones(3)}
    path = write_concept_raw(tmp_path / "c.safetensors", tensors)
    assert_refused(path, r"tensors other than 'delta': \['payload'\]")


def test_missing_delta_tensor_is_refused(tmp_path):
    path = write_concept_raw(tmp_path / "c.safetensors", {"deltas": torch.ones(6, 16, dtype=torch.bfloat16)})
    assert_refused(path, r"no 'delta' tensor \(it holds \['deltas'\]\)")
    path = write_concept_raw(tmp_path / "none.safetensors", {})
    assert_refused(path, "no 'delta' tensor")


def test_overlapping_offsets_are_refused(tmp_path, concept_path):
    header, data = split_file(concept_path)
    # A second tensor aliasing the second half of delta's bytes.
    header["alias"] = {"dtype": "BF16", "shape": [3, 16], "data_offsets": [96, 192]}
    join_file(concept_path, header, data)
    assert_refused(concept_path, "overlap")


def test_trailing_garbage_is_refused(concept_path):
    with open(concept_path, "ab") as handle:
        handle.write(b"#!/bin/sh\necho hi\n")
    assert_refused(concept_path, "18 bytes of trailing data")


def test_header_offsets_not_matching_shape_are_refused(concept_path):
    header, data = split_file(concept_path)
    header["delta"]["shape"] = [6, 8]  # half the bytes the offsets span
    header["__metadata__"]["modulation_dim"] = "8"
    join_file(concept_path, header, data)
    assert_refused(concept_path, "needs 96 bytes but its data_offsets span 192")
