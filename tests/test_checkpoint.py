"""Adapter checkpoint: round trip, metadata, info without loading, and every refusal."""

import json
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mod_adapter.modules import checkpoint as checkpoint_module
from mod_adapter.modules.adapter import ModAdapter
from mod_adapter.modules.checkpoint import load_adapter_checkpoint, read_adapter_info, save_adapter_checkpoint
from mod_adapter.modules.config import ModAdapterConfig
from mod_adapter.modules.errors import CheckpointError

CFG = ModAdapterConfig.preset("tiny")
IMAGE_ENCODER = {"name": "openai/clip-vit-large-patch14", "layer": "penultimate", "tokens": 257, "width": CFG.image_token_dim}
ROUTER_INFO = {"fitted": True, "seed": 0, "num_words": 40}
TRAINING = {"steps": 123, "dataset": "unit-test", "loss": 0.25}


def _adapter():
    torch.manual_seed(0)
    adapter = ModAdapter(CFG)
    with torch.no_grad():
        for expert in adapter.experts:
            torch.nn.init.normal_(expert.fc2.weight, std=0.2)
    adapter.set_router_centroids(torch.randn(CFG.num_experts, CFG.modulation_dim, generator=torch.Generator().manual_seed(3)) * 5)
    return adapter.eval()


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "adapter.safetensors"
    adapter = _adapter()
    save_adapter_checkpoint(path, adapter, base_model="flux1-dev", image_encoder=IMAGE_ENCODER, router_info=ROUTER_INFO, training=TRAINING)
    return path, adapter


def _inputs(adapter, experts=(0, 1, 2, 0)):
    """Neutral features near the given experts' centroids, and image tokens."""
    generator = torch.Generator().manual_seed(11)
    centroids = adapter.router_centroids[torch.tensor(experts)]
    neutral = centroids + 0.3 * torch.randn(centroids.shape, generator=generator)
    return neutral, torch.randn(len(experts), 9, CFG.image_token_dim, generator=generator)


def _rewrite(path, *, tensors=None, metadata=None):
    """Apply edits to a saved checkpoint, bypassing the pack's own writer."""
    state = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        meta = dict(handle.metadata())
    if tensors:
        tensors(state)
    if metadata:
        metadata(meta)
    save_file(state, str(path), metadata=meta)


