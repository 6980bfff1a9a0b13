"""The CLIP image encoder gives ComfyUI's penultimate tokens for the same weights.

A tiny random open_clip ViT (the real architecture, small sizes) is saved in
open_clip layout and in transformers layout; the encoder must agree with
transformers' CLIPVisionModel (hidden_states[-2]) and, under COMFYUI_PATH,
with ComfyUI's own CLIP_VISION (`encode_image(...)["penultimate_hidden_states"]`)
built from the same weights with ComfyUI's own key conversion.
"""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.training.image_encoder import (
    ImageEncoderError,
    OpenClipImageEncoder,
    clip_preprocess,
    convert_transformers_to_open_clip,
    resolve_weights,
)

open_clip = pytest.importorskip("open_clip")

TINY = {"width": 48, "layers": 3, "head_width": 16, "patch_size": 14, "image_size": 112}  # 65 tokens
TINY_NAME = "ModAdapterTestTinyViT"


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    config = {
        "embed_dim": 32,
        "vision_cfg": {k: TINY[k] for k in ("image_size", "layers", "width", "head_width", "patch_size")},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    assert TINY_NAME in open_clip.list_models()
    return TINY_NAME


@pytest.fixture(scope="module")
def tiny_weights(tiny_name, tmp_path_factory):
    """A full tiny open_clip CLIP (vision + text) with every weight random, saved as safetensors."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_name, pretrained=None)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = value + 0.05 * torch.randn_like(value)  # LayerNorms too: not just ones/zeros
        state[key] = value.contiguous().clone()
    path = tmp_path_factory.mktemp("weights") / "tiny_open_clip.safetensors"
    save_file(state, str(path))
    return path, state


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "square_exact": torch.rand(2, 112, 112, 3, generator=g),
        "landscape": torch.rand(2, 180, 301, 3, generator=g),
        "portrait_rgba": torch.rand(1, 333, 250, 4, generator=g),
        "small": torch.rand(1, 97, 131, 3, generator=g),
    }


def test_shapes_metadata_and_determinism(tiny_name, tiny_weights):
    path, _ = tiny_weights
    enc = OpenClipImageEncoder.load(tiny_name, path)
    assert (enc.num_tokens, enc.token_width, enc.name) == (65, 48, tiny_name)
    assert enc.metadata() == {"name": tiny_name, "layer": "penultimate", "tokens": 65, "width": 48}
    assert len(enc.visual.transformer.resblocks) == TINY["layers"] - 1  # the last block is never run
    for image in _images().values():
        tokens = enc.encode(image)
        assert tokens.shape == (image.shape[0], 65, 48) and tokens.dtype == torch.float32
        assert torch.equal(tokens, enc.encode(image.clone()))
    a = _images()["landscape"]
    assert not torch.allclose(enc.encode(a, crop=True), enc.encode(a, crop=False))
    # The encoding is per image: batching does not change it.
    one = enc.encode(a[1:2])
    assert torch.allclose(enc.encode(a)[1:2], one, atol=1e-5)
    tokens, key_mask = enc.encode_with_mask(a, torch.zeros(2, 180, 301).index_fill_(2, torch.arange(150), 1.0))
    assert key_mask.shape == (2, 65) and key_mask[:, 0].all() and 0 < key_mask.sum() < 2 * 65


def test_preprocess_matches_comfy_rules():
    img = torch.rand(1, 100, 200, 3)
    pix = clip_preprocess(img, size=224, crop=True)
    assert pix.shape == (1, 3, 224, 224) and pix.dtype == torch.float32
    # Values are 1/255 steps after normalisation.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    raw = (pix[0] * std + mean) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3)
    # Already 224x224: no resize at all.
    exact = torch.rand(1, 224, 224, 3)
    assert torch.allclose((clip_preprocess(exact)[0] * std + mean), (exact[0].movedim(-1, 0) * 255).round() / 255, atol=1e-6)
    with pytest.raises(ImageEncoderError):
        clip_preprocess(torch.rand(1, 10, 10, 1))


def test_matches_transformers_clip_vision(tiny_weights, tiny_name, tmp_path):
    """The transformers layout (ComfyUI's clip_vision files) converts to the same network."""
    transformers = pytest.importorskip("transformers")
    _, state = tiny_weights
    cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=3,
                                        num_attention_heads=3, image_size=112, patch_size=14,
                                        hidden_act="quick_gelu", projection_dim=32)
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    hf_path = tmp_path / "clip_vision_hf.safetensors"
    save_file(hf_state, str(hf_path))

    # Not a 24/32/48-layer ComfyUI depth: the open_clip config's activation (GELU) is the default.
    enc = OpenClipImageEncoder.load(tiny_name, hf_path, storage_dtype=None)
    assert enc.activation == "gelu"
    enc_q = OpenClipImageEncoder.load(tiny_name, hf_path, storage_dtype=None, activation="quick_gelu")
    for image in _images().values():
        pixels = clip_preprocess(image, size=TINY["image_size"])
        with torch.no_grad():
            want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert (enc_q.encode(image) - want).abs().max().item() < 1e-4
        assert (enc.encode(image) - want).abs().max().item() > 1e-3  # the activation matters
    # The conversion helper gives open_clip names that load into an open_clip tower.
    converted = convert_transformers_to_open_clip(hf_state)
    assert converted["transformer.resblocks.0.attn.in_proj_weight"].shape == (144, 48)
    assert torch.equal(converted["proj"], hf_state["visual_projection.weight"].t())


def test_refuses_pickle_and_reports_mismatches(tiny_weights, tiny_name, tmp_path):
    path, state = tiny_weights
    bad = tmp_path / "weights.bin"
    bad.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ImageEncoderError, match="pickle"):
        OpenClipImageEncoder.load(tiny_name, bad)
    # A pickle renamed to .safetensors is recognised before any loader sees it.
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(ModAdapterError, match="(?i)pickle"):
        OpenClipImageEncoder.load(tiny_name, renamed)
    with pytest.raises(ImageEncoderError, match="layers"):
        OpenClipImageEncoder.load("ViT-L-14", path)
    with pytest.raises(ImageEncoderError, match="unknown open_clip model"):
        OpenClipImageEncoder.load("ViT-Nope-99", path)
    other = tmp_path / "not_clip.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ImageEncoderError, match="not a CLIP vision checkpoint"):
        OpenClipImageEncoder.load(tiny_name, other)
    with pytest.raises(ImageEncoderError, match="not a local file"):
        OpenClipImageEncoder.load(tiny_name, "someone/clip-not-cached", cache_dir=tmp_path / "empty_cache")
    # A visual-only open_clip file (no "visual." prefix) loads too, and gives the same tokens.
    visual_only = tmp_path / "visual_only.safetensors"
    save_file({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}, str(visual_only))
    img = _images()["small"]
    assert torch.equal(OpenClipImageEncoder.load(tiny_name, visual_only).encode(img),
                       OpenClipImageEncoder.load(tiny_name, path).encode(img))


def test_hub_repo_from_local_cache(tiny_weights, tiny_name, tmp_path):
    """A repo id resolves from the Hugging Face cache layout, safetensors first, pickles refused."""
    path, _ = tiny_weights
    cache = tmp_path / "hub"
    repo = cache / "models--laion--CLIP-Tiny-Test"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ImageEncoderError, match="only as pickle"):
        resolve_weights("laion/CLIP-Tiny-Test", cache_dir=cache)
    (snapshot / "open_clip_model.safetensors").write_bytes(path.read_bytes())
    assert resolve_weights("hf-hub:laion/CLIP-Tiny-Test", cache_dir=cache) == snapshot / "open_clip_model.safetensors"
    enc = OpenClipImageEncoder.load(tiny_name, "laion/CLIP-Tiny-Test", cache_dir=cache)
    assert enc.encode(_images()["small"]).shape == (1, 65, 48)
    assert enc.metadata()["name"] == "laion/CLIP-Tiny-Test" and enc.architecture == tiny_name
    assert OpenClipImageEncoder.load(tiny_name, path, name="my-clip").metadata()["name"] == "my-clip"


# --------------------------------------------------------------------------
# Against ComfyUI
# --------------------------------------------------------------------------


def _comfy_clip_vision(comfyui, state, tmp_path, fp32_weights: bool):
    import comfy.cli_args
    import comfy.clip_vision

    config = {
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": TINY["width"],
        "image_size": TINY["image_size"], "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": 4 * TINY["width"], "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
        "num_attention_heads": TINY["width"] // TINY["head_width"], "num_channels": 3,
        "num_hidden_layers": TINY["layers"], "patch_size": TINY["patch_size"], "projection_dim": 32,
        "torch_dtype": "float32",
    }
    cfg_path = tmp_path / "clip_vision_config_tiny.json"
    cfg_path.write_text(json.dumps(config))
    args = comfy.cli_args.args
    saved = args.fp32_text_enc
    args.fp32_text_enc = fp32_weights
    try:
        clip = comfy.clip_vision.ClipVisionModel(str(cfg_path))
    finally:
        args.fp32_text_enc = saved
    # ComfyUI's own open_clip → transformers key conversion (as comfy.clip_vision.load does).
    sd = comfy.clip_vision.convert_to_transformers({k: v.clone() for k, v in state.items()}, "visual.")
    missing, _ = clip.load_sd(sd)
    assert not [k for k in missing if "position_ids" not in k], missing
    return clip