def _expect_refusal(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as excinfo:
        load_adapter_checkpoint(path)
    assert str(path) in str(excinfo.value)  # the message names the file
    return excinfo


def test_round_trip_gives_the_same_delta_and_metadata(saved):
    path, adapter = saved
    loaded = load_adapter_checkpoint(path)
    assert not loaded.adapter.training
    assert loaded.config == CFG and loaded.path == str(path)
    neutral, tokens = _inputs(adapter)
    assert adapter.route(neutral).tolist() == [0, 1, 2, 0]
    assert torch.equal(loaded.adapter(neutral, tokens), adapter(neutral, tokens))
    meta = loaded.metadata
    assert meta["format"] == "mod-adapter" and meta["format_version"] == "1"
    assert meta["base_model"] == "flux1-dev"
    assert meta["image_encoder"] == IMAGE_ENCODER
    assert meta["training"] == TRAINING
    assert meta["router"] == {**ROUTER_INFO, "num_centroids": CFG.num_experts}
    assert meta["config"] == CFG.to_dict()
    assert meta["parameter_count"] == adapter.num_parameters()


def test_bfloat16_load_keeps_float32_router(saved):
    path, adapter = saved
    loaded = load_adapter_checkpoint(path, dtype=torch.bfloat16).adapter
    assert loaded.dtype == torch.bfloat16
    assert loaded.router_centroids.dtype == torch.float32
    neutral, tokens = _inputs(adapter)
    assert torch.equal(loaded.route(neutral), adapter.route(neutral))
    reference = adapter(neutral, tokens)
    delta = loaded(neutral, tokens)
    assert delta.dtype == torch.bfloat16
    assert torch.allclose(delta.float(), reference, atol=0.1 * reference.abs().max().item())


def test_info_reads_header_only(saved, monkeypatch):
    path, adapter = saved

    def fail(*args, **kwargs):
        raise AssertionError("read_adapter_info must not load weights")

    monkeypatch.setattr(checkpoint_module, "load_safetensors_checked", fail)
    info = read_adapter_info(path)
    assert info["parameter_count"] == adapter.num_parameters()
    centroid_bytes = CFG.num_experts * CFG.modulation_dim * 4
    assert info["bytes_by_dtype"] == {"F32": adapter.num_parameters() * 4 + centroid_bytes}
    assert info["config"] == CFG.to_dict() and info["router"]["fitted"] is True
    assert info["base_model"] == "flux1-dev"


def test_missing_tensor_is_refused(saved):
    path, _ = saved
    _rewrite(path, tensors=lambda s: s.pop("blocks.1.to_v.bias"))
    _expect_refusal(path, r"missing tensors: blocks\.1\.to_v\.bias")


def test_extra_tensor_is_refused(saved):
    path, _ = saved
    _rewrite(path, tensors=lambda s: s.__setitem__("lora_up.weight", torch.zeros(2, 2)))
    _expect_refusal(path, r"unexpected tensors: lora_up\.weight")


def test_wrong_shape_is_refused(saved):
    path, _ = saved
    _rewrite(path, tensors=lambda s: s.__setitem__("image_norm.weight", torch.ones(CFG.image_token_dim + 1)))
    _expect_refusal(path, re.escape(f"image_norm.weight: expected ({CFG.image_token_dim},), got ({CFG.image_token_dim + 1},)"))


def test_nan_weight_is_refused(saved):
    path, _ = saved

    def poison(state):
        state["experts.1.fc1.weight"][0, 0] = float("nan")

    _rewrite(path, tensors=poison)
    _expect_refusal(path, r"'experts\.1\.fc1\.weight' contains 1 NaN")


def test_unknown_version_and_format_are_refused(saved):
    path, _ = saved
    _rewrite(path, metadata=lambda m: m.__setitem__("format_version", "2"))
    _expect_refusal(path, r"format_version is '2'.*Update Mod-Adapter for ComfyUI")
    _rewrite(path, metadata=lambda m: m.__setitem__("format", "lora"))
    _expect_refusal(path, r"format is 'lora', not 'mod-adapter'")


def test_file_without_metadata_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    _expect_refusal(path, r"no 'format' metadata")


def test_config_contradicting_weights_is_refused(saved):
    path, _ = saved

    def more_experts(meta):
        config = json.loads(meta["config"])
        config["num_experts"] = 12
        meta["config"] = json.dumps(config)

    _rewrite(path, metadata=more_experts)
    _expect_refusal(path, r"config metadata contradicts its weights \(num_experts: config says 12, weights have 3; router centroid rows: config says 12, weights have 3\)")


def test_parameter_count_mismatch_is_refused(saved):
    path, adapter = saved
    _rewrite(path, metadata=lambda m: m.__setitem__("parameter_count", str(adapter.num_parameters() + 1)))
    _expect_refusal(path, rf"parameter_count metadata says {adapter.num_parameters() + 1} but the weights hold {adapter.num_parameters()}")


def test_image_encoder_width_contradiction_is_refused(saved):
    path, _ = saved
    _rewrite(path, metadata=lambda m: m.__setitem__("image_encoder", json.dumps({**IMAGE_ENCODER, "width": 1280})))
    _expect_refusal(path, r"token width 1280 but the config says image_token_dim 32")


class _CreatesMarkerWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_renamed_to_safetensors_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3], "payload": _CreatesMarkerWhenUnpickled(marker)}, protocol=protocol))
    # Sanity check of the trap itself: unpickling really would create the marker.
    probe = tmp_path / "probe.marker"
    pickle.loads(pickle.dumps(_CreatesMarkerWhenUnpickled(probe), protocol=protocol)).close()
    assert probe.exists()
    pattern = r"PyTorch pickle"
    _expect_refusal(path, pattern)
    with pytest.raises(CheckpointError):
        read_adapter_info(path)
    assert not marker.exists()


def test_save_refuses_nan_weights_and_bad_metadata(tmp_path):
    adapter = _adapter()
    with pytest.raises(CheckpointError, match="image_encoder width 1280 differs"):
        save_adapter_checkpoint(tmp_path / "a.safetensors", adapter, base_model="flux1-dev", image_encoder={**IMAGE_ENCODER, "width": 1280})
    with pytest.raises(CheckpointError, match="num_centroids 5 differs"):
        save_adapter_checkpoint(tmp_path / "a.safetensors", adapter, base_model="flux1-dev", image_encoder=IMAGE_ENCODER, router_info={"num_centroids": 5})
    with torch.no_grad():
        adapter.image_proj.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"'image_proj\.weight' contains NaN or Inf"):
        save_adapter_checkpoint(tmp_path / "a.safetensors", adapter, base_model="flux1-dev", image_encoder=IMAGE_ENCODER)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("dtype, kind", [(torch.float64, "F64"), (torch.float8_e4m3fn, "fp8"), (torch.int32, "not floating point")])
def test_weights_outside_the_documented_dtypes_are_refused_by_name(saved, dtype, kind):
    path, _ = saved
    _rewrite(path, tensors=lambda state: state.update({k: v.to(dtype) for k, v in state.items() if k != "router_centroids"}))
    _expect_refusal(path, rf"is stored as \w+ \({kind}\); the adapter format holds F32, F16 or BF16 weights only")


def test_a_load_reads_the_header_once_and_a_header_read_first_is_reused(saved, monkeypatch):
    # the Loader node reads the header to pick ComfyUI's ops for the stored dtype, then loads: one parse in all
    from mod_adapter.modules import safetensors_io

    path, _ = saved
    parses = []
    original = safetensors_io._parse_header
    monkeypatch.setattr(safetensors_io, "_parse_header", lambda *a: parses.append(a[0]) or original(*a))
    load_adapter_checkpoint(path)
    assert len(parses) == 1
    header = checkpoint_module.read_adapter_header(path)
    assert header.weight_dtype == torch.float32 and len(parses) == 2
    loaded = load_adapter_checkpoint(path, header=header)
    assert len(parses) == 2 and loaded.config == header.parsed["config"]