@pytest.mark.parametrize("fp32_weights", [False, True], ids=["comfy-default-fp16-storage", "fp32-text-enc"])
def test_matches_comfyui_clip_vision(comfyui, tiny_weights, tiny_name, tmp_path, fp32_weights):
    path, state = tiny_weights
    clip = _comfy_clip_vision(comfyui, state, tmp_path, fp32_weights)
    # ComfyUI's ViT-L configs use QuickGELU; the tiny config does too (our default for 24 layers).
    enc = OpenClipImageEncoder.load(tiny_name, path, storage_dtype=None if fp32_weights else torch.float16,
                                    activation="quick_gelu")
    worst = 0.0
    for label, image in _images().items():
        for crop in (True, False):
            want = clip.encode_image(image, crop=crop)["penultimate_hidden_states"]
            got = enc.encode(image, crop=crop)
            assert got.shape == want.shape, label
            diff = (got - want.to(got.dtype)).abs().max().item()
            worst = max(worst, diff)
            assert diff < 1e-4, f"{label} crop={crop}: max abs diff {diff}"
    print(f"max abs diff vs ComfyUI ({'fp32' if fp32_weights else 'fp16'} weights): {worst:.3g}")
    if not fp32_weights:
        # Without ComfyUI's float16 weight rounding the tokens differ measurably: the rounding matters.
        plain = OpenClipImageEncoder.load(tiny_name, path, storage_dtype=None, activation="quick_gelu")
        image = _images()["landscape"]
        off = (plain.encode(image) - clip.encode_image(image)["penultimate_hidden_states"]).abs().max().item()
        assert off > 10 * max(worst, 1e-7)


def test_comfyui_loads_transformers_layout_file_like_ours(comfyui, tiny_weights, tiny_name, tmp_path):
    """A clip_vision file in transformers layout (what ComfyUI users load) gives the same tokens both ways."""
    import comfy.clip_vision

    _, state = tiny_weights
    clip = _comfy_clip_vision(comfyui, state, tmp_path, fp32_weights=False)
    hf_path = tmp_path / "clip_vision_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.get_sd().items()}, str(hf_path))
    enc = OpenClipImageEncoder.load(tiny_name, hf_path, activation="quick_gelu")
    image = _images()["portrait_rgba"]
    want = clip.encode_image(image, crop=True)["penultimate_hidden_states"]
    assert (enc.encode(image) - want).abs().max().item() < 1e-4
    assert comfy.clip_vision.clip_preprocess(image).shape == (1, 3, 224, 224)
    assert torch.allclose(comfy.clip_vision.clip_preprocess(image), clip_preprocess(image), atol=0, rtol=0)
